"""The gate's sampling batch and its scoring precision, timed on the embedded model:

    python bench/bench_gate.py [--prompts 16] [--samples 4] [--new MODEL_DIR]

The gate samples k answers per held-out prompt from each policy, then scores them: the KL's log-probs
under three models and the reward model's scores. This times, on one policy's share of that work,
sampling from a merged bf16 copy 16, 32 and 64 answers at a time (`GateConfig.batch_size`), and the
KL's log-probs in fp32 against bf16 autocast (`GateConfig.bf16`), with the KL each gives. The new
policy is `--new` (a version directory, e.g. models/v0002) or else the embedded model with its weights
nudged, so that the two differ.
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
    ap.add_argument("--prompts", type=int, default=16, help="shipped held-out prompts")
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt")
    ap.add_argument("--new", type=Path, help="the new policy's directory (default: the embedded model, nudged)")
    args = ap.parse_args()

    import torch

    from app.embedded import load_embedded
    from app.versions import load_pretrained
    from core.causal_lm import sequence_logprob
    from core.chat_format import TUTOR_SYSTEM_PROMPT
    from core.precision import sampling_copy
    from rlhf.data import shipped_heldout_prompts
    from rlhf.evaluate import GateConfig, generate

    config = GateConfig()
    current, tokenizer = load_embedded()
    if args.new:
        new = load_pretrained(args.new).model.float()
    else:
        new, _ = load_embedded()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.02 * p.std())
    current.eval(), new.eval()
    asked = [p for p in shipped_heldout_prompts(TUTOR_SYSTEM_PROMPT)[:args.prompts] for _ in range(args.samples)]
    print(f"{len(asked)} answers of up to {config.max_new_tokens} tokens at temperature {config.temperature}", flush=True)

    def timed(work):
        started = time.perf_counter()
        out = work()
        seconds = time.perf_counter() - started
        return out, seconds

    with torch.inference_mode():
        sampler = sampling_copy(new, torch.bfloat16)
        sample_s = {}
        for batch in (16, 32, 64):
            (_, prompt_ids, answer_ids), sample_s[batch] = timed(lambda: generate(
                sampler, tokenizer, asked, config.max_new_tokens, config.temperature, batch, seed=config.seed))
            print(f"sample, {batch} at a time: {sample_s[batch]:.1f} s "
                  f"({sum(map(len, answer_ids)) / len(answer_ids):.0f} tokens an answer)", flush=True)
        kl, kl_s = {}, {}
        for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                (mine, other), kl_s[name] = timed(lambda: (
                    sequence_logprob(new, prompt_ids, answer_ids, config.temperature),
                    sequence_logprob(current, prompt_ids, answer_ids, config.temperature)))
            kl[name] = mine - other
            print(f"KL log-probs, two models, {name}: {kl_s[name]:.1f} s; KL {kl[name].mean():.3f} nats", flush=True)
    print(f"sample 16 / 64 at a time time ratio: {sample_s[16] / sample_s[64]:.2f}x")
    print(f"KL fp32 / bf16 autocast time ratio: {kl_s['fp32'] / kl_s['bf16 autocast']:.2f}x; KL moved "
          f"{kl['fp32'].mean():.3f} -> {kl['bf16 autocast'].mean():.3f} (per answer: std of the difference "
          f"{(kl['bf16 autocast'] - kl['fp32']).std():.3f})")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
