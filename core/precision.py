"""Which device and dtype each part runs in: one policy for serving, sampling and training.

What pays depends on the hardware found, so "auto" asks `precision_plan()` once per process:
- a GPU: bf16 everywhere (weights, autocast in training, sampling copies);
- a CPU with bf16 instructions (AVX512-BF16 or AMX): fp32 weights for training, bf16 autocast, and
  bf16 copies for sampling (a reward-model epoch 1.97x, a PPO update 1.5x, decoding 1.7x faster than
  fp32 on such a CPU, bench/bench_precision.py and bench/bench_serving.py);
- any other CPU: fp32, where bf16 has no instructions and is emulated, slower than fp32;
- a CPU whose flags cannot be read (not Linux): one short measurement of a bf16 against an fp32 matmul.

Settings: an inference precision ("auto", "bf16", "fp32") names the dtype a sampler's weights are in
(`inference_dtype`); a training precision (True, False or "auto") says whether to train under bf16
autocast (`wants_bf16`). Explicit values always win over the plan.
"""
from __future__ import annotations

import copy
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

INFERENCE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class PrecisionPlan:
    """What "auto" means on this machine, and why (printed by the retraining cycle and the server)."""

    device: str
    train_bf16: bool  # bf16 autocast in SFT, the reward model and PPO
    sampling_dtype: torch.dtype  # weights of the serving engine, PPO's rollout copies and the gate's samplers
    reason: str

    def describe(self) -> str:
        sampling = "bf16" if self.sampling_dtype == torch.bfloat16 else "fp32"
        return (f"precision auto: training {'bf16 autocast' if self.train_bf16 else 'fp32'}, sampling {sampling} "
                f"on {self.device} ({self.reason})")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags, or None where the system does not list them."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def bf16_matmul_speedup(size: int = 512, repeats: int = 5) -> float:
    """fp32 time / bf16 time of a square matmul: above 1 where the CPU computes bf16 natively."""
    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size, dtype=dtype)
        a @ a  # warm-up: the first call picks kernels
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def plan_for(cuda: bool, flags: set[str] | None, measure=bf16_matmul_speedup) -> PrecisionPlan:
    """The plan for a machine described by whether it has CUDA and its CPU flags (None: unknown)."""
    if cuda:
        return PrecisionPlan("cuda", True, torch.bfloat16, "a GPU: bf16 throughout")
    if flags is not None:
        found = [f for f in BF16_CPU_FLAGS if f in flags]
        if found:
            return PrecisionPlan("cpu", True, torch.bfloat16, f"the CPU has {', '.join(found)}")
        return PrecisionPlan("cpu", False, torch.float32, "the CPU has no AVX512-BF16 or AMX: bf16 would be emulated")
    speedup = measure()
    fast = speedup > 1.2  # a clear margin: a bf16 path that merely ties fp32 loses precision for nothing
    return PrecisionPlan("cpu", fast, torch.bfloat16 if fast else torch.float32,
                         f"CPU flags unknown; a bf16 matmul ran {speedup:.2f}x as fast as fp32")


@functools.cache
def precision_plan() -> PrecisionPlan:
    """This machine's plan, decided once per process. TUTOR_PRECISION=fp32 (or bf16) overrides the
    detection for every "auto" setting (the test suite runs in fp32, so results do not depend on the CPU)."""
    forced = os.environ.get("TUTOR_PRECISION", "auto")
    cuda = torch.cuda.is_available()
    if forced == "fp32":
        return PrecisionPlan("cuda" if cuda else "cpu", False, torch.float32, "TUTOR_PRECISION=fp32")
    if forced == "bf16":
        return PrecisionPlan("cuda" if cuda else "cpu", True, torch.bfloat16, "TUTOR_PRECISION=bf16")
    if forced != "auto":
        raise ValueError(f"TUTOR_PRECISION must be auto, bf16 or fp32, not {forced!r}")
    return plan_for(cuda, cpu_flags())


def serving_device() -> tuple[str, torch.dtype]:
    """(device, dtype) a model is loaded in: the GPU in bf16 when there is one, else the CPU in fp32 (the
    weights training starts from; a sampler casts its own copy, see `inference_dtype`)."""
    if torch.cuda.is_available():
        # cuDNN's attention builds an execution plan for every new sequence length, and each decoding
        # step has a new one; flash / memory-efficient attention need no plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def inference_dtype(precision: str) -> torch.dtype:
    """The dtype an inference precision setting asks for: "bf16", "fp32", or "auto" (this machine's plan)."""
    if precision not in INFERENCE_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(INFERENCE_DTYPES)}, not {precision!r}")
    return INFERENCE_DTYPES[precision] or precision_plan().sampling_dtype


def check_inference_precision(precision: str) -> None:
    """Fails on a bad setting, when a config is read rather than deep inside a run; decides nothing."""
    if precision not in INFERENCE_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(INFERENCE_DTYPES)}, not {precision!r}")


def sampling_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A plain model that samples as `model` does now: LoRA adapters merged (a PeftModel), weights cast.
    A separate copy, as RLHF systems hand fresh weights to a generation engine: no adapter products in
    every decoding step, and the trained model itself is left as it is."""
    clone = copy.deepcopy(model)
    if hasattr(clone, "merge_and_unload"):
        clone = clone.merge_and_unload()
    return clone.to(dtype).eval()


def for_sampling(model: nn.Module, precision: str) -> nn.Module:
    """`model` itself, or a copy in the dtype `precision` asks for: sampling can run in bf16 while
    log-probabilities are still computed by the model as it is."""
    dtype = inference_dtype(precision)
    if next(model.parameters()).dtype == dtype:
        return model
    return sampling_copy(model, dtype)


def wants_bf16(setting: str | bool) -> bool:
    """A training precision setting: True, False, or "auto" (this machine's plan)."""
    return precision_plan().train_bf16 if setting == "auto" else bool(setting)


def training_device(bf16: str | bool = "auto") -> dict:
    """What a TRL/transformers Trainer is told: bf16 autocast as `bf16` says, the GPU when there is one."""
    return {"bf16": wants_bf16(bf16), "use_cpu": not torch.cuda.is_available()}
