"""The engine's first prefill of a burst beside a web server's Python work: in a thread of the same process
(sharing the GIL, as Gradio's event loop and request workers share it with the decode thread today) and in
another process (as an engine in its own process would see it), against the prefill alone, in one run.

    python bench/bench_contention.py [--models-dir /tmp/bench-models] [--duty 0.3 0.6] [--rounds 12]

The prefill is one learner's first turn after the cached system turn (a burst's first prefill, which the
rest of the burst waits for). The work beside it is pure Python, `duty` of every 10 ms period busy and the
rest asleep, like a server handling requests. Each round times the prefill alone, beside the thread and
beside the process (median of a few prefills each), in turn; the ratios come with their 95% bootstrap
interval over the rounds, and peak memory.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PERIOD_S = 0.010
QUESTION = "How do plants make their food?"


def busy(run, stop, duty: float) -> None:
    """Python work for `duty` of each period while `run` is set, until `stop` is set."""
    while not stop.is_set():
        if not run.wait(timeout=0.05):
            continue
        end = time.perf_counter() + duty * PERIOD_S
        count = 0
        while time.perf_counter() < end:
            count += 1
        time.sleep((1 - duty) * PERIOD_S)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-models")
    ap.add_argument("--duty", type=float, nargs="+", default=[0.3, 0.6], help="busy share of each 10 ms period")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5, help="prefills per measurement (their median is kept)")
    args = ap.parse_args()

    import torch

    from app.embedded import ensure_base
    from app.versions import ModelRegistry
    from bench.bench_serving import speedup_interval
    from core.chat_format import TUTOR_SYSTEM_PROMPT, generation_prompt_ids
    from core.precision import inference_dtype
    from core.prefix_cache import PrefixCache, prefill, system_prefix_ids

    registry = ModelRegistry(args.models_dir)
    ensure_base(registry)
    policy = registry.load(registry.current_version())
    model, tokenizer = policy.model.to(inference_dtype("auto")), policy.tokenizer
    torch.set_grad_enabled(False)
    prefix = PrefixCache(model, system_prefix_ids(tokenizer, TUTOR_SYSTEM_PROMPT))
    row = generation_prompt_ids(tokenizer, [{"role": "system", "content": TUTOR_SYSTEM_PROMPT},
                                            {"role": "user", "content": QUESTION}])
    pad = tokenizer.pad_token_id or 0
    print(f"machine: {multiprocessing.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()};"
          f" weights {model.dtype}; one row of {len(row) - len(prefix)} tokens after the cached system turn")

    def timed() -> float:
        took = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            prefill(model, [row], pad, prefix)
            took.append(time.perf_counter() - start)
        return statistics.median(took)

    for _ in range(3):  # warm-up
        timed()
    context = multiprocessing.get_context("spawn")  # a fork would copy the model and torch's thread state
    for duty in args.duty:
        stop_thread, run_thread = threading.Event(), threading.Event()
        stop_process, run_process = context.Event(), context.Event()
        thread = threading.Thread(target=busy, args=(run_thread, stop_thread, duty), daemon=True)
        process = context.Process(target=busy, args=(run_process, stop_process, duty), daemon=True)
        thread.start()
        process.start()
        took = {"alone": [], "thread": [], "process": []}
        try:
            for round_ in range(args.rounds):
                order = ["alone", "thread", "process"]
                for where in order[round_ % 3:] + order[:round_ % 3]:
                    switch = {"thread": run_thread, "process": run_process}.get(where)
                    if switch is not None:
                        switch.set()
                        time.sleep(0.05)  # the worker is in its rhythm before the prefill starts
                    took[where].append(timed())
                    if switch is not None:
                        switch.clear()
                        time.sleep(0.05)
        finally:
            stop_thread.set()
            stop_process.set()
            thread.join()
            process.join(timeout=10)
        ms = {where: statistics.median(t) * 1000 for where, t in took.items()}

        def ratio(slow: str, fast: str) -> str:
            return "x{:.2f} [{:.2f}, {:.2f}]".format(*speedup_interval(took[slow], took[fast]))

        print(f"busy {duty:.0%} of each 10 ms, {args.rounds} rounds: prefill alone {ms['alone']:.0f} ms, beside a "
              f"thread {ms['thread']:.0f} ms, beside a process {ms['process']:.0f} ms; thread / process "
              f"{ratio('thread', 'process')}, thread / alone {ratio('thread', 'alone')}, process / alone "
              f"{ratio('process', 'alone')}")
    print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS")


if __name__ == "__main__":
    main()
