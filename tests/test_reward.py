"""Reward model step on the tiny random Llama: it learns a planted preference, the grouped
Bradley-Terry loss is the one CONTRACT.md asks for, the gate stops weak models, storage is exact."""

import math
import random
import statistics
import time
from dataclasses import replace

import pytest
import torch

from core.chat_format import answer_ids, scored_answer_ids
from rlhf.data import PreferenceGroup
from rlhf.reward import (RewardConfig, RewardResult, RewardTooWeak, build_reward_model, check_reward_model,
                         collate_groups, fit, grouped_bt_loss, load_reward_model, rewards_of,
                         save_reward_model, score, train_reward_model)

SYSTEM = {"role": "system", "content": "You are a patient tutor."}
FILLER = ["A fraction is a part of a whole.", "Try counting on your fingers.",
          "Plants turn light into sugar.", "The capital of France is Paris.",
          "Water boils at one hundred degrees.", "What do you already know?"]
MARK = "Here is an example."  # the planted preference: the completion that says it wins
# A higher rate and one more epoch than the defaults: the tiny model starts from random weights.
CONFIG = RewardConfig(form="score_head", learning_rate=2e-3, epochs=3, max_length=256)


def planted_groups(n: int, seed: int) -> list[PreferenceGroup]:
    """K-way rankings (K = 2..4) where the one completion containing MARK beats the others.
    Every completion has 1..3 sentences and MARK replaces one of the winner's, so length
    carries no signal."""
    rng = random.Random(seed)
    groups = []
    for i in range(n):
        k = rng.randint(2, 4)
        texts = []
        for j in range(k):
            sentences = [rng.choice(FILLER) for _ in range(rng.randint(1, 3))]
            if j == 0:
                sentences[rng.randrange(len(sentences))] = MARK
            texts.append(" ".join(sentences))
        texts = list(dict.fromkeys(texts))  # each distinct text once, as data.py stores them
        rng.shuffle(texts)
        winner = next(t for t, text in enumerate(texts) if MARK in text)
        groups.append(PreferenceGroup(
            prompt=[SYSTEM, {"role": "user", "content": f"Question {i}: can you help me?"}],
            completions=texts, pairs=[(winner, j) for j in range(len(texts)) if j != winner],
            conversation_id=f"conv-{seed}-{i}", source="ranking", group_id=f"ranking:{seed}-{i}"))
    return [g for g in groups if g.pairs]


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    torch.manual_seed(0)
    calls = []
    train, heldout = planted_groups(64, seed=1), planted_groups(20, seed=2)
    start = time.monotonic()
    result = train_reward_model(tiny_model_dir, train, heldout, CONFIG,
                                progress=lambda *a: calls.append(a))
    wall_seconds = time.monotonic() - start  # the whole call, as the caller saw it
    return result, train, heldout, calls, wall_seconds


def test_learns_planted_preference_not_length(trained):
    result, _, heldout, calls, wall_seconds = trained
    m = result.metrics
    longer_wins = [len(g.completions[c]) > len(g.completions[r]) for g in heldout for c, r in g.pairs]
    assert sum(longer_wins) / len(longer_wins) < 0.7  # length alone would not pass
    assert m["heldout_pairs"] == len(longer_wins)
    assert m["heldout_accuracy"] >= 0.8, m
    assert len(m["train_loss"]) == CONFIG.epochs and m["train_loss"][-1] < m["train_loss"][0]
    # The correlation is that of the model's own held-out rewards with the answers' token counts.
    prompts = [g.prompt for g in heldout for _ in g.completions]
    completions = [text for g in heldout for text in g.completions]
    rewards = score(result.model, result.tokenizer, prompts, completions, batch_size=1).tolist()
    lengths = [len(answer_ids(result.tokenizer, text)) for text in completions]
    assert m["length_correlation"] == pytest.approx(statistics.correlation(rewards, lengths), abs=1e-4)
    # The time of the whole step: training and the held-out measurement, within the caller's wall time.
    assert 0.9 * wall_seconds <= m["seconds"] <= wall_seconds + 1e-3, (m["seconds"], wall_seconds)
    steps = [step for step, _, _ in calls]
    assert steps == list(range(1, len(calls) + 1)) and calls[-1][1] == len(calls)
    assert all(math.isfinite(loss) for _, _, loss in calls)
    check_reward_model(m, CONFIG)  # clears the gate


