"""Active comparisons: which answers a learner is asked to compare, by where a committee of reward
models is least sure of the learner's choice.

A learner's comparison teaches the reward model most where the models that fit the feedback so far
disagree about it (query by committee, Seung et al. 1992; BALD, Houlsby et al. 2011). The committee is
a few bag-of-tokens reward models, each fitted by the cycle on a bootstrap sample of all preference
groups (rlhf/ensemble.py `train_committee`): one weight per vocabulary entry and one per answer token,
so scoring k answers is a gather and a sum, cheap enough for the serving process.

In "active" mode a comparison samples `pool_factor` times as many answers as it shows and shows the k
whose pairs carry the most information about the committee (the BALD score of a pair: the entropy of
the members' mean preference minus the mean of their entropies; high where members are each sure
and disagree). A share of asks (`random_share`) shows k answers of the pool at random, exactly what
"random" mode shows, so the data keeps an unbiased sample of the learners' choices. Every comparison
stores why it was asked (`Asked`), in either mode.

When to ask is the app's too (`offers_comparison`): on a share of a learner's turns (`offer_share`),
never within `offer_gap` turns of the conversation's last comparison, the chat answers the learner's
message with two answers to choose from instead of one, as the learner's own "Compare answers" does.
The share is a fixed budget, not the committee's: before the answers are sampled there is nothing for
it to be unsure about, and sampling a pool on every turn to find out would double every reply's cost.
"""
from __future__ import annotations

import json
import os
import random
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from core.durable import fsync_dir

COMMITTEE_FILE = "committee.safetensors"  # in the models dir, beside the versions: one per class
ASKING_MODES = ("random", "active")


@dataclass
class AskingConfig:
    mode: str = "random"  # "active": the committee chooses what is shown, once there is one
    pool_factor: int = 2  # active: answers sampled for each answer shown
    random_share: float = 0.25  # active: asks shown at random, so the feedback stays an unbiased sample
    # The app asks on its own on this share of a learner's eligible turns (0: only when the learner asks)
    offer_share: float = 0.25
    offer_gap: int = 3  # eligible: at least this many turns since the conversation began or last compared

    def __post_init__(self) -> None:
        if self.mode not in ASKING_MODES:
            raise ValueError(f"asking mode must be one of {', '.join(ASKING_MODES)}, not {self.mode!r}")
        if not isinstance(self.pool_factor, int) or not 1 <= self.pool_factor <= 4:
            raise ValueError(f"pool_factor must be a whole number from 1 to 4, not {self.pool_factor!r}")
        if not 0.0 <= self.random_share <= 1.0:
            raise ValueError(f"random_share must be between 0 and 1, not {self.random_share}")
        if not 0.0 <= self.offer_share <= 1.0:
            raise ValueError(f"offer_share must be between 0 and 1, not {self.offer_share}")
        if not isinstance(self.offer_gap, int) or not 1 <= self.offer_gap <= 100:
            raise ValueError(f"offer_gap must be a whole number from 1 to 100, not {self.offer_gap!r}")


@dataclass(frozen=True)
class Committee:
    """M bag-of-tokens reward models: r_m(y) = sum over the answer's tokens of weights[m, y_t] + length[m] * |y|,
    over its distinct tokens where the members were fitted with binary features (rlhf/bag_of_tokens.py).

    The length term is part of the score here (PPO's reward leaves it out): a learner's choice may
    follow length, and asking is about predicting the choice."""

    weights: torch.Tensor  # (M, V) float32
    length: torch.Tensor  # (M,) float32
    meta: dict[str, Any] = field(default_factory=dict)  # which cycle fitted it, on how many groups
    binary: bool = False  # as the members were fitted: each distinct token once, or every occurrence

    def scores(self, answers: list[list[int]]) -> torch.Tensor:
        """(M, N): each member's score of each answer (token ids; ids past the vocabulary weigh 0)."""
        vocab = self.weights.shape[1]
        rows = []
        for answer in answers:  # per comparison: a gather, no copy of the (M, V) weights
            ids = torch.as_tensor(list(dict.fromkeys(answer)) if self.binary else answer, dtype=torch.long)
            inside = (ids >= 0) & (ids < vocab)
            rows.append((self.weights[:, ids.clamp(0, vocab - 1)] * inside).sum(1) + self.length * len(ids))
        return torch.stack(rows, dim=1) if rows else torch.zeros(len(self.weights), 0)

    def save(self, path: Path | str) -> Path:
        """Written whole or not at all: a temporary file, fsynced, renamed over the old one."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file({"weights": self.weights.contiguous(), "length": self.length.contiguous()}, str(tmp),
                      metadata={"meta": json.dumps(self.meta), "binary": str(self.binary).lower()})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)  # the rename itself survives a power cut
        return path

    @classmethod
    def load(cls, path: Path | str) -> "Committee":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:  # one read: tensors and metadata
            metadata = f.metadata() or {}
            meta = json.loads(metadata.get("meta", "{}"))
            binary = metadata.get("binary", "false") == "true"  # written before binary features: counts
            weights, length = f.get_tensor("weights").float(), f.get_tensor("length").float()
        if weights.dim() != 2 or length.shape != (weights.shape[0],) or weights.shape[0] < 2:
            raise ValueError(f"{path} is not a committee of two or more members")
        return cls(weights, length, meta, binary)


def pair_information(scores: torch.Tensor) -> torch.Tensor:
    """(N, N) BALD score of every pair of answers from members' scores (M, N): the mutual information
    between the learner's choice and which member is right, in nats."""
    p = torch.sigmoid(scores[:, :, None] - scores[:, None, :]).clamp(1e-6, 1 - 1e-6)  # (M, N, N)

    def entropy(q: torch.Tensor) -> torch.Tensor:
        return -(q * q.log() + (1 - q) * (1 - q).log())

    information = entropy(p.mean(0)) - entropy(p).mean(0)
    return information.fill_diagonal_(0.0)


