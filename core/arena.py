"""Ratings of policy versions from blind pairwise votes: Bradley-Terry, bootstrap intervals, style control.

As Chatbot Arena rates models (FastChat's `compute_mle_elo`, and its style control): each vote is one
comparison of two versions' answers to the same prompt; P(i beats j) = sigmoid(theta_i - theta_j), fitted
by maximum likelihood with one version anchored at 0, ties counted as half a win each way. Ratings are
shown on the Elo scale (400 / ln 10 per unit of theta, the anchor at 1000). Bootstrap intervals resample
the votes. Raw votes reward longer and more formatted answers, so the style-controlled fit adds
`gamma . (s_i - s_j)` for normalised differences of style features (length, list items, headers): the
version terms then say what is preferred at equal style, and `gamma` how much style itself sways votes.
"""
from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

ELO_SCALE = 400 / math.log(10)
ELO_ANCHOR = 1000.0
STYLE_FEATURES = ("length", "list_items", "headers")
WINNERS = ("a", "b", "tie")


@dataclass(frozen=True)
class Vote:
    a: str  # version shown on one side
    b: str
    winner: str  # "a", "b" or "tie"
    style_a: dict = field(default_factory=dict)  # STYLE_FEATURES of each answer (see `style_of`)
    style_b: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.winner not in WINNERS or self.a == self.b:
            raise ValueError(f"a vote needs two different versions and a winner in {WINNERS}")


def style_of(text: str) -> dict:
    """The style features of an answer: characters, markdown list items and headers."""
    return {"length": len(text),
            "list_items": len(re.findall(r"^\s*(?:[-*+]|\d+[.)])\s", text, flags=re.M)),
            "headers": len(re.findall(r"^\s*#{1,6}\s", text, flags=re.M))}


@dataclass
class Ratings:
    elo: dict[str, float]  # version -> rating on the Elo scale
    interval: dict[str, tuple[float, float]]  # version -> 95% bootstrap interval (empty without bootstrap)
    style: dict[str, float]  # style feature -> coefficient (theta units); empty without style control
    votes: int

    def leaderboard(self) -> list[dict]:
        return [{"version": v, "elo": round(r, 1), "low": round(self.interval[v][0], 1) if v in self.interval else None,
                 "high": round(self.interval[v][1], 1) if v in self.interval else None}
                for v, r in sorted(self.elo.items(), key=lambda item: -item[1])]


def fit(votes: Sequence[Vote], anchor: str | None = None, style_control: bool = False,
        l2: float = 1e-6) -> tuple[dict[str, float], dict[str, float]]:
    """Maximum-likelihood thetas (anchor = 0; default: the alphabetically first version) and, with
    style control, the style coefficients. A tiny L2 term keeps a version that never lost finite."""
    problem = _Problem(votes, anchor, style_control)
    theta, gamma = problem.solve(torch.ones(1, len(votes), dtype=torch.float64), l2)
    return problem.named(theta[0], gamma[0])


def ratings(votes: Sequence[Vote], anchor: str | None = None, style_control: bool = False,
            bootstrap_samples: int = 1000, seed: int = 0, l2: float = 1e-6) -> Ratings:
    """Elo-scale ratings with 95% percentile bootstrap intervals. Each resample draws the votes with
    replacement (multinomial counts as weights), and all resamples are fitted at once: the problems are
    independent, so one optimisation of their summed losses solves each."""
    problem = _Problem(votes, anchor, style_control)
    theta, gamma = problem.solve(torch.ones(1, len(votes), dtype=torch.float64), l2)
    thetas, style = problem.named(theta[0], gamma[0])
    generator = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.ones(len(votes), dtype=torch.float64), len(votes) * bootstrap_samples,
                               replacement=True, generator=generator).view(bootstrap_samples, len(votes))
    counts = torch.nn.functional.one_hot(counts, len(votes)).sum(dim=1).double()  # (B, votes)
    draws, _ = problem.solve(counts, l2)
    interval = {}
    for version, i in problem.index.items():
        # a resample without a vote of this version says nothing about it
        present = (counts * problem.involves[:, i]).sum(dim=1) > 0
        values = sorted(draws[present, i].tolist())
        if values:
            low = values[int(0.025 * (len(values) - 1))]
            high = values[int(math.ceil(0.975 * (len(values) - 1)))]
            interval[version] = (_elo(low), _elo(high))
    return Ratings({v: _elo(t) for v, t in thetas.items()}, interval, style, len(votes))


