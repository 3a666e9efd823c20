"""Per-user rate limits and daily caps, so that no account can flood the tutor or its training data.

A rate limit (per minute) is a sliding window in memory: it only has to slow a burst down. A daily
cap counts the user's rows in the database over the last 24 hours, so a restart does not reset it.
Both are checked after a request's input is validated and before any work or write.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from app.store import ACTIVITY_KINDS, Store


def _per_minute() -> dict[str, int]:
    return {"conversation": 10, "chat": 20, "compare": 10, "pick": 20, "rate": 40, "rewrite": 10, "recheck": 10}


def _per_day() -> dict[str, int]:
    return {"conversation": 200, "chat": 1000, "compare": 300, "pick": 300, "rate": 1000, "rewrite": 200,
            "recheck": 100}


@dataclass
class QuotaConfig:
    enabled: bool = True
    per_minute: dict[str, int] = field(default_factory=_per_minute)
    per_day: dict[str, int] = field(default_factory=_per_day)

    def __post_init__(self) -> None:
        for name in ("per_minute", "per_day"):
            unknown = set(getattr(self, name)) - set(ACTIVITY_KINDS)
            if unknown:
                raise ValueError(f"quotas.{name}: unknown kind(s) {', '.join(sorted(unknown))} "
                                 f"(known: {', '.join(ACTIVITY_KINDS)})")


class QuotaExceeded(Exception):
    """The message says which limit was reached and when to try again."""


NOUNS = {"conversation": "new conversations", "chat": "messages", "compare": "comparisons", "pick": "picks",
         "rate": "ratings", "rewrite": "rewrites", "recheck": "repeat answers"}


class Quotas:
    def __init__(self, store: Store, config: QuotaConfig | None = None, clock=time.monotonic) -> None:
        self.store, self.config, self.clock = store, config or QuotaConfig(), clock
        self._recent: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def spend(self, user: str, kind: str) -> None:
        """Counts one `kind` action of `user`, or raises QuotaExceeded and counts nothing."""
        self._take(user, kind, count=True)

    def refund(self, user: str, kind: str) -> None:
        """Takes back the last `kind` action counted for `user`: one the tutor could not serve (busy) is
        not the learner's to pay for. Daily caps count stored rows, and a refused action stores none."""
        with self._lock:
            recent = self._recent.get((user, kind))
            if recent:
                recent.pop()

    def allows(self, user: str, kind: str) -> bool:
        """Whether one `kind` action of `user` would be allowed now; counts nothing (the app asks this
        before it offers a comparison, so that a learner whose comparisons are spent just gets an answer)."""
        try:
            self._take(user, kind, count=False)
        except QuotaExceeded:
            return False
        return True

    def _take(self, user: str, kind: str, count: bool) -> None:
        if not self.config.enabled:
            return
        per_day = self.config.per_day.get(kind)
        if per_day is not None:
            since = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
            if self.store.activity_since(user, since)[kind] >= per_day:
                raise QuotaExceeded(f"you reached today's limit of {per_day} {NOUNS[kind]}; "
                                    "please come back tomorrow")
        per_minute = self.config.per_minute.get(kind)
        if per_minute is None:
            return
        with self._lock:
            now = self.clock()
            recent = self._recent.setdefault((user, kind), deque())
            while recent and now - recent[0] >= 60.0:
                recent.popleft()
            if len(recent) >= per_minute:
                wait = int(60.0 - (now - recent[0])) + 1
                raise QuotaExceeded(f"too many {NOUNS[kind]} in a minute (limit {per_minute}); "
                                    f"try again in {wait} s")
            if count:
                recent.append(now)
