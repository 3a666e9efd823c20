"""Retraining that runs by itself: `python launch.py --retrain --watch`.

Every `poll_s` the watcher counts the feedback given since the last cycle started; once there is
`min_new_feedback` of it (settings: `[retrain.watch]`), and the last attempt is at least `min_interval_s` old, it runs one cycle with
the same lock, safety and records as `--retrain` (a cycle that cannot run, say too little data of one
kind, is one line and is tried again only after `min_interval_s`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from app.store import Store
from app.versions import ModelRegistry
from rlhf.cycle import CycleConfig, CycleError, WatchConfig, run_cycle


def watch(store: Store, registry: ModelRegistry, config: CycleConfig, say=print,
          polls: int | None = None, sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.time) -> int:
    """Runs cycles as feedback arrives, `polls` times (None: until interrupted); returns cycles started."""
    settings: WatchConfig = config.watch
    started, last_attempt, n = 0, None, 0
    say(f"watching for {settings.min_new_feedback} new feedback items "
        f"(at most one cycle per {settings.min_interval_s:g} s)")
    while polls is None or n < polls:
        n += 1
        last = store.last_cycle()
        since = last["started_at"] if last else None
        if last is not None:
            begun = datetime.fromisoformat(last["started_at"]).timestamp()
            last_attempt = max(last_attempt or begun, begun)
        new = store.feedback_since(since)
        if new >= settings.min_new_feedback and (last_attempt is None
                                                 or clock() - last_attempt >= settings.min_interval_s):
            last_attempt = clock()
            started += 1
            say(f"{new} new feedback items: starting a cycle")
            try:
                outcome = run_cycle(store, registry, config, say=say)
                say(f"cycle: {outcome.message}")
            except CycleError as exc:
                say(f"cycle could not run: {exc}")
        if polls is None or n < polls:
            sleep(settings.poll_s)
    return started