def test_bf16_autocast_learns_the_same_preference(tiny_model_dir):
    """bf16 autocast (set, since the default is fp32), here on the CPU: the loss and optimiser stay fp32,
    and the planted preference is learned as well as in fp32."""
    torch.manual_seed(0)
    result = train_reward_model(tiny_model_dir, planted_groups(64, seed=1), planted_groups(20, seed=2),
                                replace(CONFIG, bf16=True))
    losses = result.metrics["train_loss"]
    assert result.metrics["heldout_accuracy"] >= 0.8 and losses[-1] < losses[0], result.metrics


def test_only_adapters_and_score_head_changed(trained, tiny_model_dir):
    result, *_ = trained
    assert not hasattr(result.model, "peft_config")  # merged: a plain model
    # Same seed, no LoRA: the untrained backbone with the same initial score head.
    initial, _ = build_reward_model(tiny_model_dir, replace(CONFIG, use_lora=False))
    before, after = initial.state_dict(), result.model.state_dict()
    assert before.keys() == after.keys()
    lora_targets = ("q_proj", "v_proj", "score")  # peft's LoRA default for Llama, plus the head
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any("score" in name for name in changed)
    assert any("q_proj" in name for name in changed) and any("v_proj" in name for name in changed)
    assert all(any(t in name for t in lora_targets) for name in changed), changed


def _hand_groups() -> list[PreferenceGroup]:
    prompt = [SYSTEM, {"role": "user", "content": "What is 3 + 4?"}]
    ranked = PreferenceGroup(prompt, ["Seven.", "Count on your fingers: seven.", "Eight."],
                             [(1, 0), (1, 2), (0, 2)], "c1", "ranking")
    rated = PreferenceGroup(prompt, ["Try counting together.", "No idea."], [(0, 1)], "c2", "rating")
    return [ranked, rated]


def test_grouped_loss_matches_hand_computation_and_encodes_each_completion_once(tiny_model_dir):
    model, tokenizer = build_reward_model(tiny_model_dir, CONFIG)
    groups = _hand_groups()
    # Each completion alone (no padding), then the loss by hand: mean over pairs, mean over groups.
    r = [score(model, tokenizer, [g.prompt] * len(g.completions), g.completions, batch_size=1)
         for g in groups]
    expected = sum(
        sum(-math.log(1 / (1 + math.exp(-(float(rg[c]) - float(rg[j]))))) for c, j in g.pairs)
        / len(g.pairs) for g, rg in zip(groups, r)) / len(groups)

    rows_seen = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    batch = collate_groups(tokenizer, groups, CONFIG.max_length)
    with torch.no_grad():
        loss = grouped_bt_loss(rewards_of(model, batch.input_ids, batch.attention_mask), batch)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert rows_seen == [5]  # 5 distinct completions for 4 pairs, not 8 encodings
    # Not the flat mean over the 4 pairs, which would weight the ranking three times.
    flat = [-math.log(1 / (1 + math.exp(-(float(rg[c]) - float(rg[j])))))
            for g, rg in zip(groups, r) for c, j in g.pairs]
    assert abs(sum(flat) / len(flat) - expected) > 1e-6

    # Training keeps both groups in one forward pass of 5 rows too.
    rows_seen.clear()
    losses = fit(model, tokenizer, groups, replace(CONFIG, epochs=1, groups_per_batch=2))
    assert rows_seen == [5] and losses[0] == pytest.approx(expected, rel=1e-5)


