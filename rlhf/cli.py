"""`launch.py --retrain / --export / --rollback`: the offline commands, each ending in one line."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from core.settings import merge, read_config_file


# Settings an answer has wherever it is sampled (core/chat_format.py): the served ones, unless a
# [retrain.ppo] or [retrain.gate] table sets its own.
ANSWER_SETTINGS = ("max_new_tokens", "temperature")


def retrain_config(path: Path | None):
    from rlhf.cycle import CycleConfig

    config = CycleConfig()
    if path:
        values = read_config_file(path)
        retrain = values.get("retrain", {})
        served = {k: v for k, v in ((values.get("serve") or {}).get("sampling") or {}).items() if k in ANSWER_SETTINGS}
        if served and isinstance(retrain, dict):
            retrain = {**retrain, **{table: {**served, **(retrain.get(table) or {})} for table in ("ppo", "gate")
                                     if isinstance(retrain.get(table) or {}, dict)}}
        config = merge(config, retrain, "retrain")
    return config


def run_offline(args) -> int:
    from app.embedded import ensure_base
    from app.store import Store
    from app.versions import ModelError, ModelRegistry
    from rlhf.cycle import CycleError, rollback, run_cycle
    from rlhf.annotators import weigh_annotators
    from rlhf.data import NotEnoughData, collect, export_jsonl

    db = args.db or Path("conversations.db")
    registry = ModelRegistry(args.models_dir or Path("models"))
    try:
        if args.rollback:
            print(rollback(registry, args.rollback))
            return 0
        if not db.exists():
            raise CycleError(f"no feedback database at {db}; start the app and collect feedback first")
        with Store(db) as store:
            if args.export:
                # what a cycle would train on: exclusions, agreement weights and caps applied
                data, _ = weigh_annotators(collect(store), store.training_exclusions(), store.repeat_checks(),
                                           retrain_config(args.config).annotators)
                paths = export_jsonl(data, args.export)
                print(f"wrote {', '.join(str(p) for p in paths.values())}")
                return 0
            config = retrain_config(args.config)
            if config.niceness > 0:
                os.nice(min(19, config.niceness))
            ensure_base(registry, args.model)
            if getattr(args, "watch", False):
                from rlhf.watch import watch

                watch(store, registry, config)
                return 0
            for n in range(args.cycles):
                outcome = run_cycle(store, registry, config)
                print(f"cycle {n + 1}/{args.cycles}: {outcome.message}")
                if outcome.status == "nothing_new":
                    break
        return 0
    except (CycleError, NotEnoughData, ModelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the served version and all feedback are unchanged", file=sys.stderr)
        return 130
