"""The promotion gate's length rule: a gain bought by length alone is refused, unless the users' own
held-out choices show they want that length."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rlhf.evaluate import GateConfig, GateModels, gate, length_preference
from tiny import tiny_model, tiny_tokenizer

PROMPTS = [[{"role": "user", "content": f"Question {i}: tell me about fractions?"}] for i in range(24)]
GATE = GateConfig(max_new_tokens=16, temperature=1.0, bootstrap_samples=300, max_kl_reference=1e6, max_kl_base=1e6)


def test_length_preference_counts_each_group_once():
    shorter_wins = [[(10, 20), (10, 30), (20, 30)]] * 20 + [[(30, 10)]] * 5
    assert length_preference(shorter_wins)["preferred"] == "shorter"
    assert length_preference([[(30, 10), (20, 10)]] * 20)["preferred"] == "longer"
    # 6 pairs per ranking do not make 6 votes: 7 rankings against 5 is no clear preference
    assert length_preference([[(10, 20)] * 6] * 7 + [[(20, 10)] * 6] * 5)["preferred"] is None
    assert length_preference([[(10, 10)]])["preferred"] is None


@pytest.fixture(scope="module")
def shorter_policy():
    """A tiny policy, and a copy whose end-of-answer logit was raised: its answers are shorter."""
    tokenizer = tiny_tokenizer()
    current = tiny_model(tokenizer, seed=3, hidden=64, tie=False)
    enc = tokenizer.apply_chat_template(PROMPTS, add_generation_prompt=True, return_tensors="pt", padding=True,
                                        return_dict=True)
    with torch.no_grad():
        hidden = current.model(**enc).last_hidden_state.mean((0, 1))
    new = copy.deepcopy(current)
    new.lm_head.weight.data[tokenizer.eos_token_id] += 4.0 * hidden / hidden.norm() ** 2
    return tokenizer, current, new


def test_a_gain_from_length_alone_needs_the_users_to_want_that_length(shorter_policy):
    tokenizer, current, new = shorter_policy

    def shortness(prompts, answers):  # a reward model that learned nothing but "shorter is better"
        return torch.tensor([-float(len(tokenizer(a)["input_ids"])) for a in answers])

    asked = gate(GateModels(current, new, current, current), tokenizer, shortness, PROMPTS, GATE,
                 preferred_length="shorter", system_prompt="")
    assert asked.metrics["length_new"] < asked.metrics["length_current"] / 1.6  # a drift the band would refuse
    assert asked.promote, asked.reasons
    assert asked.metrics["length_controlled"] is False

    for preferred in (None, "longer"):
        refused = gate(GateModels(current, new, current, current), tokenizer, shortness, PROMPTS, GATE,
                       preferred_length=preferred, system_prompt="")
        assert not refused.promote and refused.metrics["length_controlled"] is True
        assert any("length" in reason for reason in refused.reasons), refused.reasons


def test_gate_kl_is_the_divergence_of_the_sampled_distributions():
    """KL at the gate's temperature: the exact per-token sum for one answer, and zero for a model vs itself."""
    from core.causal_lm import sequence_logprob
    from rlhf.evaluate import mean_kl

    tokenizer = tiny_tokenizer()
    a, b = tiny_model(tokenizer, seed=1), tiny_model(tokenizer, seed=2)
    prompt, answer = [5, 6, 7], [8, 9, 10, 11]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = a(input_ids=ids).logits[0, len(prompt) - 1:-1] / 0.7
    expected = torch.log_softmax(logits, -1)[range(len(answer)), answer].sum().item()
    assert sequence_logprob(a, [prompt], [answer], temperature=0.7).item() == pytest.approx(expected, abs=1e-4)
    assert mean_kl(a, a, [prompt], [answer], 0.7) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        ref = b(input_ids=ids).logits[0, len(prompt) - 1:-1] / 0.7
    other = torch.log_softmax(ref, -1)[range(len(answer)), answer].sum().item()
    assert mean_kl(a, b, [prompt], [answer], 0.7) == pytest.approx(expected - other, abs=1e-4)


