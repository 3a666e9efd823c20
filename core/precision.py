"""Which device and dtype each part runs in: one policy for serving, sampling and training.

- serving and loading: the GPU in bf16 when there is one, else the CPU in fp32 (`serving_device`);
- an inference precision setting ("auto", "bf16", "fp32") names the weights' dtype (`inference_dtype`),
  and `for_sampling` hands a sampler the model itself or a cast copy of it;
- a training precision setting (True, False or "auto") says whether to train under bf16 autocast
  (`wants_bf16`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

INFERENCE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def serving_device() -> tuple[str, torch.dtype]:
    """(device, dtype) a model is loaded in. bf16 halves memory and is fast on GPUs; CPUs without
    AMX are faster in fp32."""
    if torch.cuda.is_available():
        # cuDNN's attention builds an execution plan for every new sequence length, and each decoding
        # step has a new one; flash / memory-efficient attention need no plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def inference_dtype(precision: str) -> torch.dtype | None:
    """The dtype an inference precision setting asks for: "bf16", "fp32", or "auto" (None: the dtype the
    model was loaded in, bf16 on a GPU and fp32 on a CPU)."""
    if precision not in INFERENCE_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(INFERENCE_DTYPES)}, not {precision!r}")
    return INFERENCE_DTYPES[precision]


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
    if dtype is None or next(model.parameters()).dtype == dtype:
        return model
    return sampling_copy(model, dtype)


def wants_bf16(setting: str | bool) -> bool:
    """A training precision setting: True, False, or "auto" (bf16 autocast when CUDA is available)."""
    return torch.cuda.is_available() if setting == "auto" else bool(setting)


def training_device() -> dict:
    """What a TRL/transformers Trainer is told: bf16 and the GPU when there is one, the CPU otherwise."""
    return {"bf16": wants_bf16("auto"), "use_cpu": not torch.cuda.is_available()}
