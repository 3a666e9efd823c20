"""The reward a cycle chooses for itself (rlhf/ensemble.py): the conservative ensemble score, the choice on
a validation part of the training feedback, the fallback when that part is too small, and storage."""
import random
from dataclasses import dataclass

import pytest
import torch

from rlhf.data import PreferenceGroup
from rlhf.ensemble import (EnsembleConfig, RewardEnsemble, choose_reward, is_validation, load_any, pairwise_accuracy,
                           save_any)
from rlhf.reward import RewardConfig, check_reward_model
from test_reward import FILLER, SYSTEM, planted_groups

AUTO = RewardConfig(form="auto", epochs=3, max_length=256)


@dataclass
class Fixed:
    """A member whose rewards are given: the ensemble's arithmetic on known numbers."""
    rewards: list[float]

    def score(self, prompts, completions, batch_size=8):
        return torch.tensor(self.rewards[:len(completions)])


def test_the_conservative_reward_is_the_members_mean_less_their_spread():
    # member 1 standardised: (r - 1) / 2 -> [0, 1, -1]; member 2: (r - 0) / 1 -> [2, 1, -1]
    ensemble = RewardEnsemble([Fixed([1.0, 3.0, -1.0]), Fixed([2.0, 1.0, -1.0])], [(1.0, 2.0), (0.0, 1.0)], penalty=1.0)
    prompts, answers = [[SYSTEM]] * 3, ["a", "b", "c"]
    # means [1, 1, -1]; spreads (population std of two) [1, 0, 0]
    assert torch.allclose(ensemble.score(prompts, answers), torch.tensor([0.0, 1.0, -1.0]))
    ensemble.penalty = 0.0
    assert torch.allclose(ensemble.score(prompts, answers), torch.tensor([1.0, 1.0, -1.0]))
    assert ensemble.token_rewards() is None  # the spread is no sum over tokens


def longer_groups(n: int, seed: int) -> list[PreferenceGroup]:
    """Rankings by length alone (longer wins): a taste a bag of tokens cannot read, since it learns length
    in a term of its own that it leaves out of the reward."""
    rng = random.Random(seed)
    groups = []
    for i in range(n):
        texts = list(dict.fromkeys(" ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 5)))
                                   for _ in range(rng.randint(2, 4))))
        order = sorted(range(len(texts)), key=lambda j: -len(texts[j]))
        pairs = [(a, b) for x, a in enumerate(order) for b in order[x + 1:] if len(texts[a]) > len(texts[b])]
        if pairs:
            groups.append(PreferenceGroup([SYSTEM, {"role": "user", "content": f"Question {i}?"}], texts, pairs,
                                          f"conv-{seed}-{i}", "ranking", group_id=f"ranking:{seed}-{i}"))
    return groups


def test_auto_keeps_the_form_that_ranks_the_validation_part_best(tiny_model_dir):
    torch.manual_seed(0)
    train, heldout = longer_groups(64, 1), longer_groups(20, 2)
    rm, others = choose_reward(tiny_model_dir, train, heldout, AUTO, EnsembleConfig(), say=lambda *_: None)
    choice = rm.metrics["choice"]
    scores = choice["validation_accuracy"]
    assert set(scores) == {"score_head", "bag_of_tokens", "ensemble"}
    assert choice["chosen"] != "bag_of_tokens" and scores["bag_of_tokens"] < scores[choice["chosen"]], choice
    validation = [g for g in train if is_validation(g, EnsembleConfig().validation_fraction)]
    assert 0 < len(validation) < len(train) and choice["validation_pairs"] == sum(len(g.pairs) for g in validation)
    assert rm.metrics["train_groups"] == len(train) - len(validation)  # the validation part was never trained on
    assert rm.metrics["heldout_pairs"] == sum(len(g.pairs) for g in heldout)
    assert rm.metrics["heldout_accuracy"] == pairwise_accuracy(rm.score, heldout)[0] > 0.7
    check_reward_model(rm.metrics, AUTO)
    # the candidates it does not hold judge PPO's policy at the gate: none when the ensemble holds them all
    assert set(others) == ({"score_head", "bag_of_tokens"} - {choice["chosen"]} if choice["chosen"] != "ensemble" else set())


