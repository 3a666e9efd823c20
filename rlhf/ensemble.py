"""The reward a cycle chooses for itself, and an ensemble of reward models.

Which form of reward model fits a class depends on its taste: a score head read a length preference
(`stays_short`) where a bag of tokens read one that sits in a few words (`uses_example`), and a person
who knew the rubric picked the form (docs/learning.md). Learners do not come with a rubric, so with
`[retrain.reward] form = "auto"` (the default) the cycle picks: it trains every candidate form on most
of the training groups, ranks the rest with each (a validation part of the training feedback; never
the gate's prompts nor a benchmark's), and keeps what ranks them best: one form, or the ensemble of all
of them. Every candidate's validation accuracy, the winner and its margin go into the metrics.

The ensemble scores an answer by its members' standardised rewards, their mean minus `penalty` times
their spread: a conservative reward (Coste et al. 2023, uncertainty-weighted optimisation), so PPO
gains nothing from answers the members disagree on, where a single reward model is easiest to
over-optimise. `form = "ensemble"` always uses it.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from core.active import Committee
from core.stats import pearson, wilson
from rlhf.data import Message, PreferenceGroup
from rlhf.reward import (RewardConfig, RewardResult, load_reward_model, save_reward_model, scoring_autocast,
                         train_reward_model)

Say = Callable[[str], None]


@dataclass
class RewardEnsemble:
    """Members' rewards, each standardised by its mean and spread on the training answers, combined as
    mean - penalty * std over members. The same interface as RewardResult where the cycle uses one."""

    members: list[RewardResult]
    scales: list[tuple[float, float]]  # (mean, std) of each member's rewards on the training answers
    penalty: float
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> RewardConfig:
        return replace(self.members[0].config, form="ensemble")

    def member_scores(self, prompts: Sequence[list[Message]], completions: Sequence[str]) -> torch.Tensor:
        """(M, N) standardised rewards of each member."""
        return self.standardise([m.score(prompts, completions) for m in self.members])

    def standardise(self, raw: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each member's own rewards (M tensors of N) -> (M, N), standardised by its scale."""
        return torch.stack([(r - mean) / std for r, (mean, std) in zip(raw, self.scales)])

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """(M, N) standardised member rewards -> (N,) the conservative reward."""
        spread = scores.std(dim=0, unbiased=False) if len(self.members) > 1 else torch.zeros(scores.shape[1])
        return scores.mean(dim=0) - self.penalty * spread

    def score(self, prompts: Sequence[list[Message]], completions: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        return self.combine(self.member_scores(prompts, completions))

    def token_rewards(self):
        return None  # the spread is not a sum over tokens: PPO pays the whole score on the last token

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for i, member in enumerate(self.members):
            save_reward_model(member, out / f"member_{i}")
        (out / "ensemble.json").write_text(json.dumps({"scales": self.scales, "penalty": self.penalty}) + "\n")
        (out / "metrics.json").write_text(json.dumps(self.metrics, indent=2, default=str) + "\n", encoding="utf-8")
        return out


def load_ensemble(model_dir: str | Path) -> RewardEnsemble:
    model_dir = Path(model_dir)
    saved = json.loads((model_dir / "ensemble.json").read_text())
    members = [load_reward_model(model_dir / f"member_{i}") for i in range(len(saved["scales"]))]
    metrics = json.loads((model_dir / "metrics.json").read_text(encoding="utf-8"))
    return RewardEnsemble(members, [tuple(s) for s in saved["scales"]], saved["penalty"], metrics)


def save_any(rm: RewardResult | RewardEnsemble, out_dir: str | Path) -> Path:
    return rm.save(out_dir) if isinstance(rm, RewardEnsemble) else save_reward_model(rm, out_dir)


def load_any(model_dir: str | Path) -> RewardResult | RewardEnsemble:
    return load_ensemble(model_dir) if (Path(model_dir) / "ensemble.json").exists() else load_reward_model(model_dir)


@dataclass
class EnsembleConfig:
    candidates: list[str] = field(default_factory=lambda: ["score_head", "bag_of_tokens"])
    # of the training conversations, by a hash of the conversation (a ranking, a rating and a rewrite of one
    # conversation share answers, so they stay on one side): never trained on by the candidates
    validation_fraction: float = 0.2
    min_validation_pairs: int = 10  # fewer, and the choice is noise: the first candidate, trained on all
    penalty: float = 1.0  # conservative reward: standardised mean minus this many standard deviations
    # Models of each candidate form in the ensemble: the first fits all the fitting groups, each further one
    # a bootstrap sample of them from its own seed (Coste et al. used seeds of one form). Only the first of
    # each form is a candidate of its own for "auto".
    members: int = 1

    def __post_init__(self) -> None:
        from rlhf.reward import REWARD_FORMS

        if not self.candidates or len(set(self.candidates)) != len(self.candidates) \
                or any(c not in REWARD_FORMS for c in self.candidates):
            raise ValueError(f"ensemble candidates must be distinct reward forms of {', '.join(REWARD_FORMS)}, "
                             f"not {self.candidates!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be between 0 and 1, not {self.validation_fraction}")
        if not isinstance(self.members, int) or not 1 <= self.members <= 8:
            raise ValueError(f"members must be a whole number from 1 to 8, not {self.members!r}")


@dataclass
class CommitteeConfig:
    """The committee that decides which answers an active comparison shows (core/active.py)."""

    members: int = 4  # bag-of-tokens reward models, each on its own bootstrap sample of the groups; 0: none

    def __post_init__(self) -> None:
        if self.members != 0 and self.members < 2:
            raise ValueError(f"a committee needs 0 (none) or at least 2 members, not {self.members}")


def train_committee(policy_dir: str | Path, groups: Sequence[PreferenceGroup], config: CommitteeConfig,
                    reward: RewardConfig, meta: dict[str, Any] | None = None) -> Committee:
    """`config.members` bag-of-tokens models, member m fitted on a bootstrap sample of `groups` (drawn
    with seed m) from seed m: their disagreement is where the feedback so far leaves the choice open.

    The groups a member's sample left out judge it (out of bag, free with a bootstrap): this says whether
    the committee knows the taste at all. `meta["credible"]` holds only while the 95% interval of that
    accuracy lies above one half. A committee at chance (a taste its bags of tokens cannot see) disagrees
    about tokens the taste does not care about, and asking where it disagrees would ask about its noise,
    so the server asks at random until it is credible (core/active.py `choose_shown`)."""
    weights, lengths, members, bags = [], [], [], []
    for m in range(config.members):
        drawn = bootstrap(len(groups), seed=m)
        member = train_reward_model(policy_dir, [groups[i] for i in drawn], [],
                                    replace(reward, form="bag_of_tokens", seed=m, learning_rate=None))
        members.append(member)
        bags.append(set(drawn))
        weights.append(member.model.weight.detach().float().cpu())
        lengths.append(member.model.length_weight.detach().float().cpu())
    # Each pair once, scored by the mean of the members that did not see its group (bagging's
    # out-of-bag estimate): pooling every member's verdict would count one pair up to M times.
    correct = total = 0
    for i, group in enumerate(groups):
        judges = [member for member, bag in zip(members, bags) if i not in bag]
        if judges:
            accuracy, pairs = pairwise_accuracy(
                lambda prompts, answers: torch.stack([j.score(prompts, answers) for j in judges]).mean(0), [group])
            correct, total = correct + round((accuracy or 0.0) * pairs), total + pairs
    accuracy, low, _ = wilson(correct, total) if total else (None, 0.0, 1.0)
    return Committee(torch.stack(weights), torch.stack(lengths),
                     {**(meta or {}), "members": config.members, "groups": len(groups),
                      "out_of_bag": {"accuracy": accuracy, "pairs": total, "low": low}, "credible": low > 0.5},
                     binary=reward.binary)


def bootstrap(n: int, seed: int) -> list[int]:
    """n indices drawn from range(n) with replacement."""
    rng = random.Random(seed)
    return [rng.randrange(n) for _ in range(n)]


def is_validation(group: PreferenceGroup, fraction: float) -> bool:
    key = group.conversation_id or group.group_id
    return int(hashlib.sha256(f"validation:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


@torch.no_grad()
def answer_rewards(score: Callable[[list, list], torch.Tensor], groups: Sequence[PreferenceGroup]) -> torch.Tensor:
    """The rewards of every answer of `groups`, in order, read in one call (the scorer batches them)."""
    prompts = [g.prompt for g in groups for _ in g.completions]
    return score(prompts, [c for g in groups for c in g.completions])


def accuracy_of(rewards: torch.Tensor, groups: Sequence[PreferenceGroup]) -> tuple[float | None, int]:
    """Share of pairs whose chosen answer has the strictly higher reward, over every pair of `groups` (their
    answers' rewards in order, as answer_rewards gives them); and how many pairs."""
    correct = total = offset = 0
    for group in groups:
        correct += sum(int(rewards[offset + c] > rewards[offset + r]) for c, r in group.pairs)
        total += len(group.pairs)
        offset += len(group.completions)
    return (correct / total if total else None), total


def pairwise_accuracy(score: Callable[[list, list], torch.Tensor], groups: Sequence[PreferenceGroup]) -> tuple[float | None, int]:
    """Share of pairs whose chosen answer scores strictly higher, over every pair of `groups`; and how many."""
    return accuracy_of(answer_rewards(score, groups), groups)


def heldout_summary(rm: RewardResult | RewardEnsemble, tokenizer, groups: Sequence[PreferenceGroup]) -> dict:
    """What check_reward_model and the reports read, for any reward: held-out accuracy and pairs, and how
    much the reward follows length."""
    rewards = answer_rewards(rm.score, groups)
    accuracy, pairs = accuracy_of(rewards, groups)
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for g in groups for t in g.completions]
    return {"heldout_accuracy": accuracy, "heldout_pairs": pairs, "heldout_groups": len(groups),
            "length_correlation": pearson(rewards.tolist(), lengths)}


def make_ensemble(members: list[RewardResult], groups: Sequence[PreferenceGroup], penalty: float) -> RewardEnsemble:
    """Members' scales from their rewards on `groups`' answers (the ones they were trained on)."""
    scales = []
    for member in members:
        scores = answer_rewards(member.score, groups)
        scales.append((scores.mean().item(), max(scores.std(unbiased=False).item(), 1e-6)))
    return RewardEnsemble(members, scales, penalty)


def choose_reward(policy_dir: str | Path, train_groups: Sequence[PreferenceGroup],
                  heldout_groups: Sequence[PreferenceGroup], config: RewardConfig, ensemble: EnsembleConfig,
                  say: Say = print, progress=None) -> tuple[RewardResult | RewardEnsemble, dict[str, RewardResult]]:
    """`config.form` "auto": the candidate (a form or the ensemble) that ranks the validation part best;
    "ensemble": the ensemble. Members train on the training groups outside the validation part.
    Returns the reward and the candidates it does not hold, by form: judges PPO will not optimise (the
    gate asks them, rlhf/evaluate.py); none when the ensemble, which holds them all, is chosen."""
    fit_groups = [g for g in train_groups if not is_validation(g, ensemble.validation_fraction)]
    validation = [g for g in train_groups if is_validation(g, ensemble.validation_fraction)]
    pairs = sum(len(g.pairs) for g in validation)
    if pairs < ensemble.min_validation_pairs or not fit_groups:
        form = ensemble.candidates[0]
        say(f"   {pairs} validation pairs: too few to choose a reward form or scale an ensemble; {form}")
        rm = train_reward_model(policy_dir, train_groups, heldout_groups, replace(config, form=form), progress)
        rm.metrics["choice"] = {"chosen": form, "validation_accuracy": {}, "validation_pairs": pairs,
                                "runner_up": None, "margin": None, "mode": config.form,
                                "reason": f"{pairs} validation pairs (< {ensemble.min_validation_pairs})"}
        return rm, {}
    members, resampled = [], []
    for form in ensemble.candidates:
        say(f"   candidate {form} on {len(fit_groups)} groups")
        members.append(train_reward_model(policy_dir, fit_groups, validation, replace(config, form=form), progress))
        for seed in range(1, ensemble.members):
            say(f"   ensemble member {form} {seed + 1}/{ensemble.members}, on a bootstrap sample of the groups")
            sample = [fit_groups[i] for i in bootstrap(len(fit_groups), seed)]
            resampled.append(train_reward_model(policy_dir, sample, validation, replace(config, form=form, seed=seed),
                                                progress))
    # Every score below is read once per model and answer, in the precision the members trained in.
    with scoring_autocast(config):
        ensembled = make_ensemble(members + resampled, fit_groups, ensemble.penalty)
        on_validation = [answer_rewards(m.score, validation) for m in ensembled.members]
    candidates: dict[str, RewardResult | RewardEnsemble] = dict(zip(ensemble.candidates, members))
    candidates["ensemble"] = ensembled
    rewards = dict(zip(ensemble.candidates, on_validation))  # the members come first, in candidate order
    rewards["ensemble"] = ensembled.combine(ensembled.standardise(on_validation))
    scores = {name: accuracy_of(rewards[name], validation)[0] for name in candidates}
    ranked = sorted(candidates, key=lambda name: -(scores[name] or 0.0))  # stable: earlier candidates win ties
    chosen = "ensemble" if config.form == "ensemble" else ranked[0]
    runner_up = next((n for n in ranked if n != chosen), None)
    margin = (scores[chosen] or 0.0) - (scores[runner_up] or 0.0) if runner_up else None
    say("   validation accuracy: " + ", ".join(f"{n} {scores[n]:.3f}" for n in candidates if scores[n] is not None)
        + f" -> {chosen}" + (f" (by {margin:+.3f} over {runner_up})" if margin is not None else ""))
    rm = candidates[chosen]
    tokenizer = members[0].tokenizer
    with scoring_autocast(config):
        summary = heldout_summary(rm, tokenizer, heldout_groups)
    # A member's own held-out figures were measured on the validation part: they are not the cycle's held-out.
    own = {k: v for k, v in rm.metrics.items() if not k.startswith("heldout_")}
    base = own if not isinstance(rm, RewardEnsemble) else {
        "members": [m.metrics for m in ensembled.members], "scales": ensembled.scales, "penalty": ensemble.penalty,
        "train_groups": len(fit_groups), "train_pairs": sum(len(g.pairs) for g in fit_groups),
        "seconds": round(sum(m.metrics.get("seconds", 0.0) for m in ensembled.members), 3)}
    rm.metrics = {**base, **summary, "choice": {
        "chosen": chosen, "validation_accuracy": scores, "validation_pairs": pairs, "runner_up": runner_up,
        "margin": margin, "mode": config.form}}
    others = {} if chosen == "ensemble" else {n: m for n, m in zip(ensemble.candidates, members) if n != chosen}
    return rm, others