def test_batched_log_probs_equal_one_row_at_a_time():
    """Prompts and answers of different lengths (one answer empty) scored in padded batches give each
    answer the log-probability a lone forward pass gives it."""
    from core.causal_lm import sequence_logprob

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=4)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20], [30, 31, 32, 33]]
    answers = [[8, 9, 10, 11], [16], [], [34, 35, 36, 37, 38, 39, 40]]
    expected = []
    for prompt, answer in zip(prompts, answers):
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1] / 0.7
        expected.append(torch.log_softmax(logits, -1)[range(len(answer)), answer].sum().item())
    for batch_size in (1, 3, 4):
        got = sequence_logprob(model, prompts, answers, temperature=0.7, batch_size=batch_size)
        assert got.tolist() == pytest.approx(expected, abs=1e-4)
    assert expected[2] == 0.0 and all(value < 0 for i, value in enumerate(expected) if i != 2)


def test_gate_kl_counts_the_choice_to_stop(shorter_policy):
    """An answer that ended keeps its EOS token for the KL: a policy taught to stop early differs from
    its reference most on that token, and leaving it out hid most of the divergence."""
    from rlhf.evaluate import generate, mean_kl

    tokenizer, current, new = shorter_policy
    eos = tokenizer.eos_token_id
    _, prompt_ids, answer_ids = generate(new, tokenizer, PROMPTS, GATE.max_new_tokens, temperature=1.0,
                                         batch_size=GATE.batch_size)  # as the gate samples them
    ended = [i for i, a in enumerate(answer_ids) if a and a[-1] == eos]
    assert ended and all(eos not in a[:-1] for a in answer_ids)
    cut = [a[:-1] if i in ended else a for i, a in enumerate(answer_ids)]
    with_stop = mean_kl(new, current, prompt_ids, answer_ids, 1.0)
    without = mean_kl(new, current, prompt_ids, cut, 1.0)
    assert with_stop > without + 0.5

    verdict = gate(GateModels(current, new, current, current), tokenizer, lambda p, a: torch.zeros(len(a)), PROMPTS,
                   dataclasses.replace(GATE, samples_per_prompt=1), system_prompt="")
    assert verdict.metrics["kl_to_reference"] == pytest.approx(with_stop, rel=1e-4)
    assert verdict.metrics["length_new"] == pytest.approx(sum(map(len, cut)) / len(cut))


def test_the_gate_samples_in_bf16_and_measures_kl_with_the_models_as_they_are(shorter_policy):
    """precision = "bf16" samples the answers from bf16 copies (about 2x faster on a CPU with bf16
    instructions); the KL of those answers is still computed by the models given, which stay fp32."""
    from rlhf.evaluate import generate, mean_kl

    tokenizer, current, new = shorter_policy
    config = dataclasses.replace(GATE, samples_per_prompt=1, precision="bf16")
    verdict = gate(GateModels(current, new, current, current), tokenizer, lambda p, a: torch.zeros(len(a)), PROMPTS,
                   config, system_prompt="")
    assert {p.dtype for m in (current, new) for p in m.parameters()} == {torch.float32}
    _, prompt_ids, answer_ids = generate(copy.deepcopy(new).to(torch.bfloat16), tokenizer, PROMPTS,
                                         GATE.max_new_tokens, GATE.temperature, GATE.batch_size, seed=GATE.seed)
    expected = mean_kl(new, current, prompt_ids, answer_ids, GATE.temperature)
    assert verdict.metrics["kl_to_reference"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="precision"):
        GateConfig(precision="fp16")


