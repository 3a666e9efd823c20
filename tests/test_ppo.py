"""The PPO loop end to end on a tiny random Llama, and the places where an off-by-one index
would train silently on the wrong tokens: the reference, the alignment with generation, EOS."""

import copy
import json
import statistics

import pytest
import torch
from transformers import LlamaForCausalLM

from core.causal_lm import left_pad, logprobs_from_logits, position_ids
from core.chat_format import generation_prompt_ids
from rlhf import ppo_core
from rlhf.ppo import (PolicyAndValue, PPOConfig, generation_config_for, response_mask, rows_in_chunks,
                      save_history, score_responses, token_scores_of, train_ppo)
from tiny import tiny_model, tiny_tokenizer

PROMPTS = [[{"role": "user", "content": q}] for q in
           ["What is 3 + 4?", "Tell me about France.", "What is a fraction?", "How do plants eat?"]]
EOS = 2  # <|im_end|>, also the tiny tokenizer's pad token


def make_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """hidden 64, 2 layers. The final norm scaled by 4 gives it the logit scale of a trained
    model: at the default init the logits are ~0.1 apart, and with the tied embeddings frozen
    no adapter could make any token much more likely than 1/320."""
    model = tiny_model(tokenizer, seed=seed, layers=2, hidden=64)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    return model


