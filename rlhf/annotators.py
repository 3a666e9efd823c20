"""Feedback that no single account can steer: exclusions, agreement weights and a cap per user.

A cycle's feedback comes from many accounts, and one of them may be careless or hostile (a few
hundred rigged votes are known to move a Chatbot Arena rank). Before the data is split and trained
on, `weigh_annotators`:

1. Leaves out what a teacher or an admin excluded (a user, or one conversation).
2. Estimates each user's agreement from two independent sources:
   - **repeat checks**: now and then the app shows a user a two-answer comparison they already
     decided, order flipped (TutorService.recheck); agreeing with oneself is the floor of care;
   - **peers**: a bag-of-words Bradley-Terry model fitted on every *other* user's pairs, each user
     one vote (their pairs weighted 1/n), predicts the user's picks; the share it agrees with.
     One vote per user matters: an account that supplies half of all pairs is still one voice
     among the others when they judge it, and so cannot outvote them when *they* are judged.
   Each source counts once it has `min_evidence` items; the estimate is the lower of the two
   (smoothed: (agree + 1) / (n + 2)), so a consistent inverter, who passes their own repeat
   checks, is still caught by their peers, and a random clicker by the repeat checks.
   The peers' source counts only while it can tell: when the peer model predicts the median user no
   better than `min_agreement`, the taste is one a bag of words cannot read (length, whether an answer
   says anything), and every honest user would look like a random clicker; the report says so. Even
   then a user the peers judge *against* the others beyond chance (the 95% Wilson interval of their
   agreement wholly below one half: an inverter; a taste a bag of words cannot read gives about one
   half, not that) is left out: random clickers who drag the median down cannot shelter one.
3. Leaves out users below `min_agreement`, with the reason; weighs the others' preference groups
   by (2a - 1) (chance agreement teaches nothing) scaled so that a perfect annotator weighs 1.
4. Caps each user's share of the cycle's preference weight and of its demonstrations at
   `max_user_share` (water-filling: the largest are cut down to the cap, the rest keep theirs).

The result lists, per user, what was measured and done; the cycle writes it to `annotators.json`
and its lineage names what was left out and why. Users are named in the report by a pseudonym
(`pseudonym`): account names of children are personal details.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch

from core.privacy import pseudonym
from core.stats import wilson
from rlhf.data import Demonstration, PreferenceGroup, TrainingData

_WORD = re.compile(r"[a-z0-9']+")


@dataclass
class AnnotatorConfig:
    enabled: bool = True
    max_user_share: float = 0.25  # of a cycle's preference weight and of its demonstrations
    min_agreement: float = 0.6  # smoothed agreement below which a user is left out
    min_evidence: int = 6  # repeat checks (or peer-judged pairs) before a source counts
    peer_l2: float = 0.01
    peer_steps: int = 150

    def __post_init__(self) -> None:
        if not 0 < self.max_user_share <= 1:
            raise ValueError(f"max_user_share must be in (0, 1], not {self.max_user_share}")
        if not 0 <= self.min_agreement < 1:
            raise ValueError(f"min_agreement must be in [0, 1), not {self.min_agreement}")


# -- agreement -----------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class _PeerModel:
    """r(y) = sum of word weights over the answer, fitted by weighted Bradley-Terry with an L2 term."""

    def __init__(self, pairs: list[tuple[str, str, float]], l2: float, steps: int) -> None:
        vocab: dict[str, int] = {}
        rows = []
        for chosen, rejected, weight in pairs:
            diff = Counter(_words(chosen))
            diff.subtract(Counter(_words(rejected)))
            rows.append(({vocab.setdefault(w, len(vocab)): c for w, c in diff.items() if c}, weight))
        self.vocab = vocab
        self.weight = torch.zeros(len(vocab))
        if not rows or not vocab:
            return
        x = torch.zeros(len(rows), len(vocab))
        for i, (counts, _) in enumerate(rows):
            for j, c in counts.items():
                x[i, j] = float(c)
        w = torch.tensor([weight for _, weight in rows])
        w = w / w.sum()
        theta = torch.zeros(len(vocab), requires_grad=True)
        optimizer = torch.optim.Adam([theta], lr=0.1)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -(w * torch.nn.functional.logsigmoid(x @ theta)).sum() + l2 * (theta ** 2).sum()
            loss.backward()
            optimizer.step()
        self.weight = theta.detach()

    def margin(self, chosen: str, rejected: str) -> float:
        diff = Counter(_words(chosen))
        diff.subtract(Counter(_words(rejected)))
        return sum(self.weight[self.vocab[w]].item() * c for w, c in diff.items() if w in self.vocab)


def _pairs_of(groups: Iterable[PreferenceGroup]) -> list[tuple[str, str]]:
    return [(g.completions[c], g.completions[r]) for g in groups for c, r in g.pairs]


def peer_agreement(groups: list[PreferenceGroup], config: AnnotatorConfig) -> dict[str, tuple[int, int]]:
    """user -> (agreeing, judged) of their pairs, as predicted by a model of everyone else's."""
    by_user: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for g in groups:
        by_user[g.user].extend(_pairs_of([g]))
    out: dict[str, tuple[int, int]] = {}
    if len(by_user) < 3:  # fewer than two others: "peers" would be one person's opinion
        return out
    for user, own in by_user.items():
        others = [(c, r, 1.0 / len(pairs)) for other, pairs in by_user.items() if other != user
                  for c, r in pairs]
        model = _PeerModel(others, config.peer_l2, config.peer_steps)
        margins = [model.margin(c, r) for c, r in own]
        judged = [m for m in margins if abs(m) > 1e-3]  # the model has an opinion
        out[user] = (sum(m > 0 for m in judged), len(judged))
    return out


