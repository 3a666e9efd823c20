"""Drawing the next token: inverse transform sampling, one uniform number per row.

`torch.multinomial(probs, 1)`, which `generate` and the serving engine used to draw with, draws on the
CPU one exponential number per vocabulary entry (the exponential-race form of sampling without
replacement): 49,152 random numbers per row per step on the embedded model, a large part of a decoding
step of a small model on a CPU (bench/bench_sampling.py, docs/performance.md). Inverse transform sampling draws the same
distribution from one uniform number u per row: the token is the first whose cumulative probability
exceeds u. The cumulative sum is taken in float64, so 49k fp32 probabilities add up without a rounding
error that could move any token's share.

`InverseCDFSampling` puts this draw into `model.generate`: as the last logits processor of a greedy
generate it applies the sampling filters `generate` itself would (temperature, top-k, top-p, HF's own
warpers in HF's order), draws, and leaves only the drawn token finite, which the greedy step then takes.
"""
from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

TOKEN_DRAWS = ("inverse_cdf", "multinomial")  # how a sampled token is drawn (a setting's values)


def check_token_draw(draw: str) -> None:
    if draw not in TOKEN_DRAWS:
        raise ValueError(f"token_draw must be one of {', '.join(TOKEN_DRAWS)}, not {draw!r}")


def draw_tokens(probs: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """probs (B, V), each row summing to 1 up to rounding, zeros allowed -> token ids (B,), row i drawn
    with P(token j) = probs[i, j]. generators: one per row (the serving engine's per-reply seeds), or
    None for torch's global generator."""
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1): 1 up to the probabilities' own rounding
    if generators is None:
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device)
    else:
        u = torch.stack([torch.rand(1, dtype=torch.float64, generator=g, device=probs.device) for g in generators])
    # right=True: the first token whose cumulative probability is strictly above u, so a token of
    # probability 0 (flat cdf) is never the answer, also for u = 0.
    tokens = torch.searchsorted(cdf, u * total, right=True).squeeze(1)  # (B,)
    # u * total may round up to total itself; the answer is then the last token with any probability.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).long().argmax(dim=-1)
    return torch.minimum(tokens, last)


def sampling_filters(temperature: float | None, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    """HF's temperature, top-k and top-p warpers, in generate's order, for the values that filter."""
    filters = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        filters.append(TemperatureLogitsWarper(temperature))
    if top_k:
        filters.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        filters.append(TopPLogitsWarper(top_p))
    return filters


class InverseCDFSampling(LogitsProcessor):
    """Samples inside a greedy `generate`: filters as `generate` would, draws one token per row from
    the filtered softmax (`draw_tokens`) and returns scores that are -inf everywhere but there."""

    def __init__(self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None):
        self.filters = sampling_filters(temperature, top_k, top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.filters(input_ids, scores.float()), dim=-1)  # (B, V)
        tokens = draw_tokens(probs)  # (B,)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens.unsqueeze(1), 0.0)


# The filters InverseCDFSampling applies itself. Any other sampling filter set on a config (typical_p,
# min_p, ...) has no counterpart there, so such a config keeps generate's own draw.
_OWN_FILTERS = ("temperature", "top_k", "top_p")
_OTHER_FILTERS = {"typical_p": 1.0, "min_p": None, "top_h": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def generate_kwargs_for(generation_config: GenerationConfig, draw: str) -> dict:
    """`generate` arguments that sample as `generation_config` says, the token drawn by `draw`:
    "multinomial" (generate's own draw) or "inverse_cdf" (a greedy generate with InverseCDFSampling)."""
    check_token_draw(draw)
    other = any(getattr(generation_config, k, default) not in (default, None)
                for k, default in _OTHER_FILTERS.items())
    if draw == "multinomial" or not generation_config.do_sample or other:
        return {"generation_config": generation_config}
    greedy = copy.deepcopy(generation_config)
    sampler = InverseCDFSampling(greedy.temperature, greedy.top_k, greedy.top_p)
    greedy.do_sample = False
    for name in _OWN_FILTERS:  # unset: greedy generate neither filters nor warns about them
        setattr(greedy, name, None)
    return {"generation_config": greedy, "logits_processor": LogitsProcessorList([sampler])}