def prompt_and_response_batch(tokenizer, response_len: int = 6, seed: int = 0):
    """Left-padded prompts followed by random response tokens: (ids, attention mask, P)."""
    queries, query_mask = left_pad([generation_prompt_ids(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    responses = torch.randint(3, len(tokenizer), (len(PROMPTS), response_len),
                              generator=torch.Generator().manual_seed(seed))
    input_ids = torch.cat([queries, responses], dim=1)
    attention = torch.cat([query_mask, torch.ones_like(responses)], dim=1)
    return input_ids, attention, queries.shape[1]


def plain_logprobs(model, input_ids, attention, prompt_len):
    """Log-probs of the response tokens from the full logits, without train_ppo's helpers."""
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).logits
    return logprobs_from_logits(logits[:, prompt_len - 1:-1], input_ids[:, prompt_len:])


@pytest.fixture
def fresh_accelerate_state():
    """accelerate fixes the precision once per process (a retrain is one process); tests switch it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


# Rollouts come from a merged copy of the policy made before each update (the default; in fp32 here, as
# TUTOR_PRECISION=fp32 makes "auto"), or from the trained module itself (LoRA unmerged). bf16 is the
# GPU's default and the default of CPUs with AVX512-BF16; CI has no GPU, so it runs here too.
@pytest.mark.parametrize("bf16, merged, rollout_precision",
                         [(False, True, "auto"), (False, False, "auto"), (True, False, "auto"), (True, True, "bf16")],
                         ids=["fp32", "fp32-unmerged", "bf16-unmerged", "bf16-rollouts"])
def test_ppo_raises_reward_with_bounded_kl_and_trains_only_the_adapters(tmp_path, bf16, merged, rollout_precision,
                                                                        fresh_accelerate_state):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = make_model(tokenizer)
    base_weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Synthetic reward model: the number of answer tokens containing a vowel (about 1 in 5 at first).
    vowel_tokens = {i for i in range(3, len(tokenizer))
                    if any(c in tokenizer.convert_ids_to_tokens(i) for c in "aeiou")}

    def reward_fn(prompts, completions, token_ids):
        assert len(prompts) == len(completions) == len(token_ids) == 16
        return torch.tensor([float(sum(t in vowel_tokens for t in ids)) for ids in token_ids])

    config = PPOConfig(total_episodes=40 * 16, rollout_batch_size=16, minibatch_size=8, ppo_epochs=2,
                       max_new_tokens=8, learning_rate=1e-3, seed=0, stop_kl=0,  # the whole run; early stop: below
                       bf16=bf16, merged_rollouts=merged, rollout_precision=rollout_precision)
    seen = []
    result = train_ppo(model, tokenizer, PROMPTS, reward_fn, config, progress=seen.append, merge=False)
    history = result.history

    assert len(history) == 40 and seen == history
    for key in ("score", "kl", "entropy", "answer_length", "frac_ended", "clipfrac", "value_loss",
                "policy_loss", "kl_coef", "gen_seconds", "train_seconds"):
        assert all(isinstance(h[key], float) for h in history), key
    first = statistics.mean(h["score"] for h in history[:5])
    last = statistics.mean(h["score"] for h in history[-5:])
    assert last > first + 1.5, (first, last)  # measured: 0.76 -> 3.36 (vowel count - EOS penalty); bf16: 0.79 -> 3.19
    assert max(h["kl"] for h in history) < 15.0  # nats per answer; measured: at most 10.5
    assert history[-1]["kl_coef"] != config.init_kl_coef  # the adaptive controller moved

    # Only the adapters (and the value head) trained; the shared base is untouched.
    peft_model = result.model
    lora_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # LoRA B starts at zero
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            continue
        original = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert not p.requires_grad and torch.equal(p, base_weights[original]), name
    assert result.value_head.weight.abs().sum() > 0

    # Merging the adapters keeps the trained policy's log-probs.
    input_ids, attention, prompt_len = prompt_and_response_batch(tokenizer)
    before = plain_logprobs(peft_model, input_ids, attention, prompt_len)
    merged = peft_model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(plain_logprobs(merged, input_ids, attention, prompt_len), before,
                               atol=1e-4, rtol=1e-4)

    path = save_history(history, tmp_path / "ppo" / "history.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == history


def test_reference_is_the_base_model_with_adapters_disabled():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = make_model(tokenizer)
    original = copy.deepcopy(model)
    module = PolicyAndValue(model, PPOConfig()).eval()
    # One copy of the weights: the policy wraps the caller's model, whose weights are all frozen.
    assert module.policy.get_base_model() is model
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
    with torch.no_grad():  # trained-looking adapters, so the policy differs from the base
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)

    input_ids, attention, prompt_len = prompt_and_response_batch(tokenizer)
    R = input_ids.shape[1] - prompt_len
    expected = plain_logprobs(original, input_ids, attention, prompt_len)  # (B, R)
    reference = logprobs_from_logits(module.reference_logits(input_ids, attention, R),
                                              input_ids[:, prompt_len:])
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        policy_logits, values = module(input_ids, attention, R)
    policy = logprobs_from_logits(policy_logits, input_ids[:, prompt_len:])
    assert values.shape == policy.shape == (len(PROMPTS), R)
    assert (policy - expected).abs().max() > 0.1
    # Disabling the adapters for the reference left them enabled afterwards.
    with torch.no_grad():
        again = logprobs_from_logits(module(input_ids, attention, R)[0], input_ids[:, prompt_len:])
    torch.testing.assert_close(again, policy)


def test_logprobs_line_up_with_what_generate_sampled():
    """Logits at position t score token t + 1: the policy's log-probs of a sampled batch equal
    the ones `generate` sampled from, with left-padded prompts of different lengths."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = PPOConfig(max_new_tokens=12)
    module = PolicyAndValue(make_model(tokenizer), config).eval()
    queries, query_mask = left_pad([generation_prompt_ids(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    assert (query_mask == 0).any()  # the prompts really have different lengths
    with torch.no_grad():
        out = module.policy.generate(input_ids=queries, attention_mask=query_mask, output_logits=True,
                                     return_dict_in_generate=True,
                                     generation_config=generation_config_for(config, [EOS], EOS))
        responses = out.sequences[:, queries.shape[1]:]
        mask, _ = response_mask(responses, [EOS])
        attention = torch.cat([query_mask, mask.long()], dim=1)
        logits, _ = module(out.sequences, attention, responses.shape[1])
    sampled = logprobs_from_logits(torch.stack(out.logits, dim=1), responses)
    ours = logprobs_from_logits(logits, responses)
    torch.testing.assert_close(torch.where(mask, ours, 0.0), torch.where(mask, sampled, 0.0),
                               atol=1e-4, rtol=1e-4)


def test_a_minibatch_runs_only_as_wide_as_its_own_rows():
    """Rows cut from a batch padded for a longer prompt: the columns that are padding in all of them are
    not run, and the logits and values are those of the padded rows."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    module = PolicyAndValue(make_model(tokenizer), PPOConfig()).eval()
    torch.nn.init.normal_(module.value_head.weight)  # values that depend on the hidden states
    rows = [generation_prompt_ids(tokenizer, p) + [5, 6, 7] for p in PROMPTS]
    ids, attention = left_pad(rows, tokenizer.pad_token_id)
    short = sorted(range(len(rows)), key=lambda i: len(rows[i]))[:2]  # without the longest row
    widths = []
    module.policy.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                            with_kwargs=True)
    with torch.no_grad():
        logits, values = module(ids[short], attention[short], 3)
        reference = module.reference_logits(ids[short], attention[short], 3)
        padded = module.policy(input_ids=ids[short], attention_mask=attention[short],
                               position_ids=position_ids(attention[short]), output_hidden_states=True)
    assert widths[:2] == [max(len(rows[i]) for i in short)] * 2 < [ids.shape[1]] * 2
    torch.testing.assert_close(logits, padded.logits[:, -4:-1])
    torch.testing.assert_close(values, module.value_head(padded.hidden_states[-1][:, -4:-1]).squeeze(-1))
    with module.policy.disable_adapter():
        off = module.policy(input_ids=ids[short], attention_mask=attention[short],
                            position_ids=position_ids(attention[short])).logits[:, -4:-1]
    torch.testing.assert_close(reference, off)


def test_rollout_forwards_run_in_minibatch_chunks_of_like_prompts_and_match_the_whole_batch():
    """The old log-probs, values and reference log-probs of a rollout batch: `size` rows at a time, the
    shortest prompts together, so that one long prompt widens only its own chunk; in row order."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    module = PolicyAndValue(make_model(tokenizer), PPOConfig()).eval()
    torch.nn.init.normal_(module.value_head.weight)
    long = [{"role": "user", "content": "Tell me everything about France, its rivers and its kings. " * 3}]
    prompts = [PROMPTS[0], long, PROMPTS[1], PROMPTS[2]]
    rows = [generation_prompt_ids(tokenizer, p) + [5, 6, 7] for p in prompts]
    ids, attention = left_pad(rows, tokenizer.pad_token_id)
    widths = []
    module.policy.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                            with_kwargs=True)
    with torch.no_grad():
        whole_logits, whole_values = module(ids, attention, 3)
        whole_reference = module.reference_logits(ids, attention, 3)
        widths.clear()
        logits, values = rows_in_chunks(module, ids, attention, 3, 2)
        reference, = rows_in_chunks(module.reference_logits, ids, attention, 3, 2)
    torch.testing.assert_close(logits, whole_logits)
    torch.testing.assert_close(values, whole_values)
    torch.testing.assert_close(reference, whole_reference)
    short_rows = sorted(len(r) for r in rows)[:2]
    assert sorted(widths) == [short_rows[1]] * 2 + [ids.shape[1]] * 2  # the long row widens one chunk


def test_train_ppo_scores_its_rollouts_a_minibatch_at_a_time(monkeypatch):
    """No forward pass of a rollout batch (old log-probs and values, reference) sees more rows than a
    minibatch: the batch's long prompts do not widen the other rows' passes."""
    import rlhf.ppo as ppo

    seen = []
    forward = ppo.causal_lm_forward
    monkeypatch.setattr(ppo, "causal_lm_forward", lambda model, ids, *a, **kw: (
        seen.append((ids.shape[0], torch.is_grad_enabled())), forward(model, ids, *a, **kw))[1])
    tokenizer = tiny_tokenizer()
    config = PPOConfig(total_episodes=8, rollout_batch_size=8, minibatch_size=4, max_new_tokens=4, ppo_epochs=1)
    train_ppo(make_model(tokenizer), tokenizer, PROMPTS, lambda p, c, ids: torch.zeros(len(ids)), config)
    scoring = [rows for rows, grad in seen if not grad]
    assert scoring == [4] * 4  # two passes (policy, reference) of two chunks
    assert [rows for rows, grad in seen if grad] == [4] * 2  # the PPO epoch's two minibatches


def test_response_mask_ends_at_eos_and_unfinished_answers_pay_the_penalty():
    responses = torch.tensor([
        [5, 6, EOS, EOS, EOS],  # ended; generate pads with the EOS id after it
        [EOS, EOS, EOS, EOS, EOS],  # empty answer: only the EOS counts
        [5, 6, 7, 8, 9],  # cut off at max_new_tokens
        [5, 3, 4, 4, 4],  # ended by a second EOS id (3), padded with another id (4)
    ])
    mask, ended = response_mask(responses, [EOS, 3])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert ended.tolist() == [True, True, False, True]
    # The score lands on the EOS token (the last one for the unfinished answer).
    assert ppo_core.last_response_index(mask).tolist() == [2, 0, 4, 1]

    tokenizer = tiny_tokenizer()
    calls = []

    def reward_fn(prompts, completions, token_ids):
        calls.append((completions, token_ids))
        return torch.full((len(token_ids),), 2.0)

    score, completions = score_responses(reward_fn, PROMPTS, responses, mask, ended, tokenizer,
                                         unfinished_penalty=1.0)
    assert score.tolist() == [2.0, 2.0, 1.0, 2.0]
    assert calls[0][1] == [[5, 6], [], [5, 6, 7, 8, 9], [5]]  # answers without EOS or padding
    assert completions == calls[0][0] and completions[1] == ""

    rewards, kl = ppo_core.per_token_rewards(score, torch.zeros(4, 5), torch.zeros(4, 5), mask, 0.05)
    assert rewards[0].tolist() == [0.0, 0.0, 2.0, 0.0, 0.0] and rewards[2, 4] == 1.0


def test_token_scores_sit_on_the_answer_tokens_they_belong_to():
    """train_ppo's token_reward_fn sees what the reward function sees (no EOS, no padding); each
    token's part goes back to that token's position, EOS and padding get 0."""
    responses = torch.tensor([[5, 6, EOS, EOS], [EOS, EOS, EOS, EOS], [5, 6, 7, 8]])
    mask, ended = response_mask(responses, [EOS])
    seen = []

    def token_reward_fn(token_ids):
        seen.append(token_ids)
        return [torch.tensor([10.0 * t for t in ids]) for ids in token_ids]

    parts = token_scores_of(token_reward_fn, responses, mask, ended)
    assert seen == [[[5, 6], [], [5, 6, 7, 8]]]
    assert parts.tolist() == [[50.0, 60.0, 0.0, 0.0], [0.0] * 4, [50.0, 60.0, 70.0, 80.0]]


def test_bf16_ppo_runs_after_a_trainer_fixed_fp32_in_the_same_process(fresh_accelerate_state):
    """A retrain is one process: SFT's Trainer sets accelerate's precision first (fp32 on a CPU), and PPO
    asked for bf16 must still get it."""
    from accelerate import Accelerator

    assert Accelerator(mixed_precision="no").mixed_precision == "no"
    tokenizer = tiny_tokenizer()
    seen = []
    config = PPOConfig(total_episodes=8, rollout_batch_size=8, minibatch_size=4, max_new_tokens=4, bf16=True)
    train_ppo(make_model(tokenizer), tokenizer, PROMPTS, lambda p, c, ids: torch.zeros(len(ids)), config,
              progress=lambda stats: seen.append(Accelerator().mixed_precision))
    assert seen == ["bf16"]


def test_train_ppo_returns_a_plain_merged_model():
    tokenizer = tiny_tokenizer()
    model = make_model(tokenizer)
    config = PPOConfig(total_episodes=8, rollout_batch_size=8, minibatch_size=4, max_new_tokens=4)
    result = train_ppo(model, tokenizer, PROMPTS, lambda p, c, ids: torch.zeros(len(ids)), config)
    assert isinstance(result.model, LlamaForCausalLM) and len(result.history) == 1
    assert not any("lora_" in n for n, _ in result.model.named_parameters())
    assert 0 < result.history[0]["answer_length"] <= 4


def test_early_stop_ends_the_run_before_training_on_rollouts_too_far_from_the_reference():
    tokenizer = tiny_tokenizer()
    vowel_tokens = {i for i in range(3, len(tokenizer))
                    if any(c in tokenizer.convert_ids_to_tokens(i) for c in "aeiou")}

    def reward_fn(prompts, completions, token_ids):
        return torch.tensor([float(sum(t in vowel_tokens for t in ids)) for ids in token_ids])

    config = PPOConfig(total_episodes=40 * 16, rollout_batch_size=16, minibatch_size=8, max_new_tokens=8,
                       learning_rate=1e-2, seed=0, stop_kl=2.0)
    history = train_ppo(make_model(tokenizer), tokenizer, PROMPTS, reward_fn, config).history
    *trained, stop = history
    assert len(history) < 40 and "stopped" in stop and "score" not in stop  # that batch was not trained on
    assert all(h["kl"] <= 2.0 for h in trained) and trained
    assert float(stop["stopped"].split()[4]) > 2.0 and stop["episodes"] == len(trained) * 16


def test_ppo_ptx_keeps_the_demonstrations_likely(fresh_accelerate_state):
    """PPO-ptx: the same run with the language-modelling loss on demonstrations mixed in leaves them far
    more likely than PPO alone does, and reports that loss per update; with ptx_coef 0 there is none."""
    from rlhf.ppo import ptx_loss
    from core.chat_format import scored_answer_ids

    tokenizer = tiny_tokenizer()
    vowel_tokens = {i for i in range(3, len(tokenizer))
                    if any(c in tokenizer.convert_ids_to_tokens(i) for c in "aeiou")}

    def reward_fn(prompts, completions, token_ids):
        return torch.tensor([float(sum(t in vowel_tokens for t in ids)) for ids in token_ids])

    demonstrations = [(p, "first count the parts, then name them") for p in PROMPTS]
    rows = [scored_answer_ids(tokenizer, p, a, 256) for p, a in demonstrations]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        before = ptx_loss(make_model(tokenizer), rows, pad).item()
    results = {}
    for coef in (0.0, 1.0):
        config = PPOConfig(total_episodes=12 * 16, rollout_batch_size=16, minibatch_size=8, max_new_tokens=8,
                           learning_rate=1e-3, seed=0, stop_kl=0, ptx_coef=coef, temperature=1.0)
        result = train_ppo(make_model(tokenizer), tokenizer, PROMPTS, reward_fn, config, demonstrations=demonstrations)
        with torch.no_grad():
            results[coef] = (ptx_loss(result.model, rows, pad).item(), result.history)
    (plain, plain_history), (ptx, ptx_history) = results[0.0], results[1.0]
    assert ptx < before - 1.0 and ptx < plain - 1.0, (before, plain, ptx)
    assert all("ptx_loss" not in h for h in plain_history)
    assert all(isinstance(h["ptx_loss"], float) for h in ptx_history)
    assert ptx_history[-1]["ptx_loss"] < ptx_history[0]["ptx_loss"]
