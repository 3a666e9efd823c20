"""Load: simulated learners chat, compare, rate and rewrite while a retrain runs and a new version is promoted.

    python bench/bench_load.py                      # 20 learners, 10 minutes, the embedded model
    python bench/bench_load.py --learners 4 --minutes 2 --model path/to/tiny   # a quick look

The app runs in its own process on a loopback port; each learner is a thread with its own
`gradio_client` session, bounded in time (`--minutes`) and in requests. At `--retrain-at` (a share of the
run) `launch.py --retrain` starts on feedback seeded into the DB beforehand (rubric-consistent picks on
the prompt set's training part), so a whole cycle loads the same two cores as the learners. At
`--promote-at` a new version is promoted the way a cycle promotes one (`write_version`, then the
`CURRENT` switch, under the cycle's lock): a copy of the served policy, so that a swap happens mid-way
whatever the retrain's gate decides. If the retrain promotes first, its version is the one measured; if
it still holds the lock at `--promote-at`, the copy waits for it (the retrain's verdict is reported).

Reported: requests by outcome (served / clear "busy" / other clear refusal / error), every acknowledged
feedback item looked up in the DB afterwards (target: none lost), time to first token and inter-token
latency p50/p95 before, during (from the promotion until the new version serves plus 30 s) and after the
promotion, and the server's memory over time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.learner import load_prompt_set  # noqa: E402
from core.net import free_port  # noqa: E402

RETRAIN_SETTINGS = """
# bench/bench_load.py's retrain: a whole cycle, sized to finish within the run on a small CPU.
[retrain]
min_pairs = 20
skip_if_nothing_new = false
[retrain.reward]
min_heldout_accuracy = 0.0
[retrain.ppo]
total_episodes = 64
max_new_tokens = 48
[retrain.gate]
max_new_tokens = 48
samples_per_prompt = 1
"""
SERVE_SETTINGS = "[serve.sampling]\nmax_new_tokens = {tokens}\n"
REASONS = ("clear", "good example", "too long", "unclear")


@dataclass
class Log:
    """What every learner saw, shared by the threads (appends are atomic in CPython)."""
    outcomes: Counter = field(default_factory=Counter)
    acknowledged: list = field(default_factory=list)  # (kind, id, detail)
    first_tokens: list = field(default_factory=list)  # (time, seconds)
    gaps: list = field(default_factory=list)  # (time, seconds per token between two chunks)
    errors: list = field(default_factory=list)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def outcome_of(exc: Exception) -> str:
    from gradio_client.exceptions import AppError

    if isinstance(exc, AppError):
        return "busy" if "busy" in str(exc) else "refused"
    return "error"


def learner(url: str, index: int, prompts, deadline: float, max_requests: int, think: float, tokenizer,
            log: Log) -> None:
    from gradio_client import Client

    rng = random.Random(index)
    client = Client(url, verbose=False)

    def pause() -> None:
        if think:
            time.sleep(min(max(0.0, deadline - time.time()), think * rng.uniform(0.5, 1.5)))

    def call(kind: str, *args, api_name: str):
        pause()
        try:
            result = client.predict(*args, api_name=api_name)
            log.outcomes[(kind, "served")] += 1
            return result
        except Exception as exc:  # noqa: BLE001 - every outcome is counted, none stops the learner
            log.outcomes[(kind, outcome_of(exc))] += 1
            if outcome_of(exc) == "error":
                log.errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
            return None

    def chat(conversation: str, message: str):
        pause()
        start, last_at, last_tokens, chunk = time.time(), None, 0, None
        try:
            for chunk in client.submit(conversation, message, api_name="/chat"):
                now = time.time()
                tokens = len(tokenizer(chunk["text"], add_special_tokens=False)["input_ids"])
                if last_at is None:
                    log.first_tokens.append((now, now - start))
                elif tokens > last_tokens:
                    log.gaps.append((now, (now - last_at) / (tokens - last_tokens)))
                last_at, last_tokens = now, tokens
            log.outcomes[("chat", "served")] += 1
            return chunk
        except Exception as exc:  # noqa: BLE001
            log.outcomes[("chat", outcome_of(exc))] += 1
            if outcome_of(exc) == "error":
                log.errors.append(f"chat: {type(exc).__name__}: {str(exc)[:200]}")
            return None

    try:
        requests = 0
        while time.time() < deadline and requests < max_requests:
            prompt = rng.choice(prompts)
            made = call("new_conversation", f"learner-{index}", "chat", api_name="/new_conversation")
            requests += 1
            if not made:
                time.sleep(1)
                continue
            conversation = made["conversation_id"]
            reply = chat(conversation, prompt.opener)
            requests += 1
            if not reply or time.time() > deadline:
                continue
            if rng.random() < 0.5:
                rating = rng.choice(["up", "down"])
                if call("rate", reply["message_id"], rating, rng.choice(REASONS), api_name="/rate"):
                    log.acknowledged.append(("rating", reply["message_id"], rating))
                requests += 1
            if rng.random() < 0.15:
                text = reply["text"][:300] + " For example, think of a pizza cut into equal slices."
                if call("rewrite", reply["message_id"], text, api_name="/rewrite"):
                    log.acknowledged.append(("rewrite", reply["message_id"], text))
                requests += 1
            if rng.random() < 0.4 and time.time() < deadline:
                compared = call("compare", conversation, prompt.follow_up or "Can you show me an example?", 2,
                                api_name="/compare")
                requests += 1
                if compared:
                    choice = rng.choice(["A", "B"])
                    if call("pick", compared["comparison_id"], choice, api_name="/pick"):
                        log.acknowledged.append(("pick", compared["comparison_id"], choice))
                    requests += 1
    finally:
        client.close()


def seed_feedback(db: Path, prompts, n: int) -> None:
    """Rubric-consistent picks (the answer with an example wins) for the retrain to learn from, spread
    over 8 accounts: a cycle caps any one user's share of the pairs (rlhf/annotators.py)."""
    from app.store import Store
    from core.chat_format import TUTOR_SYSTEM_PROMPT

    rng = random.Random(0)
    with Store(db) as store:
        for i in range(n):
            prompt = prompts[i % len(prompts)]
            conversation = store.new_conversation(f"seeded-{i % 8}", "chat", TUTOR_SYSTEM_PROMPT)
            context = [{"role": "system", "content": TUTOR_SYSTEM_PROMPT}, {"role": "user", "content": prompt.opener}]
            good = f"Let's look at an example: {prompt.keywords[0] if prompt.keywords else 'this'} step by step."
            plain = "That is a good question. Think about it and try again."
            texts = [good, plain]
            rng.shuffle(texts)
            comparison, _ = store.add_comparison(conversation, prompt.opener, context,
                                                 [{"text": t, "model_version": "v0000"} for t in texts])
            store.decide_comparison(comparison, "A" if texts[0] == good else "B")


