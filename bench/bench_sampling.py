"""How a sampled token is drawn, timed in `generate` on the embedded model:

    python bench/bench_sampling.py [--rows 1 16 64] [--tokens 64]

`generate`'s own draw (torch.multinomial: on a CPU one exponential random number per vocabulary entry)
against inverse transform sampling (core/sampling.py: one uniform number per row), both decoding the
same prompts from a bf16 sampling copy at the served temperature. Every row decodes exactly --tokens
tokens (min_new_tokens), so both draws do the same number of steps whatever they sample. Prints the
time per decoding step of each, their ratio, and the peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64], help="answers decoded together")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per answer")
    ap.add_argument("--repeats", type=int, default=2, help="timings per setting; the best is kept")
    args = ap.parse_args()

    import torch
    from transformers import GenerationConfig

    from app.embedded import load_embedded
    from core.chat_format import ANSWER_TEMPERATURE, TUTOR_SYSTEM_PROMPT, end_of_turn_ids, generation_prompt_ids
    from core.precision import precision_plan, sampling_copy
    from core.prefix_cache import generate_answers, shared_prefix_cache
    from rlhf.data import shipped_heldout_prompts

    model, tokenizer = load_embedded()
    sampler = sampling_copy(model, precision_plan().sampling_dtype)
    del model
    prompts = [generation_prompt_ids(tokenizer, p) for p in shipped_heldout_prompts(TUTOR_SYSTEM_PROMPT)]
    config = GenerationConfig(do_sample=True, temperature=ANSWER_TEMPERATURE, top_k=0, top_p=1.0,
                              max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                              eos_token_id=end_of_turn_ids(sampler, tokenizer))
    print(f"{precision_plan().describe()}; {args.tokens} tokens per answer, vocabulary {sampler.config.vocab_size}",
          flush=True)

    for n in args.rows:
        rows = [prompts[i % len(prompts)] for i in range(n)]
        prefix = shared_prefix_cache(sampler, rows)
        step_ms = {}
        for draw in ("multinomial", "inverse_cdf"):
            times = []
            for repeat in range(args.repeats + 1):  # the first run warms up
                torch.manual_seed(repeat)
                started = time.perf_counter()
                with torch.no_grad():
                    out = generate_answers(sampler, rows, tokenizer.pad_token_id, prefix, config, token_draw=draw)
                times.append(time.perf_counter() - started)
            if out.shape[1] != args.tokens:
                raise RuntimeError(f"{draw} decoded {out.shape[1]} tokens, not {args.tokens}")
            step_ms[draw] = 1000 * min(times[1:]) / args.tokens
        print(f"{n:3d} rows: multinomial {step_ms['multinomial']:.1f} ms/step, inverse_cdf "
              f"{step_ms['inverse_cdf']:.1f} ms/step: {step_ms['multinomial'] / step_ms['inverse_cdf']:.2f}x",
              flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB")


if __name__ == "__main__":
    main()