def _peers_against(peers: dict[str, tuple[int, int]], config: AnnotatorConfig) -> dict[str, tuple[int, int]]:
    """The users whose peer agreement is below one half beyond chance (95% Wilson upper bound), with
    enough evidence: what the peer check still judges when it cannot read the class's taste."""
    return {user: c for user, c in peers.items() if c[1] >= config.min_evidence and wilson(*c)[2] < 0.5}


def repeat_agreement(checks: Iterable[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in checks:
        out[row["user"]][0] += bool(row["agrees"])
        out[row["user"]][1] += 1
    return {user: (agree, n) for user, (agree, n) in out.items()}


def _smoothed(agree: int, n: int) -> float:
    return (agree + 1) / (n + 2)


# -- capping -------------------------------------------------------------------------------------


def _cap_scales(mass: dict[str, float], cap: float) -> dict[str, float]:
    """Per-user factors <= 1 so that no user holds more than `cap` of the total (or, when fewer
    than 1/cap users hold anything, so that all hold the same)."""
    users = [u for u, m in mass.items() if m > 0]
    if len(users) < 2:
        return {u: 1.0 for u in mass}
    cap = max(cap, 1.0 / len(users))
    capped = dict(mass)
    for _ in range(100):  # water-filling; converges in a few rounds
        total = sum(capped.values())
        over = {u for u in users if capped[u] > cap * total * (1 + 1e-9)}
        if not over:
            break
        # the others keep theirs; the over-cap users share the rest equally up to the cap
        rest = sum(capped[u] for u in users if u not in over)
        level = cap * rest / (1 - cap * len(over)) if cap * len(over) < 1 else min(capped[u] for u in over)
        for u in over:
            capped[u] = min(capped[u], level)
    return {u: (capped[u] / mass[u] if mass[u] else 1.0) for u in mass}


def _thin(demonstrations: list[Demonstration], cap: float) -> tuple[list[Demonstration], dict[str, int]]:
    """Drops a capped user's surplus demonstrations, spread over their conversations (a stable
    hash order), so none holds more than `cap` of the rest."""
    counts = Counter(d.user for d in demonstrations)
    scales = _cap_scales({u: float(n) for u, n in counts.items()}, cap)
    keep = {u: round(counts[u] * scales[u]) for u in counts}
    ordered = sorted(demonstrations, key=lambda d: hashlib.sha256(d.message_id.encode()).hexdigest())
    kept_ids, taken = set(), Counter()
    for d in ordered:
        if taken[d.user] < keep[d.user]:
            taken[d.user] += 1
            kept_ids.add(id(d))
    dropped = {u: counts[u] - taken[u] for u in counts if counts[u] > taken[u]}
    return [d for d in demonstrations if id(d) in kept_ids], dropped


# -- the whole step ------------------------------------------------------------------------------


def weigh_annotators(data: TrainingData, exclusions: list[dict[str, Any]], repeat_checks: list[dict[str, Any]],
                     config: AnnotatorConfig) -> tuple[TrainingData, dict[str, Any]]:
    """(data with exclusions applied, low-agreement users left out, weights and caps set; report)."""
    excluded_users = {e["target"]: e for e in exclusions if e["kind"] == "user"}
    excluded_conversations = {e["target"]: e for e in exclusions if e["kind"] == "conversation"}
    left_out: list[dict[str, Any]] = []

    def keep(item) -> bool:
        return item.user not in excluded_users and item.conversation_id not in excluded_conversations

    for target, e in {**excluded_users, **excluded_conversations}.items():
        kind = e["kind"]
        n = sum(1 for item in [*data.demonstrations, *data.preference_groups]
                if (item.user if kind == "user" else item.conversation_id) == target)
        left_out.append({"kind": kind, "target": pseudonym(target) if kind == "user" else target,
                         "reason": ("excluded by a teacher or an admin" + (f": {e['reason']}" if e["reason"] else "")),
                         "items": n})
    data = replace(data, demonstrations=[d for d in data.demonstrations if keep(d)],
                   preference_groups=[g for g in data.preference_groups if keep(g)],
                   ppo_prompts=[p for p in data.ppo_prompts if keep(p)])
    report: dict[str, Any] = {"config": {"max_user_share": config.max_user_share,
                                         "min_agreement": config.min_agreement,
                                         "min_evidence": config.min_evidence},
                              "users": {}, "left_out": left_out}
    if not config.enabled:
        return data, report

    repeats = repeat_agreement(r for r in repeat_checks if r["user"] not in excluded_users)
    peers = peer_agreement(data.preference_groups, config)
    measured = sorted(_smoothed(*c) for c in peers.values() if c[1] >= config.min_evidence)
    median = measured[len(measured) // 2] if measured else None
    report["peer_check"] = {"median_agreement": None if median is None else round(median, 3),
                            "counted": median is None or median >= config.min_agreement}
    if not report["peer_check"]["counted"]:
        report["peer_check"]["why"] = (f"the peer model predicts the median user's picks {median:.2f} of the time "
                                       f"(< {config.min_agreement:.2f}): it cannot read this taste; only users it "
                                       f"judges against the others beyond chance are left out by it")
        peers = _peers_against(peers, config)
    users = sorted({i.user for i in [*data.demonstrations, *data.preference_groups]})
    weights: dict[str, float] = {}
    for user in users:
        sources = {name: counts for name, counts in (("repeat", repeats.get(user)), ("peers", peers.get(user)))
                   if counts is not None}
        counted = [_smoothed(*c) for c in sources.values() if c[1] >= config.min_evidence]
        agreement = min(counted) if counted else None
        entry: dict[str, Any] = {
            "pairs": sum(len(g.pairs) for g in data.preference_groups if g.user == user),
            "demonstrations": sum(1 for d in data.demonstrations if d.user == user),
            **{f"{name}_agreement": f"{a}/{n}" for name, (a, n) in sources.items()},
            "agreement": None if agreement is None else round(agreement, 3)}
        if agreement is not None and agreement < config.min_agreement:
            weights[user] = 0.0
            entry["left_out"] = (f"agreement {agreement:.2f} < {config.min_agreement:.2f} "
                                 f"({', '.join(f'{k} {a}/{n}' for k, (a, n) in sources.items())})")
            left_out.append({"kind": "user", "target": pseudonym(user), "reason": entry["left_out"],
                             "items": entry["pairs"] + entry["demonstrations"]})
        else:
            # chance (0.5) teaches nothing and perfect weighs 1; unmeasured users get the benefit of
            # the doubt, and the share cap below bounds what that can cost
            weights[user] = 1.0 if agreement is None else max(0.0, 2 * agreement - 1)
        entry["weight"] = round(weights[user], 3)
        report["users"][pseudonym(user)] = entry

    groups = [replace(g, weight=g.weight * weights.get(g.user, 1.0)) for g in data.preference_groups
              if weights.get(g.user, 1.0) > 0]
    mass: dict[str, float] = defaultdict(float)
    for g in groups:
        mass[g.user] += g.weight
    scales = _cap_scales(dict(mass), config.max_user_share)
    groups = [replace(g, weight=g.weight * scales[g.user]) for g in groups]
    demonstrations, dropped = _thin([d for d in data.demonstrations if weights.get(d.user, 1.0) > 0],
                                    config.max_user_share)
    for user in users:
        entry = report["users"][pseudonym(user)]
        if scales.get(user, 1.0) < 1:
            entry["share_scale"] = round(scales[user], 3)
        if dropped.get(user):
            entry["demonstrations_dropped_by_cap"] = dropped[user]
    gone = {u for u, w in weights.items() if w == 0}
    return replace(data, demonstrations=demonstrations, preference_groups=groups,
                   ppo_prompts=[p for p in data.ppo_prompts if p.user not in gone]), report