def promote_copy(models_dir: Path) -> str | None:
    """A new version the way a cycle writes one (files complete under a temporary name, renamed, then
    CURRENT), under the cycle's lock; None while a retrain holds it."""
    from app.versions import ModelRegistry
    from rlhf.cycle import CycleError, retrain_lock

    registry = ModelRegistry(models_dir)
    try:
        with retrain_lock(models_dir):
            return _write_copy(registry)
    except CycleError:
        return None


def _write_copy(registry) -> str:
    current = registry.current_version()
    policy = registry.load(current)
    version = registry.next_version()
    registry.write_version(version, policy.model, policy.tokenizer,
                           {"parent": current, "kind": "copy", "source": "bench_load promotion"})
    registry.set_current(version)
    return version


def lost_feedback(db: Path, acknowledged: list) -> list:
    with sqlite3.connect(db) as con:
        lost = []
        for kind, item, detail in acknowledged:
            if kind == "rating":
                found = con.execute("select 1 from ratings where message_id = ? and rating = ?", [item, detail]).fetchone()
            elif kind == "rewrite":
                found = con.execute("select 1 from rewrites where message_id = ? and text = ?", [item, detail]).fetchone()
            else:
                found = con.execute("select 1 from comparison_picks where comparison_id = ? and choice = ?",
                                    [item, detail]).fetchone()
            if not found:
                lost.append((kind, item))
        return lost


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    return f"p50 {statistics.median(values) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--learners", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=400, help="per learner")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--think", type=float, default=8.0,
                    help="seconds a learner reads and types between requests (0.5x to 1.5x at random); 0: none")
    ap.add_argument("--promote-at", type=float, default=0.25, help="share of the run")
    ap.add_argument("--retrain-at", type=float, default=0.3,
                    help="share of the run (after the promotion, whose lock it would hold); negative: no retrain")
    ap.add_argument("--seeded", type=int, default=80, help="comparisons seeded for the retrain")
    ap.add_argument("--model", type=Path, default=None, help="a policy directory instead of the embedded model")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    from gradio_client import Client
    from transformers import AutoTokenizer

    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, also into a file

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    db, models = work / "conversations.db", work / "models"
    (work / "serve.toml").write_text(SERVE_SETTINGS.format(tokens=args.max_new_tokens))
    (work / "retrain.toml").write_text(RETRAIN_SETTINGS)
    prompts = load_prompt_set(split="train")
    seed_feedback(db, prompts, args.seeded)
    model_args = ["--model", str(args.model)] if args.model else []
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--port", str(port), "--db", str(db),
                               "--models-dir", str(models), "--config", str(work / "serve.toml"), *model_args],
                              cwd=ROOT, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT)
    retrain = None
    try:
        for _ in range(600):
            try:
                Client(url, verbose=False).close()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if server.poll() is not None:
                    raise SystemExit(f"the server exited; see {work / 'server.log'}")
                time.sleep(0.5)
        from app.versions import ModelRegistry

        registry = ModelRegistry(models)
        tokenizer = AutoTokenizer.from_pretrained(registry.path(registry.current_version()))
        print(f"machine: {os.cpu_count()} CPUs; {args.learners} learners for {args.minutes:g} min, thinking "
              f"{args.think:g} s between requests; work dir {work}")

        first_version = registry.current_version()
        log = Log()
        start = time.time()
        deadline = start + args.minutes * 60
        threads = [threading.Thread(target=learner, args=(url, i, prompts, deadline, args.max_requests, args.think, tokenizer, log),
                                    daemon=True) for i in range(args.learners)]
        for t in threads:
            t.start()
        status = Client(url, verbose=False)
        memory, served_versions = [], []
        retrain_at = start + args.retrain_at * args.minutes * 60 if args.retrain_at >= 0 else None
        promote_at = start + args.promote_at * args.minutes * 60
        promoted = swapped = None
        retrain_outcome = "not run"
        while any(t.is_alive() for t in threads):
            now = time.time()
            if retrain_at and retrain is None and now >= retrain_at:
                retrain = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--retrain", "--db", str(db),
                                            "--models-dir", str(models), "--config", str(work / "retrain.toml"),
                                            *model_args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True)
                print(f"  {now - start:5.0f}s retrain started")
            pointer = registry.current_version()
            if promoted is None and pointer != first_version:  # the retrain promoted
                promoted = (pointer, now)
                print(f"  {now - start:5.0f}s the retrain promoted {pointer}")
            if promoted is None and now >= promote_at and (copy := promote_copy(models)):
                promoted = (copy, time.time())
                print(f"  {promoted[1] - start:5.0f}s promoted {copy} (a copy of {first_version})")
            try:
                version = status.predict(api_name="/status")["model_version"]
            except Exception:  # noqa: BLE001 - counted as the learners see it; /status is only watched here
                version = None
            served_versions.append((now, version))
            if promoted and swapped is None and version == promoted[0]:
                swapped = time.time()
                print(f"  {swapped - start:5.0f}s the server serves {version} ({swapped - promoted[1]:.1f}s after the switch)")
            memory.append((now - start, rss_mib(server.pid)))
            if retrain is not None and retrain.poll() is not None and retrain_outcome == "not run":
                retrain_outcome = (retrain.stdout.read().strip().splitlines() or ["(no output)"])[-1]
                print(f"  {now - start:5.0f}s retrain ended: {retrain_outcome}")
            time.sleep(1.0)
        for t in threads:
            t.join()
        status.close()
        if retrain is not None and retrain_outcome == "not run":  # the run is over: stop it, say how far it got
            retrain.terminate()
            retrain.wait(timeout=60)
            retrain_outcome = "still running at the end, stopped; its last line: " + \
                (retrain.stdout.read().strip().splitlines() or ["(no output)"])[-1].strip()

        lost = lost_feedback(db, log.acknowledged)
        promoted_at = promoted[1] if promoted else float("inf")
        during_end = (swapped or promoted_at) + 30

        def phase(samples):
            return {"before": [v for t, v in samples if t < promoted_at],
                    "during": [v for t, v in samples if promoted_at <= t < during_end],
                    "after": [v for t, v in samples if t >= during_end]}

        by_outcome = Counter()
        for (_, outcome), n in log.outcomes.items():
            by_outcome[outcome] += n
        print("requests by outcome:", dict(by_outcome))
        for kind in sorted({k for k, _ in log.outcomes}):
            print(f"   {kind:17s}", {o: n for (k, o), n in sorted(log.outcomes.items()) if k == kind})
        print(f"acknowledged feedback items: {len(log.acknowledged)}; found in the DB: {len(log.acknowledged) - len(lost)}; "
              f"lost: {len(lost)}")
        ttft, itl = phase(log.first_tokens), phase(log.gaps)
        for name in ("before", "during", "after"):
            print(f"   {name:6s} time to first token {percentiles(ttft[name])}; inter-token {percentiles(itl[name])}")
        print(f"promotion: {promoted[0] if promoted else 'none'}; served "
              f"{(swapped - promoted[1]):.1f}s after the switch" if swapped else "promotion: not served")
        print(f"retrain: {retrain_outcome}")
        peak = max(m for _, m in memory)
        samples = [f"{t:.0f}s {m:.0f}" for t, m in memory[:: max(1, len(memory) // 10)]]
        print(f"server RSS MiB over time: {', '.join(samples)}; peak {peak:.0f}")
        if log.errors:
            print("errors:", *log.errors[:10], sep="\n   ")
        if args.out:
            args.out.write_text(json.dumps({
                "learners": args.learners, "minutes": args.minutes, "outcomes": dict(by_outcome),
                "by_kind": {f"{k}/{o}": n for (k, o), n in log.outcomes.items()},
                "acknowledged": len(log.acknowledged), "lost": len(lost), "errors": log.errors,
                "ttft": {k: sorted(v) for k, v in ttft.items()}, "itl_p50": {k: statistics.median(v) if v else None
                                                                            for k, v in itl.items()},
                "promoted": promoted and promoted[0], "swap_s": swapped and promoted and swapped - promoted[1],
                "retrain": retrain_outcome, "memory": memory}, indent=1))
    finally:
        if retrain is not None and retrain.poll() is None:
            retrain.terminate()
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