def test_the_gate_scores_under_bf16_autocast_when_asked_and_samples_its_batch_size_at_once(shorter_policy,
                                                                                           monkeypatch):
    """bf16 = True: the reward scores and the KL's log-probs under bf16 autocast (the models stay fp32);
    batch_size: how many answers one generate call samples at once."""
    import rlhf.evaluate as evaluate

    tokenizer, current, new = shorter_policy
    batches, autocast = [], []
    sample = evaluate.generate_answers
    monkeypatch.setattr(evaluate, "generate_answers", lambda m, chunk, *a, **kw: batches.append(len(chunk)) or
                        sample(m, chunk, *a, **kw))

    def reward(prompts, answers):
        autocast.append(torch.is_autocast_enabled("cpu"))
        return torch.zeros(len(answers))

    runs = {}
    for bf16 in (False, True):
        batches.clear()
        config = dataclasses.replace(GATE, samples_per_prompt=2, bf16=bf16, batch_size=20)
        runs[bf16] = gate(GateModels(current, new, current, current), tokenizer, reward, PROMPTS, config,
                          system_prompt="")
        chunks = lambda n: [min(20, n - i) for i in range(0, n, 20)]  # 48 answers a policy, then the regression set
        assert batches == chunks(2 * len(PROMPTS)) * 2 + chunks(len(evaluate.load_regression_set())) * 2
    assert autocast == [False, True]
    assert {p.dtype for m in (current, new) for p in m.parameters()} == {torch.float32}
    _, prompt_ids, answer_ids = evaluate.generate(new, tokenizer, [p for p in PROMPTS for _ in range(2)],
                                                  GATE.max_new_tokens, GATE.temperature, 20, seed=GATE.seed)
    fp32 = evaluate.mean_kl(new, current, prompt_ids, answer_ids, GATE.temperature)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = evaluate.mean_kl(new, current, prompt_ids, answer_ids, GATE.temperature)
    assert bf16 != fp32
    assert runs[False].metrics["kl_to_reference"] == pytest.approx(fp32, rel=1e-5)
    assert runs[True].metrics["kl_to_reference"] == pytest.approx(bf16, rel=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        GateConfig(batch_size=0)


def test_a_candidate_that_a_reward_model_ppo_did_not_optimise_finds_worse_is_refused(shorter_policy):
    """PPO's reward model says the shorter policy is better; a judge PPO never optimised says it is worse
    (here: it likes length), with an interval below 0: rejected. A judge that agrees, or the judge
    switched off, lets the same candidate through."""
    tokenizer, current, new = shorter_policy

    def length(answers):
        return torch.tensor([float(len(tokenizer(a)["input_ids"])) for a in answers])

    def asked(judge, config=GATE):
        return gate(GateModels(current, new, current, current), tokenizer, lambda p, a: -length(a), PROMPTS, config,
                    preferred_length="shorter", system_prompt="", judge=judge)

    fooled = asked(("longness", lambda p, a: length(a)))
    assert not fooled.promote and fooled.metrics["judge"] == "longness" and fooled.metrics["judge_gain_ci95"][1] < 0
    assert fooled.reasons == [r for r in fooled.reasons if "PPO did not optimise (longness)" in r] != []
    agrees = asked(("shortness", lambda p, a: -length(a)))
    assert agrees.promote and agrees.metrics["judge_gain"] > 0, agrees.reasons
    off = asked(("longness", lambda p, a: length(a)), dataclasses.replace(GATE, judge=False))
    assert off.promote and "judge" not in off.metrics


def test_only_a_judge_clearly_above_chance_on_pairs_it_did_not_train_on_is_asked():
    from rlhf.cycle import credible_judge
    from rlhf.reward import RewardConfig, RewardResult

    def judge(accuracy, pairs):
        return RewardResult(None, None, {"heldout_accuracy": accuracy, "heldout_pairs": pairs})

    blind, sighted = judge(0.55, 40), judge(0.85, 60)
    said = []
    assert credible_judge({"score_head": blind, "bag_of_tokens": sighted}, RewardConfig(), said.append) == (
        "bag_of_tokens", sighted)
    assert "score_head is not asked" in said[0]
    assert credible_judge({"score_head": blind, "few": judge(0.75, 8)}, RewardConfig(), said.append) is None
    assert credible_judge({}, RewardConfig()) is None
