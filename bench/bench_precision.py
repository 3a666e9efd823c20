"""bf16 autocast against fp32 for the two compute-bound training stages, on the embedded model:

    python bench/bench_precision.py [--groups 4] [--episodes 16] [--max-new-tokens 96]

Times a reward-model epoch over a few rankings and one PPO update (16 tutoring answers), first in fp32,
then with bf16 autocast (RewardConfig.bf16, PPOConfig.bf16), then PPO once more with its rollouts
sampled by a merged bf16 copy of the policy (PPOConfig.rollout_precision = "bf16"), and prints the ratios. On a GPU bf16 is
the default; on a CPU it pays only where the CPU has bf16 instructions (AVX512-BF16 or AMX).
"""
from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=4, help="rankings of 4 answers in the reward-model epoch")
    ap.add_argument("--episodes", type=int, default=16, help="answers in the PPO update")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()

    import torch
    from accelerate.state import AcceleratorState

    from app.embedded import load_embedded
    from core.chat_format import TUTOR_SYSTEM_PROMPT
    from bench.learner import load_prompt_set
    from rlhf.data import PreferenceGroup
    from rlhf.ppo import PPOConfig, train_ppo
    from rlhf.reward import RewardConfig, build_reward_model, fit

    model, tokenizer = load_embedded()
    policy_dir = Path(__import__("tempfile").mkdtemp()) / "base"
    model.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    openers = [p.opener for p in load_prompt_set(split="train")]
    rng = random.Random(0)
    prompts = [[{"role": "system", "content": TUTOR_SYSTEM_PROMPT}, {"role": "user", "content": o}]
               for o in rng.sample(openers, args.episodes)]
    # Answers of tutoring length (about 70 words each), so the sequences are as long as in a cycle.
    filler = ("A fraction names equal parts of a whole, so three quarters means three of four equal parts. "
              "Try drawing a bar, cutting it into four and shading three. ")
    groups = [PreferenceGroup(prompt=prompts[i % len(prompts)], completions=[filler * (2 + j % 2) + str(j) for j in range(4)],
                              pairs=[(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], conversation_id=f"c{i}",
                              source="ranking", group_id=f"g{i}") for i in range(args.groups)]

    times: dict[str, dict[str, float]] = {}
    # (name, bf16 autocast, who samples PPO's rollouts): the third keeps bf16 training and samples from
    # a merged bf16 copy of the policy (PPOConfig.rollout_precision); its reward-model epoch is the second's.
    for name, bf16, rollouts in (("fp32", False, "auto"), ("bf16", True, "auto"), ("bf16-rollouts", True, "bf16")):
        rm_seconds = times.get("bf16", {}).get("rm", float("nan"))
        if rollouts == "auto":
            rm_config = RewardConfig(form="score_head", epochs=1, bf16=bf16)
            rm, rm_tokenizer = build_reward_model(policy_dir, rm_config)
            t = time.perf_counter()
            fit(rm, rm_tokenizer, groups, rm_config)
            rm_seconds = time.perf_counter() - t
            del rm

        AcceleratorState._reset_state(True)  # the precision is fixed once per process otherwise
        policy, _ = load_embedded()
        config = PPOConfig(total_episodes=args.episodes, rollout_batch_size=args.episodes, minibatch_size=8,
                           max_new_tokens=args.max_new_tokens, temperature=0.7, bf16=bf16, stop_kl=0,
                           rollout_precision=rollouts)
        result = train_ppo(policy, tokenizer, prompts, lambda p, c, ids: torch.zeros(len(ids)), config)
        h = result.history[0]
        times[name] = {"rm": rm_seconds, "gen": h["gen_seconds"], "train": h["train_seconds"]}
        print(f"{name}: reward-model epoch ({args.groups} rankings) {rm_seconds:.1f} s; PPO update: "
              f"generate {h['gen_seconds']:.1f} s ({h['answer_length']:.0f} tokens/answer), train {h['train_seconds']:.1f} s",
              flush=True)
    for stage in ("rm", "gen", "train"):
        print(f"{stage:6s} fp32/bf16 time ratio: {times['fp32'][stage] / times['bf16'][stage]:.2f}x")
    print(f"gen    bf16 autocast / bf16 rollout copy time ratio: {times['bf16']['gen'] / times['bf16-rollouts']['gen']:.2f}x")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (both runs, one process)")


if __name__ == "__main__":
    main()
