"""One retraining cycle on the embedded model, timed per stage, on copies of a DB and models dir.

    python bench/bench_cycle.py --db conversations.db --models-dir models [--config FILE]

Reports per stage: wall time and peak memory (RSS, and GPU memory on a GPU); for PPO also episodes/s,
generation tokens/s and the share of time spent generating vs training (from the cycle's own PPO log).
Feedback for it can come from `bench/learner.py` against a running app.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--config", type=Path)
    args = ap.parse_args()

    import torch

    from app.store import Store
    from app.versions import ModelRegistry
    from rlhf.cli import retrain_config
    from rlhf.cycle import run_cycle

    work = Path(tempfile.mkdtemp(prefix="bench-cycle-"))
    shutil.copy(args.db, work / "c.db")
    shutil.copytree(args.models_dir, work / "models", ignore=shutil.ignore_patterns(".retrain.lock", "cycles"))
    config = retrain_config(args.config)
    started = time.perf_counter()
    with Store(work / "c.db") as store:
        outcome = run_cycle(store, ModelRegistry(work / "models"), config)
        cycle = store.last_cycle()
    total = time.perf_counter() - started
    metrics = cycle["metrics"]
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ncycle on {device}: {outcome.status} — {outcome.message}")
    if gpu:
        print(f"PPO bf16 autocast: {config.ppo.use_bf16()}; GPU peak allocated "
              f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB, reserved {torch.cuda.max_memory_reserved() / 2**20:.0f} MiB")
    print(f"data: train {metrics.get('train')}, held out {metrics.get('heldout')}")
    # Peaks are the process's so far at the end of each stage (RSS; GPU memory allocated by torch).
    print(f"{'stage':10s} {'seconds':>8s} {'peak RSS MiB':>13s}" + (f" {'peak GPU MiB':>13s}" if gpu else ""))
    for name, entry in metrics.get("stages", {}).items():
        print(f"{name:10s} {entry['seconds']:8.1f} {entry['peak_rss_mib']:13d}"
              + (f" {entry.get('peak_gpu_mib', 0):13d}" if gpu else ""))
    print(f"{'total':10s} {total:8.1f}")
    history_path = work / "models" / "cycles" / f"{cycle['id']:04d}" / "ppo_history.jsonl"
    if history_path.exists():
        history = [h for h in map(json.loads, history_path.read_text().splitlines()) if "score" in h]
        gen = sum(h["gen_seconds"] for h in history)
        train = sum(h["train_seconds"] for h in history)
        episodes = history[-1]["episodes"]
        tokens = sum(h["answer_length"] * config.ppo.rollout_batch_size for h in history)
        print(f"PPO: {episodes} episodes in {gen + train:.0f}s = {episodes / (gen + train):.2f} episodes/s; "
              f"generation {tokens / gen:.1f} tokens/s; time share generation {gen / (gen + train):.0%} "
              f"vs training {train / (gen + train):.0%}")
        print(f"PPO first -> last update: score {history[0]['score']:+.3f} -> {history[-1]['score']:+.3f}, "
              f"KL {history[0]['kl']:.2f} -> {history[-1]['kl']:.2f}")
    rm = metrics.get("reward", {})
    print(f"reward model: held-out accuracy {rm.get('heldout_accuracy')} on {rm.get('heldout_pairs')} pairs, "
          f"length correlation {rm.get('length_correlation')}")
    print(f"gate: {json.dumps(metrics.get('gate', {}), default=str)}")
    print(f"report and logs: {work / 'models' / 'cycles'}")


if __name__ == "__main__":
    main()
