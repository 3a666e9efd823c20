"""Which version answers whom: the current version, a canary on a share of learners, and blind arena pairs
between two versions; and the canary's end, decided by those pairs' votes.

A cycle whose version passes the offline gate with [retrain.canary] enabled records a canary (store
`canaries`) instead of switching CURRENT. While it runs, a share of the conversations started after it
answer from it, and a share of two-answer comparisons pair it with the current version, blind and in
random order (the service reveals the versions after the pick). After each vote, `review` asks
core/arena.py's `judge_canary`: not worse -> CURRENT switches to it (under the registry's lock, as a
rollback does), worse or undecided within its budget -> withdrawn. Without a canary, `ArenaConfig.share`
of two-answer comparisons pair the current version with its parent, so the leaderboard keeps rating them.

Nothing here touches a feedback row: a vote is a pick the learner gave, read, never written. The served
version changes only through `ModelRegistry.set_current`, so a crash mid-canary leaves the current
version serving, and the canary, still recorded as running, is judged again after the restart.
"""
from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Callable

from app.engine import GenerationEngine
from app.failpoints import failpoint
from app.store import Store
from app.versions import ModelError, ModelRegistry, RegistryBusy, registry_lock
from core.arena import CanaryConfig, CanaryVerdict, Vote, judge_canary, ratings, style_of

log = logging.getLogger(__name__)
WINNER_OF_CHOICE = {"A": "a", "B": "b", "tie": "tie", "both_bad": "tie"}


@dataclass
class ArenaConfig:
    # Of two-answer comparisons while no canary runs, the share that pairs the current version with its
    # parent (blind), so the versions' ratings keep coming; 0 = only canaries get arena pairs.
    share: float = 0.0
    review_every_s: float = 30.0  # how often traffic re-checks a canary's time budget between votes

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError("arena share must be between 0 and 1")


def votes_from_rows(rows: list[dict]) -> list[Vote]:
    """Store.arena_votes rows as Bradley-Terry votes, each answer's style measured from its text."""
    votes = []
    for row in rows:
        by_label = {c["label"]: c for c in row["candidates"]}
        a, b = by_label.get("A"), by_label.get("B")
        if a is None or b is None or not a["model_version"] or not b["model_version"] \
                or a["model_version"] == b["model_version"] or row["choice"] not in WINNER_OF_CHOICE:
            continue
        votes.append(Vote(a["model_version"], b["model_version"], WINNER_OF_CHOICE[row["choice"]],
                          style_of(a["content"]), style_of(b["content"])))
    return votes


def canary_settings(canary: dict) -> CanaryConfig:
    known = {f.name for f in fields(CanaryConfig)}
    return CanaryConfig(**{k: v for k, v in (canary.get("settings") or {}).items() if k in known})


