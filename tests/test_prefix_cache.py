"""The shared system turn's KV cache: prompts that start from it give the logits, answers and PPO
rollouts of prompts run whole, and prompts that do not start with it are run whole."""
import dataclasses

import pytest
import torch
from transformers import GenerationConfig

from core.chat_format import TUTOR_SYSTEM_PROMPT, generation_prompt_ids
from core.causal_lm import next_position_ids
from core.prefix_cache import (PACK_MAX_TOKENS, PrefixCache, common_prefix, generate_answers, packed_prefill,
                               padded_prefill, prefill, shared_prefix_cache, system_prefix_ids, worth_packing)
from tiny import tiny_model, tiny_tokenizer

QUESTIONS = ["What is a fraction?", "Hi", "Explain photosynthesis to a ten year old, with an example please."]


def peaked_model(tokenizer, seed=3):
    """A tiny model whose attention and logits are far from uniform: at the random init a wrong position
    or a skipped prefix token moves the logits by a few thousandths, here by tenths."""
    model = tiny_model(tokenizer, seed=seed, hidden=64)
    with torch.no_grad():
        for linear in model.modules():
            if isinstance(linear, torch.nn.Linear):
                linear.weight.mul_(8)
    return model


def dialogue(question, system=TUTOR_SYSTEM_PROMPT, earlier=()):
    return [{"role": "system", "content": system}, *earlier, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_the_system_turn_is_what_every_dialogue_under_that_prompt_starts_with(tok):
    ids = system_prefix_ids(tok, TUTOR_SYSTEM_PROMPT)
    cache = PrefixCache(peaked_model(tok), ids)
    rows = [generation_prompt_ids(tok, dialogue(q)) for q in QUESTIONS]
    later = generation_prompt_ids(tok, dialogue("And then?", earlier=[{"role": "user", "content": "Hi"},
                                                                     {"role": "assistant", "content": "Hello!"}]))
    assert all(cache.covers(r) for r in [*rows, later])
    assert not cache.covers(generation_prompt_ids(tok, dialogue("Hi", system="Be brief.")))
    assert not cache.covers(ids)  # a prompt must have a token of its own to run
    assert TUTOR_SYSTEM_PROMPT in tok.decode(ids) and "Hi" not in tok.decode(ids)
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]  # never the whole shortest row
    assert common_prefix([[1, 2, 3], [1, 5]]) == [1] and common_prefix([]) == []


def test_prefill_from_the_cache_gives_the_logits_of_the_whole_prompts(tok):
    model = peaked_model(tok)
    rows = [generation_prompt_ids(tok, dialogue(q)) for q in QUESTIONS]
    cache = PrefixCache(model, system_prefix_ids(tok, TUTOR_SYSTEM_PROMPT))
    cached, mask, kv = prefill(model, rows, tok.pad_token_id, cache)
    whole, whole_mask, _ = prefill(model, rows, tok.pad_token_id, None)
    assert whole.logits.std() > 1.0  # a model where positions and attention matter
    torch.testing.assert_close(cached.logits, whole.logits, atol=1e-4, rtol=1e-4)
    assert mask.shape[1] == kv.get_seq_length() == len(cache) + max(len(r) - len(cache) for r in rows)
    assert int(mask.sum()) == int(whole_mask.sum()) == sum(map(len, rows))  # padding in the middle, masked
    mixed = [rows[0], generation_prompt_ids(tok, dialogue("Hi", system="Be brief."))]
    out, mixed_mask, _ = prefill(model, mixed, tok.pad_token_id, cache)  # not all covered: run whole
    assert mixed_mask.shape[1] == max(map(len, mixed))


