"""Base rates of every rubric on the served base model: the dev part's openers, answered as the app answers.

    python bench/rubric_base_rates.py [--samples 2] [--models-dir DIR] [--max-new-tokens N] [--out answers.json]

The serving engine (app/engine.py) with the served sampling defaults (or `--max-new-tokens`) answers each
held-out dev opener `--samples` times; every rubric scores every answer. Prints each success rate with its
Wilson 95% interval, the share of answers of substance, and how many answers finished. Only the dev part:
the test part is for final reported runs (docs/learning.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from app.embedded import ensure_base
    from app.engine import EngineConfig, GenerationEngine, SamplingConfig
    from app.versions import ModelRegistry
    from bench.learner import load_prompt_set
    from bench.rubrics import RUBRICS, substantive
    from core.chat_format import TUTOR_SYSTEM_PROMPT, fit_context
    from core.stats import wilson

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-models")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0: the served default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="the answers, as JSON")
    args = ap.parse_args()

    registry = ModelRegistry(args.models_dir)
    ensure_base(registry)
    sampling = SamplingConfig(seed=args.seed)
    if args.max_new_tokens:
        sampling = replace(sampling, max_new_tokens=args.max_new_tokens)
    prompts = load_prompt_set(split="heldout")
    engine = GenerationEngine(registry, fit_context, sampling, EngineConfig(max_queue=len(prompts) * args.samples))
    start = time.perf_counter()
    try:
        asked = [(p, engine.submit([{"role": "system", "content": TUTOR_SYSTEM_PROMPT},
                                    {"role": "user", "content": p.opener}]))
                 for p in prompts for _ in range(args.samples)]
        answers = []
        for prompt, request in asked:
            tokens = list(request.tokens(timeout=600))
            answers.append({"prompt_id": prompt.id, "dialogue": [{"role": "user", "content": prompt.opener}],
                            "answer": request.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                            "finish_reason": request.finish_reason, "tokens": len(tokens)})
    finally:
        engine.close()
    n = len(answers)
    print(f"{n} answers of {engine.version} ({len(prompts)} dev openers x {args.samples}, up to "
          f"{sampling.max_new_tokens} tokens, temperature {sampling.temperature}) in {time.perf_counter() - start:.0f}s; "
          f"finished {sum(a['finish_reason'] == 'stop' for a in answers) / n:.1%}; "
          f"of substance {sum(substantive(a['dialogue'], a['answer']) for a in answers) / n:.1%}")
    for name, rubric in RUBRICS.items():
        if name == "random":
            continue
        k = sum(rubric.success(a["dialogue"], a["answer"]) for a in answers)
        _, low, high = wilson(k, n)
        print(f"  {name:22s} {k:4d}/{n} = {k / n:6.1%}  [{low:.1%}, {high:.1%}]")
    if args.out:
        args.out.write_text(json.dumps(answers, indent=1))


if __name__ == "__main__":
    main()
