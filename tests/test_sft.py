"""SFT on prompt/completion demonstrations: the demonstrated answers become likelier, the prompt is not trained on."""
import tempfile

import torch

from core.causal_lm import sequence_logprob
from core.chat_format import answer_ids, generation_prompt_ids
from rlhf.sft import SFTSettings, run_sft
from tiny import tiny_model, tiny_tokenizer

SYSTEM = {"role": "system", "content": "You are a tutor."}


def records():
    qa = [("What is 3 + 4?", "Try counting on your fingers. The answer is seven."),
          ("What is a fraction?", "A fraction is a part of a whole. Half a pizza is one half."),
          ("How do plants eat?", "Photosynthesis lets plants turn light into sugar."),
          ("Capital of France?", "The capital of France is Paris.")]
    return [{"prompt": [SYSTEM, {"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in qa] * 2


def completion_logprob(model, tok, record):
    prompt = generation_prompt_ids(tok, record["prompt"])
    return sequence_logprob(model, [prompt], [answer_ids(tok, record["completion"][0]["content"])]).item()


def test_sft_makes_demonstrations_likelier_and_changes_weights():
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=3, hidden=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = records()
    lp_before = [completion_logprob(model, tok, r) for r in data[:4]]
    merged, metrics = run_sft(model, tok, data, SFTSettings(epochs=15, learning_rate=1e-2, batch_size=4))
    lp_after = [completion_logprob(merged, tok, r) for r in data[:4]]
    assert all(a > b + 1.0 for a, b in zip(lp_after, lp_before)), (lp_before, lp_after)
    assert metrics["sft_loss_last"] < metrics["sft_loss_first"]
    after = merged.state_dict()
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed)
    assert not any("lora" in k for k in after)  # merged: a plain model


# Shared by every prompt below and unrelated to any answer: trained on, it would become likely.
DISTINCT = "Zebras juggle quartz violins beneath marmalade moons."


def test_sft_loss_is_on_the_completion_only(tmp_path, monkeypatch):
    """run_sft trains on the answers, not on the prompts: after SFT on records whose prompts all open
    with the same user text, each answer (given its prompt) is much likelier per token, while that
    repeated user text, teacher-forced in its place in the prompt, is hardly likelier at all."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # run_sft's output directory goes here
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=3, hidden=64)
    data = [{"prompt": [r["prompt"][0], {"role": "user", "content": f"{DISTINCT} {r['prompt'][1]['content']}"}],
             "completion": r["completion"]} for r in records()]
    distinct = answer_ids(tok, DISTINCT)

    def per_token_logprobs(m):
        """(answer, user text) log-probability per token of each of the 4 distinct records."""
        answers, users = [], []
        for r in data[:4]:
            prompt = generation_prompt_ids(tok, r["prompt"])
            answer = answer_ids(tok, r["completion"][0]["content"])
            at = next(i for i in range(len(prompt)) if prompt[i:i + len(distinct)] == distinct)
            answers.append(sequence_logprob(m, [prompt], [answer]).item() / len(answer))
            users.append(sequence_logprob(m, [prompt[:at]], [distinct]).item() / len(distinct))
        return torch.tensor(answers), torch.tensor(users)

    answers_before, users_before = per_token_logprobs(model)
    merged, _ = run_sft(model, tok, data, SFTSettings(epochs=15, learning_rate=1e-2, batch_size=4))
    answers_after, users_after = per_token_logprobs(merged)
    # Nats per token. With the loss on the whole sequence (completion_only_loss=False) the repeated
    # user text is learned faster than any answer; the bounds sit well apart from both outcomes.
    assert (users_after - users_before).max() < 0.3, (users_before, users_after)
    assert (answers_after - answers_before).min() > 0.5, (answers_before, answers_after)


def test_ppo_can_train_the_policy_that_sft_returns():
    """The SFT step hands PPO a plain model whose LoRA adapters get gradients, also when copied (as the
    cycle copies it to keep the reference apart): the policy moves away from the reference (KL > 0)."""
    import copy

    from rlhf.ppo import PPOConfig, train_ppo

    tok = tiny_tokenizer()
    merged, _ = run_sft(tiny_model(tok, seed=3, hidden=64), tok, records(), SFTSettings(epochs=1))
    prompts = [[SYSTEM, {"role": "user", "content": f"Question {i}?"}] for i in range(16)]
    history = []
    train_ppo(copy.deepcopy(merged), tok, prompts, lambda p, c, t=None: [float("a" in x) for x in c],
              PPOConfig(total_episodes=48, max_new_tokens=8, learning_rate=1e-2), progress=history.append)
    assert history[0]["approx_kl"] > 0 and all(h["kl"] > 0 for h in history[1:]), history