def test_group_weight_spreads_over_its_pairs(tiny_model_dir):
    model, tokenizer = build_reward_model(tiny_model_dir, CONFIG)
    groups = _hand_groups()
    batch = collate_groups(tokenizer, groups, CONFIG.max_length)
    rewards = torch.tensor([0.3, 1.0, -0.5, 0.2, 0.4])
    per_group = []
    for g_index in range(2):
        mask = batch.pair_group == g_index
        diff = rewards[batch.chosen[mask]] - rewards[batch.rejected[mask]]
        per_group.append(-torch.nn.functional.logsigmoid(diff).mean())
    batch.group_weight = torch.tensor([3.0, 1.0])
    expected = (3 * per_group[0] + per_group[1]) / 4
    assert grouped_bt_loss(rewards, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_gate_stops_a_reward_model_at_chance():
    with pytest.raises(RewardTooWeak) as info:
        check_reward_model({"heldout_accuracy": 0.52, "heldout_pairs": 40}, RewardConfig())
    message = str(info.value)
    assert "0.52" in message and "40 pairs" in message and "0.60" in message
    assert "the cycle stops before PPO and the gate" in message and "\n" not in message
    with pytest.raises(RewardTooWeak, match="0.60 on 10 pairs is not above 0.60"):
        check_reward_model({"heldout_accuracy": 0.6, "heldout_pairs": 10}, RewardConfig())
    with pytest.raises(RewardTooWeak, match="no held-out pairs"):
        check_reward_model({"heldout_accuracy": None, "heldout_pairs": 0}, RewardConfig())
    check_reward_model({"heldout_accuracy": 0.75, "heldout_pairs": 40}, RewardConfig())
    # above the bar, but on too few pairs to tell from chance
    with pytest.raises(RewardTooWeak, match="0.63 on 30 pairs is not clearly above chance"):
        check_reward_model({"heldout_accuracy": 0.63, "heldout_pairs": 30}, RewardConfig())


def test_save_load_round_trip_scores_identically_and_batching_does_not_change_scores(
        trained, tmp_path):
    result, _, heldout, *_ = trained
    prompts = [g.prompt for g in heldout for _ in g.completions]
    completions = [text for g in heldout for text in g.completions]
    batched = score(result.model, result.tokenizer, prompts, completions, batch_size=8)
    one_by_one = score(result.model, result.tokenizer, prompts, completions, batch_size=1)
    assert batched.shape == (len(completions),)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)  # right padding is inert

    loaded = load_reward_model(save_reward_model(result, tmp_path / "rm"))
    assert (tmp_path / "rm" / "metrics.json").exists()
    assert loaded.metrics == result.metrics
    assert torch.equal(score(loaded.model, loaded.tokenizer, prompts, completions), batched)


# -- the implicit form: DPO's reward through the LM head ---------------------------------------

IMPLICIT = replace(CONFIG, form="implicit", beta=0.1)


