"""One retraining cycle on the embedded model, with the settings of before and the defaults of now, side by side.

    python bench/bench_cycle.py --db conversations.db --models-dir models [--config FILE]
        [--columns before now now-fp32]

Each column runs the same cycle on its own copies of the DB and the models dir, in its own process (so
each peak RSS is its own), one after the other. "before": the settings the cycle had before the machine's
precision plan, merged rollouts and the shared prefix cache (fp32 on a CPU, bf16 autocast for SFT and PPO
on a GPU; rollouts and gate samples from the unmerged trained model, each answer running the system turn
again; the gate's samples 16 at a time, its scores and KL in the models' dtype). "now": the defaults.
"now-fp32" (asked for by name): the defaults as a CPU without bf16 instructions
runs them (TUTOR_PRECISION=fp32), so that what merged rollouts and the shared prefix give alone shows. Any
`--config` file applies to every column.

Reports per stage wall time and peak memory (RSS, and GPU memory on a GPU); for PPO also episodes/s,
generation tokens/s and generation vs training time (from the cycle's own PPO log); the gate's verdict and
its held-out gain with the 95% interval, and whether the columns agree within it. Feedback can come from
`bench/learner.py` against a running app.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["before", "now", "now-fp32"]
sys.path.insert(0, str(ROOT))


def before_settings(cuda: bool) -> tuple[dict, str]:
    """The `[retrain]` overrides and the TUTOR_PRECISION that reproduce the settings of before on this machine."""
    return ({"sft": {"bf16": cuda}, "reward": {"bf16": False},
             "ppo": {"bf16": cuda, "merged_rollouts": False, "prefix_cache": False, "token_draw": "multinomial"},
             "gate": {"precision": "bf16" if cuda else "fp32", "prefix_cache": False, "bf16": cuda, "batch_size": 16,
                      "token_draw": "multinomial"}},
            "bf16" if cuda else "fp32")


def column_precision(column: str, cuda: bool) -> str | None:
    """The TUTOR_PRECISION a column's process runs under; None: the machine's own plan."""
    return {"before": before_settings(cuda)[1], "now-fp32": "fp32"}.get(column)


def run_column(args) -> None:
    """One cycle in this process; its figures as JSON in args.out."""
    import torch

    from core.settings import merge
    from app.store import Store
    from app.versions import ModelRegistry
    from rlhf.cli import retrain_config
    from rlhf.cycle import run_cycle

    work = Path(tempfile.mkdtemp(prefix=f"bench-cycle-{args.column}-"))
    shutil.copy(args.db, work / "c.db")
    shutil.copytree(args.models_dir, work / "models", ignore=shutil.ignore_patterns(".retrain.lock", "cycles"))
    config = retrain_config(args.config)
    if args.column == "before":
        config = merge(config, before_settings(torch.cuda.is_available())[0], "retrain")
    started = time.perf_counter()
    with Store(work / "c.db") as store:
        outcome = run_cycle(store, ModelRegistry(work / "models"), config)
        cycle = store.last_cycle()
    total = time.perf_counter() - started
    metrics = cycle["metrics"]
    result = {"status": outcome.status, "message": outcome.message, "total_seconds": total,
              "stages": metrics.get("stages", {}), "train": metrics.get("train"), "heldout": metrics.get("heldout"),
              "precision": metrics.get("precision", {}).get("summary"), "gate": metrics.get("gate", {}),
              "reward": metrics.get("reward", {}), "work": str(work)}
    if torch.cuda.is_available():
        result["device"] = torch.cuda.get_device_name()
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["device"] = f"CPU ({torch.get_num_threads()} threads)"
    history_path = work / "models" / "cycles" / f"{cycle['id']:04d}" / "ppo_history.jsonl"
    if history_path.exists():
        history = [h for h in map(json.loads, history_path.read_text().splitlines()) if "score" in h]
        gen = sum(h["gen_seconds"] for h in history)
        train = sum(h["train_seconds"] for h in history)
        tokens = sum(h["answer_length"] * config.ppo.rollout_batch_size for h in history)
        result["ppo"] = {"episodes": history[-1]["episodes"], "updates": len(history), "gen_seconds": gen,
                         "train_seconds": train, "episodes_per_s": history[-1]["episodes"] / (gen + train),
                         "gen_tokens_per_s": tokens / gen, "score": [history[0]["score"], history[-1]["score"]],
                         "kl": [history[0]["kl"], history[-1]["kl"]]}
    Path(args.out).write_text(json.dumps(result, default=str))


def _cell(value, fmt: str) -> str:
    return format("-", ">" + fmt.split(".")[0]) if value is None else format(value, fmt)


def report(results: dict[str, dict]) -> None:
    names = list(results)
    first = results[names[0]]
    print(f"\ncycle on {first['device']}; data: train {first['train']}, held out {first['heldout']}")
    for name, r in results.items():
        print(f"{name}: {r['status']} — {r['message']}\n   {r['precision']}")
    head = f"{'stage':14s}" + "".join(f" {n + ' s':>13s} {n + ' MiB':>14s}" for n in names)
    head += "".join(f" {names[0] + '/' + n:>15s}" for n in names[1:])  # each column's speed-up on the first
    print("\n" + head)
    stages = list(dict.fromkeys(s for r in results.values() for s in r["stages"]))
    rows = [(s, [r["stages"].get(s, {}).get("seconds") for r in results.values()],
             [r["stages"].get(s, {}).get("peak_rss_mib") for r in results.values()]) for s in stages]
    for label, key in (("PPO generate", "gen_seconds"), ("PPO train", "train_seconds")):
        rows.append((label, [r.get("ppo", {}).get(key) for r in results.values()], [None] * len(names)))
    rows.append(("whole cycle", [r["total_seconds"] for r in results.values()],
                 [max((e["peak_rss_mib"] for e in r["stages"].values()), default=None) for r in results.values()]))
    for label, seconds, rss in rows:
        line = f"{label:14s}" + "".join(f" {_cell(s, '13.1f')} {_cell(m, '14.0f')}" for s, m in zip(seconds, rss))
        line += "".join(f" {seconds[0] / s:14.2f}x" if seconds[0] is not None and s else f" {'-':>15s}"
                        for s in seconds[1:])
        print(line)
    for name, r in results.items():
        ppo = r.get("ppo")
        if ppo:
            print(f"PPO {name}: {ppo['episodes']} episodes in {ppo['gen_seconds'] + ppo['train_seconds']:.0f}s = "
                  f"{ppo['episodes_per_s']:.3f} episodes/s; generation {ppo['gen_tokens_per_s']:.1f} tokens/s, "
                  f"{ppo['gen_seconds'] / (ppo['gen_seconds'] + ppo['train_seconds']):.0%} of PPO; score "
                  f"{ppo['score'][0]:+.3f} -> {ppo['score'][1]:+.3f}, KL {ppo['kl'][0]:.2f} -> {ppo['kl'][1]:.2f}")
        if "gpu_peak_mib" in r:
            print(f"GPU peak allocated {name}: {r['gpu_peak_mib']:.0f} MiB")
    gains = {}
    for name, r in results.items():
        g = r["gate"]
        if "reward_gain_length_controlled" in g:
            gains[name] = (g["reward_gain_length_controlled"], *g["reward_gain_ci95"])
            print(f"gate {name}: {r['status']}; gain {gains[name][0]:+.3f}, 95% CI [{gains[name][1]:+.3f}, "
                  f"{gains[name][2]:+.3f}]; KL {g['kl_to_reference']:.2f}; length {g['length_current']:.0f} -> "
                  f"{g['length_new']:.0f}; regression {g['regression_accuracy_current']:.0%} -> "
                  f"{g['regression_accuracy_new']:.0%}")
    if len(results) > 1:
        first = names[0]
        for name in names[1:]:
            same = results[name]["status"] == results[first]["status"]
            line = f"{first} vs {name}: verdicts {'the same' if same else 'DIFFER'}"
            if first in gains and name in gains:
                (a, a_lo, a_hi), (b, b_lo, b_hi) = gains[first], gains[name]
                line += f"; each gain inside the other's interval: {a_lo <= b <= a_hi and b_lo <= a <= b_hi}"
            print(line)
    for name, r in results.items():
        print(f"{name} report and logs: {r['work']}/models/cycles")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--columns", nargs="+", choices=COLUMNS, default=["before", "now"])
    ap.add_argument("--column", choices=COLUMNS, help=argparse.SUPPRESS)  # one column, in a child
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.db.is_file():
        ap.error(f"--db {args.db}: no such file (bench/cycle_feedback.py builds the documented one)")
    if args.column:
        run_column(args)
        return
    import torch

    from app.embedded import ensure_base
    from app.versions import ModelRegistry

    ensure_base(ModelRegistry(args.models_dir))  # as `launch.py --retrain` does: a new models dir gets v0000
    results = {}
    for column in args.columns:
        out = Path(tempfile.mkstemp(prefix=f"bench-cycle-{column}-", suffix=".json")[1])
        env = {k: v for k, v in os.environ.items() if k != "TUTOR_PRECISION"}  # "now": the machine's plan
        forced = column_precision(column, torch.cuda.is_available())
        if forced:
            env["TUTOR_PRECISION"] = forced
        command = [sys.executable, __file__, "--db", str(args.db), "--models-dir", str(args.models_dir),
                   "--column", column, "--out", str(out)] + (["--config", str(args.config)] if args.config else [])
        print(f"== {column} ==", flush=True)
        subprocess.run(command, env=env, check=True)
        results[column] = json.loads(out.read_text())
        print(f"{column}: figures in {out}", flush=True)
    report(results)


if __name__ == "__main__":
    main()
