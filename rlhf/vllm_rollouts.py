"""PPO's rollouts through vLLM on a GPU, the way TRL's and OpenRLHF's colocated vLLM modes do it.

On a GPU, decoding through transformers' `generate` pays Python and kernel-launch overhead per token
(docs/performance.md: 84% of PPO's time on an H100 was generation). With vLLM installed
(`pip install -r requirements-vllm.txt`, never part of the default install) and `rollout_engine` "auto"
or "vllm", one vLLM engine lives in the training process next to the policy (the "external_launcher"
executor: no second process); before each update the policy's merged weights are loaded into it and
its prefix cache is reset, so the next rollouts come from the weights just trained. The log-probs of the
PPO ratio are still computed by the trained module, as on the plain path. Without vLLM or without a GPU
the plain path samples; `choose_rollout_engine` says which one and why.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from core.causal_lm import right_pad

ENGINES = ("auto", "hf", "vllm")


def check_rollout_engine(setting: str) -> None:
    if setting not in ENGINES:
        raise ValueError(f"rollout_engine must be one of {', '.join(ENGINES)}, not {setting!r}")


@dataclass(frozen=True)
class EngineChoice:
    engine: str  # "vllm" or "hf"
    reason: str


def choose_rollout_engine(setting: str, cuda: bool | None = None, installed: bool | None = None) -> EngineChoice:
    """ "hf": transformers' generate. "auto" and "vllm": vLLM where it can run (a CUDA device, the package
    installed), else generate with the reason; the default install has no vLLM and runs everywhere."""
    check_rollout_engine(setting)
    if setting == "hf":
        return EngineChoice("hf", "rollout_engine = \"hf\"")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    installed = importlib.util.find_spec("vllm") is not None if installed is None else installed
    if not cuda:
        return EngineChoice("hf", "vLLM needs a CUDA device; sampling with generate")
    if not installed:
        return EngineChoice("hf", "vLLM is not installed (pip install -r requirements-vllm.txt); sampling with generate")
    return EngineChoice("vllm", "vLLM on the GPU, weights loaded before each update")


def answers_tensor(outputs, eos_ids: list[int], pad_id: int) -> torch.Tensor:
    """vLLM's completions as generate's answers: (B, R) token ids, right-padded with pad_id, each ending
    in its EOS where it stopped on one (so PPO's response mask sees it; vLLM may leave a stop token out)."""
    rows = []
    for completion in outputs:
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop" and (not ids or ids[-1] not in eos_ids):
            ids.append(completion.stop_reason if isinstance(completion.stop_reason, int) else eos_ids[0])
        rows.append(ids)
    return right_pad(rows, pad_id)[0]


class VLLMRollouts:
    """One colocated vLLM engine for one PPO run; its weights are whatever `load_weights` gave it last."""

    def __init__(self, model_config, dtype: torch.dtype, seed: int, max_model_len: int,
                 gpu_memory_utilization: float = 0.3):
        from vllm import LLM  # only here: the default install has no vLLM

        # One process acting as its own launcher (TRL's colocate mode sets the same variables).
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "localhost")):
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            from core.net import free_port
            os.environ["MASTER_PORT"] = str(free_port())
        self._config_dir = tempfile.TemporaryDirectory(prefix="vllm-config-")
        model_config.save_pretrained(self._config_dir.name)  # the architecture; the weights come by load_weights
        self.llm = LLM(model=self._config_dir.name, load_format="dummy", skip_tokenizer_init=True,
                       dtype="bfloat16" if dtype == torch.bfloat16 else "float32", seed=seed,
                       max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                       enable_prefix_caching=True, distributed_executor_backend="external_launcher")

    @torch.no_grad()
    def load_weights(self, plain_model: nn.Module) -> None:
        """The weights of a plain causal LM (adapters already merged: core.precision.sampling_copy)."""
        target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        target.load_weights((name, p.data) for name, p in plain_model.named_parameters())
        self.llm.reset_prefix_cache()  # cached KV of the old weights must not answer for the new ones

    def generate(self, rows: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
                 eos_ids: list[int], pad_id: int) -> torch.Tensor:
        from vllm import SamplingParams

        params = SamplingParams(n=1, temperature=temperature, top_p=1.0, top_k=top_k if top_k > 0 else -1,
                                min_p=0.0, repetition_penalty=1.0, max_tokens=max_new_tokens,
                                stop_token_ids=list(eos_ids), detokenize=False)
        results = self.llm.generate([{"prompt_token_ids": ids} for ids in rows], sampling_params=params,
                                    use_tqdm=False)
        return answers_tensor([r.outputs[0] for r in results], eos_ids, pad_id)

    def close(self) -> None:
        del self.llm
        torch.cuda.empty_cache()
        self._config_dir.cleanup()