def test_implicit_reward_learns_planted_preference_and_saves_only_adapters(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    train, heldout = planted_groups(64, seed=1), planted_groups(20, seed=2)
    result = train_reward_model(tiny_model_dir, train, heldout, IMPLICIT)
    assert result.metrics["heldout_accuracy"] >= 0.8, result.metrics
    assert result.metrics["train_loss"][-1] < result.metrics["train_loss"][0]
    assert result.metrics["reference"] == str(tiny_model_dir)

    prompts = [g.prompt for g in heldout for _ in g.completions]
    completions = [text for g in heldout for text in g.completions]
    batched = result.score(prompts, completions, batch_size=8)
    torch.testing.assert_close(batched, result.score(prompts, completions, batch_size=1), rtol=1e-4, atol=1e-4)
    out = save_reward_model(result, tmp_path / "rm")
    # Adapters only: the reference policy is not copied, so it must be there to load them.
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    loaded = load_reward_model(out)
    assert loaded.config.form == "implicit"
    torch.testing.assert_close(loaded.score(prompts, completions), batched, rtol=1e-4, atol=1e-4)
    metrics = dict(result.metrics, reference=str(tmp_path / "gone"))
    (out / "metrics.json").write_text(__import__("json").dumps(metrics))
    with pytest.raises(FileNotFoundError, match="needs its reference policy"):
        load_reward_model(out)


def test_implicit_reward_is_beta_times_the_answer_log_ratio(tiny_model_dir):
    """By hand on one unpadded row: beta * (log pi - log pi_ref) over the answer's tokens only, and
    exactly 0 before training (LoRA starts as the identity)."""
    model, tokenizer = build_reward_model(tiny_model_dir, IMPLICIT)
    prompt = [SYSTEM, {"role": "user", "content": "What is 3 + 4?"}]
    answers = ["Seven.", "Count on your fingers: seven, as in 3 + 4 = 7."]
    assert torch.equal(score(model, tokenizer, [prompt] * 2, answers, config=IMPLICIT), torch.zeros(2))

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    got = score(model, tokenizer, [prompt] * 2, answers, config=IMPLICIT)  # one padded batch

    def answer_logprob_by_hand(text):
        ids, start = scored_answer_ids(tokenizer, prompt, text, IMPLICIT.max_length)
        assert tokenizer.decode(ids[start:]).startswith(text)  # the answer, and not the assistant header
        ids = torch.tensor([ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return logp[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]].sum()

    with torch.no_grad():
        policy = torch.stack([answer_logprob_by_hand(a) for a in answers])
        with model.disable_adapter():
            reference = torch.stack([answer_logprob_by_hand(a) for a in answers])
    torch.testing.assert_close(got, 0.1 * (policy - reference), rtol=1e-4, atol=1e-5)
    assert got.abs().min() > 0


def test_reward_form_settings_are_checked_when_read():
    with pytest.raises(ValueError, match="reward form 'dpo' is not one of score_head, implicit"):
        RewardConfig(form="dpo")
    with pytest.raises(ValueError, match="implicit reward needs use_lora"):
        RewardConfig(form="implicit", use_lora=False)


# -- the bag-of-tokens form: one weight per token, no backbone ---------------------------------

BAG = RewardConfig(form="bag_of_tokens", max_length=256)


def test_bag_of_tokens_learns_the_planted_words_and_round_trips(tiny_model_dir, tmp_path):
    train, heldout = planted_groups(64, seed=1), planted_groups(20, seed=2)
    result = train_reward_model(tiny_model_dir, train, heldout, BAG)
    assert result.metrics["heldout_accuracy"] >= 0.9, result.metrics
    # What it learned is readable: the planted sentence's words weigh most.
    assert set(result.metrics["heaviest_tokens"]["up"][:4]) & set(result.tokenizer.tokenize(MARK)), result.metrics

    prompts = [g.prompt for g in heldout for _ in g.completions]
    completions = [text for g in heldout for text in g.completions]
    batched = result.score(prompts, completions, batch_size=8)
    torch.testing.assert_close(batched, result.score(prompts, completions, batch_size=1))
    loaded = load_reward_model(save_reward_model(result, tmp_path / "rm"))
    assert loaded.config.form == "bag_of_tokens" and loaded.metrics == result.metrics
    assert torch.equal(loaded.score(prompts, completions), batched)


@pytest.mark.parametrize("binary", [True, False])
def test_bag_of_tokens_reward_is_the_sum_of_the_answer_tokens_weights(tiny_model_dir, binary):
    """By hand: the prompt's tokens never count; each distinct answer token counts once (binary, the
    default), or once per occurrence (counts), and PPO's per-token parts say the same."""
    config = replace(BAG, binary=binary)
    model, tokenizer = build_reward_model(tiny_model_dir, config)
    prompt = [SYSTEM, {"role": "user", "content": "What is 3 + 4?"}]
    answers = ["Seven.", "Seven. Seven. Count on your fingers."]
    assert torch.equal(score(model, tokenizer, [prompt] * 2, answers, config=config), torch.zeros(2))
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=torch.Generator().manual_seed(0)))
    expected = []
    for text in answers:
        ids, start = scored_answer_ids(tokenizer, prompt, text, config.max_length)
        counted = set(ids[start:]) if binary else ids[start:]
        expected.append(sum(model.weight[i].item() for i in counted))
    torch.testing.assert_close(score(model, tokenizer, [prompt] * 2, answers, config=config), torch.tensor(expected))
    repeated = tokenizer.encode("Seven. Seven.", add_special_tokens=False)
    parts = model.token_rewards([repeated])[0]
    first_time = [i not in repeated[:t] for t, i in enumerate(repeated)]
    torch.testing.assert_close(parts, torch.tensor([model.weight[i].item() * (f or not binary)
                                                    for i, f in zip(repeated, first_time)]))
    assert not all(first_time)  # "Seven." is said twice
    assert (parts == 0).sum().item() == (sum(not f for f in first_time) if binary else 0)