@pytest.mark.parametrize("from_prefix", [True, False], ids=["after-the-cached-turn", "whole-prompts"])
def test_a_packed_prefill_leaves_the_logits_and_the_cache_of_a_padded_one(tok, from_prefix):
    """Prompts of very different lengths run as one unpadded sequence: each row's logits, the attention mask
    and every real position's keys and values are those of the padded batch, and decoding goes on alike."""
    model = peaked_model(tok)
    rows = [generation_prompt_ids(tok, dialogue(q)) for q in QUESTIONS]
    prefix = PrefixCache(model, system_prefix_ids(tok, TUTOR_SYSTEM_PROMPT)) if from_prefix else None
    own = [r[len(prefix):] for r in rows] if prefix else rows
    if not from_prefix:  # whole prompts share their system turn: make their lengths differ as much
        rows = own = [rows[0][-5:], rows[1], rows[2][-9:]]
    assert worth_packing(model, own)
    packed, packed_mask, packed_kv = packed_prefill(model, own, prefix)
    padded, padded_mask, padded_kv = padded_prefill(model, rows, tok.pad_token_id, prefix)
    assert packed.logits.std() > 1.0
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(packed_mask, padded_mask)
    real = padded_mask.bool()
    for a, b in zip(packed_kv.layers, padded_kv.layers):
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys.transpose(1, 2)[real], b.keys.transpose(1, 2)[real], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.values.transpose(1, 2)[real], b.values.transpose(1, 2)[real],
                                   atol=1e-4, rtol=1e-4)
    step = torch.tensor([[5], [6], [7]])
    mask = torch.cat([padded_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    after = [model(input_ids=step, attention_mask=mask, position_ids=next_position_ids(mask), cache=kv).logits
             for kv in (packed_kv, padded_kv)]
    torch.testing.assert_close(after[0], after[1], atol=1e-4, rtol=1e-4)


def test_only_prefills_that_padding_would_waste_run_packed(tok):
    model = peaked_model(tok)
    assert not worth_packing(model, [[1] * 20, [2] * 18, [3] * 16])  # little padding: one padded pass
    assert worth_packing(model, [[1] * 20, [2] * 3, [3] * 4])
    assert not worth_packing(model, [[1] * 20])
    long = [[1] * (PACK_MAX_TOKENS // 2), [2] * 3, [3] * (PACK_MAX_TOKENS // 2)]
    assert not worth_packing(model, long)  # the packed attention would be dense over all of them
    model.config._attn_implementation = "flash_attention_2"  # takes no custom 4D mask
    assert not worth_packing(model, [[1] * 20, [2] * 3, [3] * 4])


def test_answers_from_the_cache_are_the_answers_of_the_whole_prompts(tok):
    """Greedy and sampled (same seed) answers are the same tokens with and without the cached prefix."""
    model = peaked_model(tok)
    rows = [generation_prompt_ids(tok, dialogue(q)) for q in QUESTIONS]
    cache = shared_prefix_cache(model, rows)
    assert cache is not None and len(cache) >= len(system_prefix_ids(tok, TUTOR_SYSTEM_PROMPT))
    for kwargs in ({"do_sample": False}, {"do_sample": True, "temperature": 1.0, "top_k": 0}):
        answers = []
        for prefix in (cache, None):
            torch.manual_seed(0)
            config = GenerationConfig(max_new_tokens=10, eos_token_id=tok.eos_token_id, **kwargs)
            answers.append(generate_answers(model, rows, tok.pad_token_id, prefix, config).tolist())
        assert answers[0] == answers[1]
        assert len({tuple(a) for a in answers[0]}) == len(rows)  # different answers: the prompts matter
    assert shared_prefix_cache(model, [[1, 2, 3, 4], [1, 2, 5, 6]]) is None  # too short to be worth it


def test_the_gate_samples_the_same_answers_with_and_without_the_cache(tok):
    from rlhf.evaluate import generate

    model = peaked_model(tok)
    prompts = [dialogue(q) for q in QUESTIONS] * 2
    with_cache = generate(model, tok, prompts, 10, temperature=0.7, seed=4)
    without = generate(model, tok, prompts, 10, temperature=0.7, seed=4, prefix_cache=False)
    assert with_cache == without and len(set(with_cache[0])) > 1


def test_ppo_rollouts_from_the_cache_train_as_rollouts_from_whole_prompts(tok, monkeypatch):
    """Same seed, same prompts: one PPO run with the cached system turn and one without sample the same
    answers and end with the same scores."""
    from accelerate.state import AcceleratorState

    from rlhf import ppo
    from rlhf.ppo import PPOConfig, train_ppo

    used = []

    def spy(model, rows, pad_id, prefix, *args, **kwargs):
        used.append(prefix is not None)
        return generate_answers(model, rows, pad_id, prefix, *args, **kwargs)
    monkeypatch.setattr(ppo, "generate_answers", spy)

    prompts = [dialogue(q) for q in QUESTIONS]
    config = PPOConfig(total_episodes=16, rollout_batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=6,
                       seed=0, stop_kl=0)
    runs = []
    for prefix_cache in (True, False):
        AcceleratorState._reset_state(True)
        answers = []

        def reward_fn(p, completions, token_ids):
            answers.append(completions)
            return torch.tensor([float(len(set(ids))) for ids in token_ids])

        torch.manual_seed(0)
        result = train_ppo(peaked_model(tok), tok, prompts, reward_fn,
                           dataclasses.replace(config, prefix_cache=prefix_cache), merge=False)
        runs.append((answers, [h["score"] for h in result.history]))
    AcceleratorState._reset_state(True)
    assert runs[0] == runs[1] and len(runs[0][0]) == 2
    assert used == [True, True, False, False]


def test_the_serving_benchmark_resamples_its_rounds_as_pairs():
    """bench_serving's interval for the cache's speedup: the two servers of a round ran one after the other,
    so a round's pair is resampled whole, and rounds that all show the same ratio give no spread however much
    the host's speed moved between rounds."""
    from bench.bench_serving import speedup_interval

    without = [0.30, 0.62, 0.91, 0.45, 0.77, 0.38]
    assert speedup_interval(without, [t / 2 for t in without]) == pytest.approx((2.0, 2.0, 2.0))
    ratio, low, high = speedup_interval(without, [0.15, 0.40, 0.40, 0.20, 0.30, 0.25])
    assert low < ratio < high and ratio == pytest.approx(0.535 / 0.275)