class _Problem:
    """The votes as rows of a logistic regression: versions i, j, target, tie weight, style difference."""

    def __init__(self, votes: Sequence[Vote], anchor: str | None, style_control: bool) -> None:
        versions = sorted({v.a for v in votes} | {v.b for v in votes})
        if len(versions) < 2:
            raise ValueError("ratings need votes between at least two versions")
        self.index = {v: i for i, v in enumerate(versions)}
        self.anchor = anchor or versions[0]
        if self.anchor not in self.index:
            raise ValueError(f"the anchor {self.anchor!r} has no votes")
        self.style_control = style_control
        rows, targets, weights, styles, vote_of = [], [], [], [], []
        for n, vote in enumerate(votes):
            outcomes = {"a": [(1.0, 1.0)], "b": [(0.0, 1.0)], "tie": [(1.0, 0.5), (0.0, 0.5)]}[vote.winner]
            for target, weight in outcomes:
                rows.append((self.index[vote.a], self.index[vote.b]))
                targets.append(target)
                weights.append(weight)
                styles.append(_style_difference(vote) if style_control else [0.0] * len(STYLE_FEATURES))
                vote_of.append(n)
        self.a, self.b = (torch.tensor(side) for side in zip(*rows))
        self.y = torch.tensor(targets, dtype=torch.float64)
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.s = torch.tensor(styles, dtype=torch.float64)
        self.vote_of = torch.tensor(vote_of)
        self.involves = torch.zeros(len(votes), len(versions), dtype=torch.float64)  # (votes, versions)
        for n, vote in enumerate(votes):
            self.involves[n, self.index[vote.a]] = self.involves[n, self.index[vote.b]] = 1.0
        self.free = torch.ones(len(versions), dtype=torch.float64)
        self.free[self.index[self.anchor]] = 0.0  # the anchor's theta stays 0

    def solve(self, vote_weights: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
        """vote_weights (B, votes) -> thetas (B, versions) and style coefficients (B, features)."""
        weights = vote_weights[:, self.vote_of] * self.w  # (B, rows)
        batch = weights.shape[0]
        theta = torch.zeros(batch, len(self.index), dtype=torch.float64, requires_grad=True)
        gamma = torch.zeros(batch, len(STYLE_FEATURES), dtype=torch.float64, requires_grad=True)
        params = [theta, gamma] if self.style_control else [theta]
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=1000, tolerance_grad=1e-12,
                                      tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

        def loss():
            optimizer.zero_grad()
            t = theta * self.free
            logits = t[:, self.a] - t[:, self.b] + (gamma @ self.s.T if self.style_control else 0.0)
            nll = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, self.y.expand_as(logits), reduction="none")
            value = ((weights * nll).sum(dim=1) / weights.sum(dim=1)
                     + l2 * (t.pow(2).sum(dim=1) + gamma.pow(2).sum(dim=1))).sum()
            value.backward()
            return value

        optimizer.step(loss)
        return (theta * self.free).detach(), gamma.detach()

    def named(self, theta: torch.Tensor, gamma: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
        return ({v: float(theta[i]) for v, i in self.index.items()},
                {f: float(g) for f, g in zip(STYLE_FEATURES, gamma)} if self.style_control else {})


def _elo(theta: float) -> float:
    return ELO_ANCHOR + ELO_SCALE * theta


def _style_difference(vote: Vote) -> list[float]:
    """Normalised differences (s_a - s_b) / (s_a + s_b), 0 where both are 0: a ratio, whatever the scale."""
    out = []
    for name in STYLE_FEATURES:
        x, y = float(vote.style_a.get(name, 0)), float(vote.style_b.get(name, 0))
        out.append((x - y) / (x + y) if x + y else 0.0)
    return out


def win_rate(votes: Sequence[Vote], version: str, baseline: str, style_control: bool = True,
             bootstrap_samples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """P(`version`'s answer is preferred to `baseline`'s at equal style), with its 95% bootstrap interval:
    sigmoid of their theta difference. Only the votes between these two versions count."""
    pair = [v for v in votes if {v.a, v.b} == {version, baseline}]
    if not pair:
        return 0.5, 0.0, 1.0
    problem = _Problem(pair, baseline, style_control)
    theta, _ = problem.solve(torch.ones(1, len(pair), dtype=torch.float64), 1e-6)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(torch.ones(len(pair), dtype=torch.float64), len(pair) * bootstrap_samples,
                              replacement=True, generator=generator).view(bootstrap_samples, len(pair))
    counts = torch.nn.functional.one_hot(draws, len(pair)).sum(dim=1).double()
    sampled, _ = problem.solve(counts, 1e-6)
    i = problem.index[version]
    p = torch.sigmoid(sampled[:, i]).sort().values
    low, high = p[int(0.025 * (len(p) - 1))], p[int(math.ceil(0.975 * (len(p) - 1)))]
    return float(torch.sigmoid(theta[0, i])), float(low), float(high)


@dataclass
class CanaryConfig:
    """A version that passed the offline gate serves a share of learners before everyone (app/canary.py)."""

    enabled: bool = False  # off: a version that passes the gate is promoted at once
    conversation_share: float = 0.2  # of conversations started while it runs, answered by the canary
    arena_share: float = 0.5  # of two-answer comparisons, which pair the canary with the current version
    min_votes: int = 20  # no verdict before this many arena votes between the two
    max_votes: int = 200  # undecided after this many: withdrawn, the current version stays
    max_hours: float = 72.0  # the same, in time
    # Promoted when the interval's low end is at or above 0.5 - margin (not worse, within the margin);
    # withdrawn when its high end is below 0.5 (worse).
    margin: float = 0.1
    style_control: bool = True  # judge at equal length and format: raw votes reward longer answers

    def __post_init__(self) -> None:
        for name in ("conversation_share", "arena_share", "margin"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"canary {name} must be between 0 and 1")
        if not 1 <= self.min_votes <= self.max_votes:
            raise ValueError("canary min_votes must be at least 1 and at most max_votes")


@dataclass(frozen=True)
class CanaryVerdict:
    decision: str  # "promote" | "withdraw" | "continue"
    reason: str
    votes: int
    win_rate: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"decision": self.decision, "reason": self.reason, "votes": self.votes,
                "win_rate": round(self.win_rate, 4), "low": round(self.low, 4), "high": round(self.high, 4)}


def judge_canary(votes: Sequence[Vote], canary: str, baseline: str, config: CanaryConfig,
                 age_hours: float) -> CanaryVerdict:
    """Not worse than the baseline: promote; worse: withdraw; undecided when the vote or time budget
    is spent: withdraw (the current version stays, the safe side). Looking after every vote makes a
    95% interval somewhat optimistic; min_votes keeps the first looks from deciding on a few votes."""
    pair = [v for v in votes if {v.a, v.b} == {canary, baseline}]
    p, low, high = win_rate(pair, canary, baseline, config.style_control) if pair else (0.5, 0.0, 1.0)
    figures = f"win rate {p:.0%} [{low:.0%}, {high:.0%}] over {len(pair)} votes"
    if len(pair) >= config.min_votes:
        if high < 0.5:
            return CanaryVerdict("withdraw", f"worse than {baseline}: {figures}", len(pair), p, low, high)
        if low >= 0.5 - config.margin:
            return CanaryVerdict("promote", f"not worse than {baseline}: {figures}", len(pair), p, low, high)
    if len(pair) >= config.max_votes or age_hours >= config.max_hours:
        return CanaryVerdict("withdraw", f"undecided within its budget ({figures}); {baseline} stays",
                             len(pair), p, low, high)
    return CanaryVerdict("continue", figures, len(pair), p, low, high)