def test_bag_of_tokens_splits_its_score_over_the_answer_tokens_for_ppo(tiny_model_dir):
    """RewardResult.token_rewards(): each generated token's weight. With the chat template's closing
    tokens (the score of an empty answer) they add up to the score; the other forms do not split."""
    result = train_reward_model(tiny_model_dir, planted_groups(32, seed=1), planted_groups(8, seed=2), BAG)
    prompt = [SYSTEM, {"role": "user", "content": "What is 3 + 4?"}]
    answers = ["Seven.", MARK + " Count on your fingers."]
    ids = [result.tokenizer.encode(text, add_special_tokens=False) for text in answers]
    parts = result.token_rewards()(ids + [[len(result.tokenizer) + 5]])  # an id past the vocabulary weighs 0
    assert [len(p) for p in parts] == [len(i) for i in ids] + [1] and parts[2].item() == 0.0
    closing = result.score([prompt], [""])
    scores = result.score([prompt] * 2, answers)
    torch.testing.assert_close(torch.stack([p.sum() for p in parts[:2]]) + closing, scores)
    assert parts[1].abs().sum() > 0
    for form in ("score_head", "implicit"):
        assert RewardResult(result.model, result.tokenizer, {}, RewardConfig(form=form)).token_rewards() is None


def shorter_wins_groups(n: int, seed: int) -> list[PreferenceGroup]:
    """Pairs of filler answers of 1 and 3 sentences: the shorter wins, no word carries the preference."""
    rng = random.Random(seed)
    groups = []
    for i in range(n):
        short = rng.choice(FILLER)
        long = " ".join(rng.choice(FILLER) for _ in range(3))
        groups.append(PreferenceGroup(
            prompt=[SYSTEM, {"role": "user", "content": f"Question {i}: can you help me?"}],
            completions=[short, long], pairs=[(0, 1)], conversation_id=f"len-{seed}-{i}", source="ranking",
            group_id=f"ranking:len-{seed}-{i}"))
    return groups


def test_length_correlation_is_high_for_a_reward_model_that_counts_tokens(tiny_model_dir):
    """The metric that warns of a length-counting reward model: planted preference for the longer answer,
    learned by a bag of tokens without its length term, so every token's weight grows alike."""
    longer_wins = lambda groups: [replace(g, pairs=[(1, 0)]) for g in groups]  # noqa: E731
    result = train_reward_model(tiny_model_dir, longer_wins(shorter_wins_groups(48, seed=1)),
                                longer_wins(shorter_wins_groups(12, seed=2)), replace(BAG, length_apart=False))
    assert result.metrics["heldout_accuracy"] == 1.0
    assert result.metrics["length_correlation"] > 0.8, result.metrics


def test_bag_of_tokens_keeps_length_apart_from_its_reward(tiny_model_dir, tmp_path):
    """A preference for length alone goes into the length term, which the reward leaves out: the token
    weights of the training answers average 0, so PPO paid per token has no reason to cut answers.
    Without the term the same preference makes every common token's weight negative."""
    train, heldout = shorter_wins_groups(48, seed=1), shorter_wins_groups(12, seed=2)
    kept = train_reward_model(tiny_model_dir, train, heldout, BAG)
    mixed = train_reward_model(tiny_model_dir, train, heldout, replace(BAG, length_apart=False))

    def mean_token_weight(result):
        ids = []
        for g in train:
            for text in g.completions:
                encoded, start = scored_answer_ids(result.tokenizer, g.prompt, text, BAG.max_length)
                ids += dict.fromkeys(encoded[start:])  # each distinct token once, as the binary reward counts
        return result.model.weight[torch.tensor(ids)].mean().item()

    assert kept.metrics["length_weight"] < -0.05 and abs(mean_token_weight(kept)) < 1e-6, kept.metrics
    assert mean_token_weight(mixed) < -0.05 and mixed.metrics["length_weight"] == 0.0
    assert abs(kept.metrics["length_correlation"]) < abs(mixed.metrics["length_correlation"])
    loaded = load_reward_model(save_reward_model(kept, tmp_path / "rm"))
    assert loaded.model.length_weight.item() == kept.metrics["length_weight"]


def test_centering_moves_the_mean_token_weight_into_the_length_term_and_keeps_every_ranking():
    from rlhf.bag_of_tokens import BagOfTokens

    bag = BagOfTokens(10)
    with torch.no_grad():
        bag.weight.copy_(torch.arange(10.0))
    answers = [[1, 2, 3], [4, 5]]  # tokens' mean weight: 3
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    before = bag(ids, mask) + bag.length_term(ids, mask)
    assert bag.center(answers) == 3.0 and bag.length_weight.item() == 3.0
    torch.testing.assert_close(bag(ids, mask) + bag.length_term(ids, mask), before)  # the trained model ranks alike
    torch.testing.assert_close(bag(ids, mask), torch.tensor([6.0 - 9.0, 9.0 - 6.0]))  # the reward: no length
