"""Data-parallel check of the PPO step: run it under `accelerate launch` with several processes.

Every process builds the same tiny learnable Llama (tests/tiny.py), runs `train_ppo` for a few
updates against a synthetic reward (the number of answer tokens containing a vowel), and writes
OUT/rank<i>.json with its rank, the world size, checksums of the weights before and after
training, its own answers and the history. Under DDP the replicas must end bit-identical while
each process sampled its own answers; tests/test_distributed.py checks exactly that.

From the repository root (PYTHONPATH=. for `rlhf`; `tiny` is found next to this script):

    PYTHONPATH=. accelerate launch --config_file configs/accelerate/multi_cpu_2proc.yaml --multi_gpu \
        --main_process_port 0 tests/ppo_distributed_check.py OUT --cpu         # 2 CPU processes
    PYTHONPATH=. accelerate launch --multi_gpu --num_processes 2 tests/ppo_distributed_check.py OUT   # 2 GPUs

--multi_gpu makes accelerate start the processes with torchrun; see docs/multi_gpu.md for why the
CPU run needs it. Not a test module itself (no test_ prefix): tests/test_distributed.py launches it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
from accelerate import PartialState

from rlhf.ppo import PPOConfig, train_ppo
from tiny import tiny_model, tiny_tokenizer

PROMPTS = [[{"role": "user", "content": q}] for q in
           ["What is 3 + 4?", "Tell me about France.", "What is a fraction?", "How do plants eat?"]]


def weights_checksum(tensors: dict[str, torch.Tensor]) -> dict:
    """Sum of all values and a sha256 of their float32 bytes, in name order: equal hashes mean
    bit-identical weights."""
    digest = hashlib.sha256()
    total = 0.0
    for name in sorted(tensors):
        t = tensors[name].detach().float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(t.numpy().tobytes())
        total += t.double().sum().item()
    return {"sum": total, "sha256": digest.hexdigest(), "tensors": len(tensors)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for rank<i>.json")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--rollout-batch-size", type=int, default=4, help="answers per update, per process")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--cpu", action="store_true",
                        help="processes on CPU with gloo even where CUDA is present")
    args = parser.parse_args(argv)
    if args.cpu:
        # What `accelerate launch --cpu` sets; read by the Accelerator that train_ppo creates.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by the launcher

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=0, layers=2, hidden=64)
    with torch.no_grad():  # a trained model's logit scale, as in tests/test_ppo.py
        model.model.norm.weight.mul_(4.0)
    initial = weights_checksum(model.state_dict())
    vowel_tokens = {i for i in range(3, len(tokenizer))
                    if any(c in tokenizer.convert_ids_to_tokens(i) for c in "aeiou")}
    answers: list[list[str]] = []  # this process's answers, one list per update

    def reward_fn(prompts, completions, token_ids):
        answers.append(list(completions))
        return torch.tensor([float(sum(t in vowel_tokens for t in ids)) for ids in token_ids])

    config = PPOConfig(total_episodes=args.updates * args.rollout_batch_size * world_size,
                       rollout_batch_size=args.rollout_batch_size, minibatch_size=2, ppo_epochs=2,
                       max_new_tokens=args.max_new_tokens, learning_rate=1e-3, seed=0)
    result = train_ppo(model, tokenizer, PROMPTS, reward_fn, config, merge=True)

    state = PartialState()  # the state train_ppo's Accelerator set up
    trained = {f"model.{k}": v for k, v in result.model.state_dict().items()}
    trained |= {f"value_head.{k}": v for k, v in result.value_head.state_dict().items()}
    report = {"rank": state.process_index, "world_size": state.num_processes,
              "distributed_type": str(state.distributed_type), "backend": state.backend,
              "device": str(state.device), "initial": initial,
              "trained": weights_checksum(trained),
              "trained_model": weights_checksum(result.model.state_dict()),
              "answers": answers, "history": result.history}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{state.process_index}.json").write_text(json.dumps(report, indent=1))
    print(f"rank {state.process_index}/{state.num_processes} {state.distributed_type}: "
          f"trained sha256 {report['trained']['sha256'][:16]}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