class Arena:
    """The engines of the versions besides the current one, loaded in the background when first wanted,
    and the canary's state changes. `make_engine(version)` builds an engine pinned to one version."""

    def __init__(self, store: Store, registry: ModelRegistry, engine: GenerationEngine,
                 make_engine: Callable[[str], GenerationEngine], config: ArenaConfig | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store, self.registry, self.engine, self.make_engine = store, registry, engine, make_engine
        self.config = config or ArenaConfig()
        self.rng = rng or random.Random()
        self.clock = clock
        self._engines: dict[str, GenerationEngine] = {}
        self._loading: set[str] = set()
        self._lock = threading.Lock()
        self._last_review = 0.0
        self._judged: tuple | None = None  # (what the votes were, their verdict): see _judge

    # -- who answers -------------------------------------------------------------------------------
    def engine_for(self, conversation: dict) -> GenerationEngine:
        """The canary's engine for a conversation in its share (started after it, by a hash of the two
        ids, so a conversation keeps its version); the current version's otherwise."""
        self.review_if_due()
        canary = self.store.running_canary()
        if canary is None or conversation["created_at"] < canary["started_at"]:
            return self.engine
        bucket = int(hashlib.sha256(f"{canary['id']}:{conversation['id']}".encode()).hexdigest()[:8], 16)
        if bucket / 0xFFFFFFFF >= canary_settings(canary).conversation_share:
            return self.engine
        return self._ready(canary["version"]) or self.engine

    def opponent(self) -> GenerationEngine | None:
        """The engine of the version a two-answer comparison pairs with the current one, or None for a
        comparison of the current version's own answers."""
        self.review_if_due()
        canary = self.store.running_canary()
        if canary is not None:
            share, version = canary_settings(canary).arena_share, canary["version"]
        else:
            share, version = self.config.share, self._parent()
        if not version or version == self.engine.version or self.rng.random() >= share:
            return None
        return self._ready(version)

    def _parent(self) -> str | None:
        try:
            parent = self.registry.meta(self.engine.version).get("parent")
        except (OSError, ValueError):
            return None
        return parent if parent in self.registry.versions() else None

    def _ready(self, version: str) -> GenerationEngine | None:
        """The version's engine if loaded; otherwise starts loading it and returns None (this request
        is served as usual, instead of waiting for a model to load)."""
        with self._lock:
            engine = self._engines.get(version)
            if engine is not None or version in self._loading:
                return engine
            self._loading.add(version)
            for old in [v for v in self._engines if v != version]:  # one version besides the current at a time
                self._retire(self._engines.pop(old))
        threading.Thread(target=self._load, args=(version,), name=f"load-{version}", daemon=True).start()
        return None

    def _load(self, version: str) -> None:
        try:
            engine = self.make_engine(version)
        except (ModelError, OSError, RuntimeError, ValueError):
            log.exception("could not load %s for the arena", version)
            engine = None
        with self._lock:
            self._loading.discard(version)
            if engine is not None:
                self._engines[version] = engine

    @staticmethod
    def _retire(engine: GenerationEngine, grace_s: float = 120.0) -> None:
        """Closes an engine once the replies it is writing are done (or after `grace_s`), in the background."""
        def close_when_idle():
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(engine.load_stats()[k] for k in ("running", "waiting")):
                time.sleep(0.2)
            engine.close()
        threading.Thread(target=close_when_idle, name="retire-engine", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()

    # -- the canary's end --------------------------------------------------------------------------
    def review_if_due(self) -> None:
        if self.clock() - self._last_review >= self.config.review_every_s:
            self.review()

    def review(self) -> dict | None:
        """Judges the running canary on its votes; promotes or withdraws it when they say so. Returns
        {"version", "status", "reason", "verdict"} when this call ended it, else None."""
        self._last_review = self.clock()
        canary = self.store.running_canary()
        if canary is None:
            return None
        current = self.registry.current_or_none()
        if current == canary["version"]:  # switched, then the process stopped before recording it
            return self._end(canary, "promoted", "was already current", None)
        if current != canary["baseline"]:
            return self._end(canary, "withdrawn", f"the served version changed to {current} while it ran", None)
        verdict = self._judge(canary)
        if verdict.decision == "continue":
            return None
        if verdict.decision == "withdraw":
            return self._end(canary, "withdrawn", verdict.reason, verdict.as_dict())
        try:
            with registry_lock(self.registry.root):
                self.registry.set_current(canary["version"])
                failpoint("recording")  # switched, not yet recorded: the next review finds it current
        except RegistryBusy:  # a cycle or a rollback holds the registry: the next vote tries again
            return None
        except (ModelError, OSError) as exc:
            log.error("could not promote canary %s: %s", canary["version"], exc)
            return None
        return self._end(canary, "promoted", verdict.reason, verdict.as_dict())

    def _judge(self, canary: dict) -> CanaryVerdict:
        """judge_canary on the canary's votes so far; the bootstrap fit is redone only when a vote came,
        went (a deletion) or the time budget ran out since the last call."""
        rows = self.store.arena_votes(since=canary["started_at"])
        settings = canary_settings(canary)
        started = datetime.fromisoformat(canary["started_at"])
        age_hours = (datetime.fromtimestamp(self.clock(), timezone.utc) - started).total_seconds() / 3600
        key = (canary["id"], len(rows), rows[-1]["comparison_id"] if rows else None, age_hours >= settings.max_hours)
        if self._judged is None or self._judged[0] != key:
            verdict = judge_canary(votes_from_rows(rows), canary["version"], canary["baseline"], settings, age_hours)
            self._judged = (key, verdict)
        return self._judged[1]

    def _end(self, canary: dict, status: str, reason: str, verdict: dict | None) -> dict | None:
        if not self.store.end_canary(canary["id"], status, reason, verdict):
            return None  # another process ended it first
        self.store.update_lineage(canary["version"], {"canary": {
            "baseline": canary["baseline"], "started_at": canary["started_at"], "status": status,
            "reason": reason, "verdict": verdict}})
        log.info("canary %s %s: %s", canary["version"], status, reason)
        with self._lock:  # its engine is not wanted any more (promoted: the main engine switches to it)
            engine = self._engines.pop(canary["version"], None)
        if engine is not None:
            self._retire(engine)
        return {"version": canary["version"], "status": status, "reason": reason, "verdict": verdict}

    # -- what the dashboard and /status show ----------------------------------------------------
    def summary(self) -> dict | None:
        """The running canary with its votes so far, or None."""
        canary = self.store.running_canary()
        if canary is None:
            return None
        verdict = self._judge(canary)
        return {"version": canary["version"], "baseline": canary["baseline"], "started_at": canary["started_at"],
                "settings": asdict(canary_settings(canary)), "votes": verdict.votes, "win_rate": round(verdict.win_rate, 4),
                "interval": [round(verdict.low, 4), round(verdict.high, 4)]}

    def leaderboard(self, style_control: bool) -> list[dict]:
        """Every version with arena votes: Elo-scale rating and 95% bootstrap interval."""
        votes = votes_from_rows(self.store.arena_votes())
        if len({v for vote in votes for v in (vote.a, vote.b)}) < 2:
            return []
        board = ratings(votes, style_control=style_control, bootstrap_samples=500)
        counts = {v: sum(v in (vote.a, vote.b) for vote in votes) for v in board.elo}
        return [{**row, "votes": counts[row["version"]]} for row in board.leaderboard()]