def most_informative(information: torch.Tensor, k: int) -> list[int]:
    """k answers, greedily: the most informative pair, then whichever adds the most information with
    those already chosen."""
    n = information.shape[0]
    information = information.clone().fill_diagonal_(float("-inf"))  # never a pair of one answer with itself
    first = int(information.argmax())
    chosen = [first // n, first % n][: k]
    while len(chosen) < k:
        gains = information[:, chosen].sum(1)
        gains[chosen] = float("-inf")
        chosen.append(int(gains.argmax()))
    return chosen


@dataclass
class Asked:
    """Why a comparison shows what it shows; stored with the comparison."""

    mode: str  # "active": chosen by the committee; "random": as sampled
    why: str
    pool: int  # answers sampled
    information: float | None  # mean BALD score of the shown pairs (None: no committee)
    committee: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_shown(committee: Committee | None, pool: list[list[int]], k: int, config: AskingConfig,
                 rng: random.Random) -> tuple[list[int], Asked]:
    """Which k of the pool's answers (token ids) to show, and why."""
    information = pair_information(committee.scores(pool)) if committee is not None else None

    def asked(mode: str, why: str, shown: list[int]) -> Asked:
        value = None
        if information is not None and len(shown) > 1:
            value = round(float(information[shown][:, shown].sum() / (len(shown) * (len(shown) - 1))), 6)
        return Asked(mode, why, len(pool), value, committee.meta if committee is not None else None)

    # A committee fitted before the out-of-bag check (no "credible" in its meta) is asked as before.
    why = ("random mode" if config.mode == "random" else "no committee yet" if committee is None
           else "pool no larger than the comparison" if len(pool) <= k
           else "the committee is not yet above chance on pairs it did not fit"
           if committee.meta.get("credible") is False else None)
    if why:
        shown = sorted(rng.sample(range(len(pool)), k)) if len(pool) > k else list(range(len(pool)))
        return shown, asked("random", why, shown)
    if rng.random() < config.random_share:
        shown = sorted(rng.sample(range(len(pool)), k))
        return shown, asked("random", f"random share ({config.random_share:.0%} of asks)", shown)
    shown = most_informative(information, k)
    return shown, asked("active", "the committee's most informative answers", shown)


def offers_comparison(turns_since: int, config: AskingConfig, rng: random.Random) -> bool:
    """Whether the learner's next message is answered with a comparison: `turns_since` is how many turns
    the conversation has had since it began or since its last comparison (a skipped one included, so a
    learner who said no is not asked again at once)."""
    return turns_since >= config.offer_gap and rng.random() < config.offer_share


class CommitteeFile:
    """The committee in the models dir, read again whenever the file changes (a cycle wrote a new one);
    a missing or unreadable file means no committee, and asking is random."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._committee: Committee | None = None
        self._lock = threading.Lock()
        self.error: str | None = None

    def get(self) -> Committee | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # a replaced file is a new inode
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._committee, self.error = Committee.load(self.path), None
                except Exception as exc:  # a damaged file must not stop comparisons: ask at random
                    self._committee, self.error = None, f"{type(exc).__name__}: {exc}"
            return self._committee