def test_too_few_validation_pairs_fall_back_to_the_first_candidate(tiny_model_dir):
    train, heldout = planted_groups(6, 1), planted_groups(6, 2)
    rm, others = choose_reward(tiny_model_dir, train, heldout, AUTO, EnsembleConfig(min_validation_pairs=1000),
                               say=lambda *_: None)
    assert rm.config.form == "score_head" and rm.metrics["choice"]["chosen"] == "score_head" and others == {}
    assert rm.metrics["train_groups"] == len(train)  # trained on all of it


def test_an_ensemble_is_kept_whole_and_scores_the_same_after_loading(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    train, heldout = planted_groups(48, 1), planted_groups(12, 2)
    rm, others = choose_reward(tiny_model_dir, train, heldout, RewardConfig(form="ensemble", epochs=3, max_length=256),
                               EnsembleConfig(penalty=0.5), say=lambda *_: None)
    assert isinstance(rm, RewardEnsemble) and others == {} and len(rm.members) == 2 and rm.config.form == "ensemble"
    assert rm.metrics["choice"]["chosen"] == "ensemble" and rm.metrics["penalty"] == 0.5
    loaded = load_any(save_any(rm, tmp_path / "rm"))
    prompts = [g.prompt for g in heldout for _ in g.completions]
    answers = [c for g in heldout for c in g.completions]
    assert torch.allclose(loaded.score(prompts, answers), rm.score(prompts, answers), atol=1e-5)
    assert loaded.metrics["choice"] == rm.metrics["choice"] and loaded.penalty == 0.5


def test_an_ensemble_of_one_form_holds_members_fitted_on_bootstrap_samples_and_is_conservative(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    train, heldout = planted_groups(48, 1), planted_groups(12, 2)
    config = RewardConfig(form="ensemble", epochs=3, max_length=256)
    rm, _ = choose_reward(tiny_model_dir, train, heldout, config,
                          EnsembleConfig(candidates=["bag_of_tokens"], members=3), say=lambda *_: None)
    assert isinstance(rm, RewardEnsemble) and len(rm.members) == 3
    assert all(m.config.form == "bag_of_tokens" for m in rm.members)
    weights = [m.model.weight.detach() for m in rm.members]
    assert not torch.allclose(weights[0], weights[1]) and not torch.allclose(weights[1], weights[2])  # other samples
    pairs = [m["train_pairs"] for m in rm.metrics["members"]]
    assert len(pairs) == 3 and pairs[0] == rm.metrics["train_pairs"]  # the first on all the fitting groups
    prompts = [g.prompt for g in heldout for _ in g.completions]
    answers = [c for g in heldout for c in g.completions]
    members = rm.member_scores(prompts, answers)
    assert members.std(0).max() > 0  # the members disagree somewhere, and there the ensemble pays less than their mean
    assert torch.allclose(rm.score(prompts, answers), members.mean(0) - members.std(0, unbiased=False))
    loaded = load_any(save_any(rm, tmp_path / "rm"))
    assert len(loaded.members) == 3 and torch.allclose(loaded.score(prompts, answers), rm.score(prompts, answers), atol=1e-5)
    with pytest.raises(ValueError, match="members must be"):
        EnsembleConfig(members=0)


def test_a_reward_form_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        RewardConfig(form="magic")
    for candidates in ([], ["score_head", "score_head"], ["auto"], ["magic"]):
        with pytest.raises(ValueError, match="distinct reward forms"):
            EnsembleConfig(candidates=candidates)


def test_a_conversation_is_all_validation_or_all_training():
    """A ranking, a rating and a rewrite of one conversation share answers: they stay on one side."""
    groups = [PreferenceGroup([SYSTEM], ["a", "b"], [(0, 1)], f"conv-{i // 3}", "ranking", group_id=f"g-{i}")
              for i in range(300)]
    sides = {}
    for group in groups:
        sides.setdefault(group.conversation_id, set()).add(is_validation(group, 0.2))
    assert all(len(s) == 1 for s in sides.values())
    assert 0.1 < sum(s == {True} for s in sides.values()) / len(sides) < 0.3


def test_settings_that_cannot_work_are_refused_when_read():
    from rlhf.cycle import CycleConfig
    from rlhf.ppo import PPOConfig

    with pytest.raises(ValueError, match="more than the gate ever judges on"):
        CycleConfig(min_heldout_prompts=40, max_eval_prompts=32)
    for bad in (dict(ptx_coef=-0.1), dict(ptx_batch_size=0)):
        with pytest.raises(ValueError, match="ptx_coef must be >= 0"):
            PPOConfig(**bad)
    CycleConfig(min_heldout_prompts=32, max_eval_prompts=32)  # equal is fine


@pytest.mark.parametrize("binary", [True, False])
def test_the_committee_scores_answers_as_its_members_were_fitted(tiny_model_dir, binary):
    """The serving process scores pools with the committee's own gather (core/active.py); it must give
    each member's bag-of-tokens score plus its length term, distinct tokens and all."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from rlhf.bag_of_tokens import BagOfTokens
    from rlhf.ensemble import CommitteeConfig, train_committee
    from test_reward import MARK

    reward = replace(AUTO, form="bag_of_tokens", binary=binary)
    committee = train_committee(tiny_model_dir, planted_groups(16, seed=1), CommitteeConfig(members=2), reward)
    assert committee.binary == binary
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answers = [tokenizer.encode(text, add_special_tokens=False)
               for text in (f"{MARK} {MARK} {MARK}", "Seven. Seven.", FILLER[0])]
    scores = committee.scores(answers)
    for m in range(2):
        member = BagOfTokens(committee.weights.shape[1], binary=binary)
        with torch.no_grad():
            member.weight.copy_(committee.weights[m])
            member.length_weight.copy_(committee.length[m])
        for n, ids in enumerate(answers):
            ids, mask = torch.tensor([ids]), torch.ones(1, len(ids))
            expected = member(ids, mask) + member.length_term(ids, mask)
            assert scores[m, n].item() == pytest.approx(expected.item(), abs=1e-5)


def test_the_committee_says_whether_it_knows_the_taste_on_the_groups_its_members_left_out(tiny_model_dir):
    """Out-of-bag pairs judge each member: feedback with a taste makes a credible committee; the same answers
    with coin-flip orders do not."""
    from dataclasses import replace

    from rlhf.ensemble import CommitteeConfig, train_committee

    reward = replace(AUTO, form="bag_of_tokens")
    groups = planted_groups(24, seed=3)
    taste = train_committee(tiny_model_dir, groups, CommitteeConfig(members=4), reward)
    assert taste.meta["out_of_bag"]["pairs"] > 20 and taste.meta["out_of_bag"]["accuracy"] > 0.8
    assert taste.meta["credible"] is True
    rng = random.Random(0)
    flipped = [replace(g, pairs=[(c, r) if rng.random() < 0.5 else (r, c) for c, r in g.pairs]) for g in groups]
    noise = train_committee(tiny_model_dir, flipped, CommitteeConfig(members=4), reward)
    assert noise.meta["credible"] is False, noise.meta["out_of_bag"]


@pytest.mark.parametrize("bf16", [True, False])
def test_the_reward_stage_reads_each_answer_once_per_model_in_the_precision_it_trained_in(tiny_model_dir, monkeypatch,
                                                                                         bf16):
    """Scoring is a third of the reward stage's time on the embedded model: the ensemble's scales, the choice and
    the held-out figures read each answer once per model, under bf16 autocast where the stage trained in it
    (as PPO then scores its rollouts), and in fp32 where it did not."""
    from rlhf import reward

    rows: dict[int, list[str]] = {}
    autocast: set[bool] = set()
    score, heldout_metrics = reward.RewardResult.score, reward.heldout_metrics

    def counted_score(self, prompts, completions, batch_size=8):
        rows.setdefault(id(self), []).extend(completions)
        autocast.add(torch.is_autocast_enabled("cpu"))
        return score(self, prompts, completions, batch_size)

    def watched_heldout_metrics(*args, **kwargs):
        autocast.add(torch.is_autocast_enabled("cpu"))
        return heldout_metrics(*args, **kwargs)

    monkeypatch.setattr(reward.RewardResult, "score", counted_score)
    monkeypatch.setattr(reward, "heldout_metrics", watched_heldout_metrics)
    torch.manual_seed(0)
    train, heldout = planted_groups(48, 1), planted_groups(12, 2)
    rm, _ = choose_reward(tiny_model_dir, train, heldout, RewardConfig(form="ensemble", epochs=1, max_length=256,
                                                                       bf16=bf16), EnsembleConfig(), say=lambda *_: None)
    assert isinstance(rm, RewardEnsemble) and len(rows) == 2
    validation = [g for g in train if is_validation(g, EnsembleConfig().validation_fraction)]
    answers = [c for groups in (train, heldout) for g in groups for c in g.completions]
    for member in rm.members:  # the fitting part (scales), the validation part (choice), the held-out part
        assert sorted(rows[id(member)]) == sorted(answers), member.config.form
    assert validation and autocast == {bf16}
