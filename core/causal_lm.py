"""Tensor helpers of a causal LM, shared by the serving engine, PPO, the reward model and the gate.

Alignment: logits at position t predict token t + 1. Prompts are padded on the left (so each ends
where generation starts) and answers on the right (so each starts there); position ids count only
real tokens, as `generate` counts them for a left-padded batch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every prompt ends where generation starts. Returns ids and mask, (B, P)."""
    return _pad(sequences, pad_id, left=True)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding, so every row starts at position 0 (answers after their prompts, a reward model's
    rows read at their last real token). Returns ids and mask, (B, L)."""
    return _pad(sequences, pad_id, left=False)


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in sequences), default=0)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        input_ids[i, cols] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, cols] = 1
    return input_ids, attention_mask


def left_pad_to(x: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """`x` with zeros prepended along `dim` up to `width`: a left-padded mask or KV cache made wider to
    join a batch whose rows are longer."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L): each token's index among its row's real tokens (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def next_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, 1): the position of the newest token of each row, whose mask is already in
    `attention_mask` (a decoding step); the last column of `position_ids`, without the cumsum."""
    return attention_mask.long().sum(dim=1, keepdim=True) - 1


def causal_lm_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_len: int, **kwargs):
    """Forward with the position ids `generate` used for left-padded prompts, keeping only the
    R + 1 logits that score the response (full-vocabulary logits over the prompt are wasted
    memory). Leading columns that are padding in every row are dropped first: they change no logit,
    only the cost (a PPO minibatch without its rollout batch's longest prompt runs as wide as its own
    rows). Callers index the outputs from the end, so the result keeps its meaning."""
    start = int(attention_mask.any(dim=0).long().argmax())  # 0 when no column is all padding
    input_ids, attention_mask = input_ids[:, start:], attention_mask[:, start:]
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                 logits_to_keep=response_len + 1, use_cache=False, **kwargs)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) for each position. The caller aligns logits[:, t] with the token at t.

    Upcast to float32 because log_softmax in bf16 loses the small log-prob differences that
    the PPO ratio and the KL penalty are built from.
    """
    # One row at a time: a whole batch's float32 log-softmax is B x T x V (16 x 128 x 49k: 400 MB on the
    # embedded model) and without gradients (rollout scoring, the reference, the gate) only one row's copy is
    # alive at once; with gradients autograd still keeps each row's output for the backward pass.
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    rows = [F.log_softmax(row.float(), dim=-1).gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)
            for row, row_tokens in zip(logits, tokens)]  # each (T,)
    return torch.stack(rows) if rows else logits.new_zeros(tokens.shape, dtype=torch.float32)


@torch.no_grad()
def sequence_logprob(model, prompt_ids: list[list[int]], answer_ids: list[list[int]],
                     temperature: float = 1.0, batch_size: int = 8) -> torch.Tensor:
    """Sum of log p(answer token) under `model` sampling at `temperature`, one value per answer.

    Batched as PPO scores its rollouts: prompts padded on the left, answers on the right, so every
    answer starts where generation started, with the position ids `generate` used; logits only over
    the answer positions (full-vocabulary logits over the prompts would be wasted)."""
    totals = torch.zeros(len(answer_ids))
    for start in range(0, len(answer_ids), batch_size):
        rows = list(range(start, min(start + batch_size, len(answer_ids))))
        width = max(len(answer_ids[i]) for i in rows)
        if not width:
            continue
        prompts, prompt_mask = left_pad([prompt_ids[i] for i in rows], pad_id=0)
        answers, answer_mask = right_pad([answer_ids[i] for i in rows], pad_id=0)
        ids = torch.cat([prompts, answers], 1).to(model.device)
        mask = torch.cat([prompt_mask, answer_mask], 1).to(model.device)
        logits = causal_lm_forward(model, ids, mask, width).logits[:, :-1].float() / temperature  # (B, R, V)
        logprobs = logprobs_from_logits(logits, answers.to(model.device)) * answer_mask.to(model.device)
        totals[rows] = logprobs.sum(1).cpu()
    return totals


def answer_mask(attention_mask: torch.Tensor, answer_start: torch.Tensor) -> torch.Tensor:
    """(R, T) bool: the positions of each right-padded row's answer tokens (not its prompt, not its
    padding), the answer of row i starting at answer_start[i]."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions >= answer_start.to(attention_mask.device)[:, None]) & attention_mask.bool()


def answer_logprob(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   answer_start: torch.Tensor) -> torch.Tensor:
    """log pi(answer | prompt) of each right-padded prompt + answer row, with gradients: the sum over
    its answer tokens. (R, T) -> (R,)

    Only the logits from the earliest answer on are computed (logits_to_keep): over the prompt they
    would be most of the memory and none of the result."""
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    first = max(1, int(answer_start.min()))  # a token is scored by the logits one position before it
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   logits_to_keep=input_ids.shape[1] - first + 1).logits[:, :-1]  # predict tokens first..T-1
    logp = logprobs_from_logits(logits, input_ids[:, first:])  # (R, T - first) fp32
    return (logp * answer_mask(attention_mask, answer_start)[:, first:]).sum(-1)
