"""Moderation quality and cost: recall on the project's unsafe requests, false positives on lessons.

    python bench/bench_moderation.py [--split dev|final|all] [--show]

Recall per category on `core/assets/unsafe_requests.jsonl` (`dev` is what the patterns were written
against; `final` is for reporting only), the false-positive rate on every opener and follow-up of
`rlhf/assets/tutoring_prompts.jsonl` plus the regression questions, and each check's cost as a
ratio to better-profanity's word list alone on the same texts (the baseline), for our Moderator
and, where installed, alt-profanity-check.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def lessons() -> list[str]:
    prompts = [json.loads(line) for line in open(ROOT / "rlhf/assets/tutoring_prompts.jsonl")]
    texts = [p["opener"] for p in prompts] + [p["follow_up"] for p in prompts if p.get("follow_up")]
    return texts + [json.loads(line)["question"] for line in open(ROOT / "rlhf/assets/regression_set.jsonl")]


def measure(name: str, flagged, unsafe: list[dict], safe: list[str], show: bool) -> float:
    start = time.perf_counter()
    hits: dict[str, list[bool]] = {}
    for row in unsafe:
        hits.setdefault(row["category"], []).append(bool(flagged(row["text"])))
    false_positives = [text for text in safe if flagged(text)]
    seconds = time.perf_counter() - start
    caught = sum(sum(v) for v in hits.values())
    per = "  ".join(f"{c} {sum(v)}/{len(v)}" for c, v in hits.items())
    print(f"{name:24s} recall {caught}/{len(unsafe)} = {caught / len(unsafe):.1%}  "
          f"false positives {len(false_positives)}/{len(safe)} = {len(false_positives) / len(safe):.1%}")
    print(f"{'':24s} {per}")
    if show:
        for row in unsafe:
            if not flagged(row["text"]):
                print(f"{'':24s} missed: {row['text']}")
        for text in false_positives:
            print(f"{'':24s} false positive: {text}")
    return seconds / (len(unsafe) + len(safe))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["dev", "final", "all"], default="dev")
    ap.add_argument("--show", action="store_true", help="list misses and false positives")
    args = ap.parse_args()

    from better_profanity import Profanity

    from core.moderation import Moderator

    rows = [json.loads(line) for line in open(ROOT / "core/assets/unsafe_requests.jsonl")]
    unsafe = [r for r in rows if args.split == "all" or r["split"] == args.split]
    safe = lessons()
    print(f"{len(unsafe)} unsafe requests ({args.split}), {len(safe)} lesson texts")

    words = Profanity()
    words.load_censor_words()
    base = measure("better-profanity alone", words.contains_profanity, unsafe, safe, False)
    moderator = Moderator()
    ours = measure("Moderator", lambda t: moderator.check(t).flagged, unsafe, safe, args.show)
    print(f"cost per check: Moderator {ours * 1e3:.2f} ms = {ours / base:.2f}x better-profanity alone")
    try:
        from profanity_check import predict_prob
    except ImportError:
        return
    other = measure("alt-profanity-check 0.5", lambda t: predict_prob([t])[0] >= 0.5, unsafe, safe, False)
    print(f"cost per check: alt-profanity-check {other * 1e3:.2f} ms = {other / base:.2f}x better-profanity alone")


if __name__ == "__main__":
    main()
