"""SFT on prompt/completion demonstrations: the demonstrated answers become likelier, the prompt is not trained on."""
import torch

from core.causal_lm import sequence_logprob
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
    prompt = tok.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=False)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(record["completion"][0]["content"], add_special_tokens=False)["input_ids"]
    return sequence_logprob(model, [p], [a]).item()


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


def test_sft_loss_is_on_the_completion_only():
    """TRL builds a completion mask from prompt/completion records; prompt tokens get no loss."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=3)
    args = SFTConfig(output_dir="/tmp/sft-mask-check", completion_only_loss=True, report_to=[], use_cpu=True,
                     max_length=256)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records()[:2]), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    prompt_len = len(tok.apply_chat_template(records()[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=False))
    assert (labels[:prompt_len] == -100).all()
    assert (labels[prompt_len:] != -100).any() and torch.equal(labels[prompt_len:][labels[prompt_len:] != -100],
                                                               ids[prompt_len:][labels[prompt_len:] != -100])


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
