"""The KV cache of the prompt prefix every tutoring prompt shares, computed once per set of weights.

Every reply, rollout and gate sample starts with the tutor's system turn: 52 of the 63 tokens of a
first question to the embedded model. Its keys and values depend only on the weights, so they are
computed once (per served version, per PPO update's sampling copy, per gate sampler) and every
prompt that starts with those tokens runs only the rest of itself: prefix caching, as vLLM and
SGLang do it, here for a left-padded batch.

Layout: [shared prefix][left padding][rest of the prompt]. The padding sits in the middle with an
attention mask of 0, and position ids count real tokens (core/causal_lm.position_ids), so the prefix
keeps positions 0..P-1 and each row's own tokens follow at P..: the same positions, attention and
so the same logits as the row left-padded whole (tests/test_prefix_cache.py). A prefill whose rows differ
much in length (a greeting beside a worded problem) runs packed instead, all rows in one unpadded sequence
(`packed_prefill`), and only its keys and values are then put in that layout.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import DynamicCache, GenerationConfig

from core.causal_lm import left_pad, position_ids
from core.chat_format import generation_prompt_ids
from core.sampling import generate_kwargs_for

MIN_PREFIX_TOKENS = 8  # shorter shared prefixes save less than the cache copy costs
PACK_MIN_PADDING = 0.25  # the share of padded positions above which a prefill runs packed
PACK_MAX_TOKENS = 512  # a packed prefill's attention is dense over all its tokens: quadratic in them


def common_prefix(rows: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix all rows share, always at least one token shorter than the shortest row
    (a prompt's last token must run, to give the logits of the first answer token)."""
    if not rows:
        return []
    shortest = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < shortest and all(r[n] == first[n] for r in rows):
        n += 1
    return list(first[:n])


def system_prefix_ids(tokenizer, system_prompt: str) -> list[int]:
    """The tokens every dialogue with this system prompt starts with: its system turn and whatever of the
    next turn's header the template fixes."""
    probes = [generation_prompt_ids(tokenizer, [{"role": "system", "content": system_prompt},
                                                {"role": "user", "content": text}]) for text in ("a", "z?")]
    return common_prefix(probes)


class PrefixCache:
    """Keys and values of `ids` under `model`'s current weights."""

    def __init__(self, model, ids: Sequence[int]) -> None:
        if len(ids) < 1:
            raise ValueError("an empty prefix has nothing to cache")
        self.ids = list(ids)
        self.config = model.config
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([self.ids], device=model.device), cache=cache, use_cache=True,
                  logits_to_keep=1)
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    def __len__(self) -> int:
        return len(self.ids)

    def covers(self, row: Sequence[int]) -> bool:
        """Whether a prompt starts with the prefix and has at least one token of its own."""
        return len(row) > len(self.ids) and list(row[:len(self.ids)]) == self.ids

    def cache(self, batch_size: int) -> DynamicCache:
        """A fresh cache holding the prefix for `batch_size` rows (generation appends to it)."""
        cache = DynamicCache(config=self.config)
        for index, (keys, values) in enumerate(self.layers):
            cache.update(keys.expand(batch_size, -1, -1, -1).clone(), values.expand(batch_size, -1, -1, -1).clone(),
                         index)
        return cache

    def batch(self, rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full input ids and attention mask, (B, P + S), of rows that all start with the prefix: the
        prefix, then each row's rest left-padded."""
        rest, rest_mask = left_pad([r[len(self.ids):] for r in rows], pad_id)
        prefix = torch.tensor([self.ids] * len(rows), dtype=torch.long)
        return torch.cat([prefix, rest], dim=1), torch.cat([torch.ones_like(prefix), rest_mask], dim=1)


def prefill(model, rows: Sequence[Sequence[int]], pad_id: int, prefix: PrefixCache | None):
    """One forward pass over prompts that a batch decodes from: returns (output whose logits are each
    row's last position's, (B, 1, V); attention mask (B, T); cache). Rows all covered by `prefix` run
    only their own tokens; rows whose padding would waste much of the pass run packed (`packed_prefill`)."""
    covered = prefix is not None and all(prefix.covers(r) for r in rows)
    own = [r[len(prefix):] for r in rows] if covered else rows
    if worth_packing(model, own):
        return packed_prefill(model, own, prefix if covered else None)
    return padded_prefill(model, rows, pad_id, prefix if covered else None)


def padded_prefill(model, rows: Sequence[Sequence[int]], pad_id: int, prefix: PrefixCache | None):
    """`prefill` of rows left-padded to one width (after `prefix`'s keys and values, which must cover them)."""
    if prefix is not None:
        input_ids, attention_mask = prefix.batch(rows, pad_id)
        cache = prefix.cache(len(rows))
        positions = position_ids(attention_mask)[:, len(prefix):]
        input_ids = input_ids[:, len(prefix):]
    else:
        input_ids, attention_mask = left_pad(rows, pad_id)
        cache = DynamicCache(config=model.config)
        positions = position_ids(attention_mask)
    device = model.device
    attention_mask = attention_mask.to(device)
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask, position_ids=positions.to(device),
                cache=cache, use_cache=True, logits_to_keep=1)
    return out, attention_mask, cache


def worth_packing(model, rows: Sequence[Sequence[int]]) -> bool:
    """Whether rows run faster packed into one sequence than left-padded: when padding would be over a
    quarter of the padded positions (on a CPU a forward's cost grows with them), while the packed
    attention, dense over all the rows' tokens, stays small; and only where a custom 4D mask is honoured."""
    if len(rows) < 2 or model.config._attn_implementation not in ("sdpa", "eager"):
        return False
    total = sum(len(r) for r in rows)
    return total <= PACK_MAX_TOKENS and total < (1 - PACK_MIN_PADDING) * len(rows) * max(len(r) for r in rows)


def packed_prefill(model, rows: Sequence[Sequence[int]], prefix: PrefixCache | None):
    """`prefill` of rows concatenated into one sequence, without padding: each token attends to the
    prefix and to its own row's earlier tokens (a block-diagonal causal mask) at its row's positions.
    The keys and values are then laid out as the padded batch's, [prefix][left padding][row], so that
    decoding goes on exactly as from `prefill`. Returns what `prefill` returns."""
    device = model.device
    start = len(prefix) if prefix is not None else 0
    lengths = torch.tensor([len(r) for r in rows])
    row_of = torch.repeat_interleave(torch.arange(len(rows)), lengths)  # (N,)
    offset = torch.cat([torch.arange(n) for n in lengths.tolist()])  # each token's index in its row
    n = len(row_of)
    sees = (row_of[:, None] == row_of[None, :]) & (offset[None, :] <= offset[:, None])  # (N, N)
    sees = torch.cat([torch.ones(n, start, dtype=torch.bool), sees], dim=1)
    mask = torch.zeros(sees.shape, dtype=model.dtype).masked_fill(~sees, torch.finfo(model.dtype).min)
    cache = prefix.cache(1) if prefix is not None else DynamicCache(config=model.config)
    ends = torch.cumsum(lengths, 0) - 1
    out = model(input_ids=torch.tensor([[t for r in rows for t in r]], device=device),
                attention_mask=mask[None, None].to(device), position_ids=(start + offset)[None].to(device),
                cache=cache, use_cache=True, logits_to_keep=ends.to(device))
    out.logits = out.logits[0, :, None]  # (B, 1, V): one row per prompt, as from a padded batch
    width = int(lengths.max())
    attention_mask = torch.zeros(len(rows), start + width, dtype=torch.long)
    attention_mask[:, :start] = 1
    take = torch.zeros(len(rows), start + width, dtype=torch.long)  # where each column's keys come from
    take[:, :start] = torch.arange(start)
    for i, (end, length) in enumerate(zip(ends.tolist(), lengths.tolist())):
        attention_mask[i, start + width - length:] = 1
        take[i, start + width - length:] = torch.arange(start + end + 1 - length, start + end + 1)
    take = take.flatten().to(device)
    laid_out = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        keys, values = (x[0].index_select(1, take).unflatten(1, (len(rows), -1)).transpose(0, 1).contiguous()
                        for x in (layer.keys, layer.values))
        laid_out.update(keys, values, index)
    return out, attention_mask.to(device), laid_out


def generate_answers(model, rows: Sequence[Sequence[int]], pad_id: int, prefix: PrefixCache | None,
                     generation_config: GenerationConfig, token_draw: str = "inverse_cdf") -> torch.Tensor:
    """`model.generate` on prompts (token id lists); returns only the answers' tokens (B, R), padded
    after EOS as `generate` pads. Rows all covered by `prefix` start from its cache. A sampling config's
    tokens are drawn as `token_draw` says (core/sampling.py)."""
    generation_config = copy.copy(generation_config)
    generation_config.pad_token_id = pad_id
    generate_kwargs = generate_kwargs_for(generation_config, token_draw)
    if prefix is not None and all(prefix.covers(r) for r in rows):
        input_ids, attention_mask = prefix.batch(rows, pad_id)
        generate_kwargs["cache"] = prefix.cache(len(rows))
    else:
        input_ids, attention_mask = left_pad(rows, pad_id)
    device = model.device
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         **generate_kwargs)
    return out[:, input_ids.shape[1]:]


def shared_prefix_cache(model, rows: Sequence[Sequence[int]]) -> PrefixCache | None:
    """A cache of what all `rows` share, when that is worth caching (the system turn of a run's prompts)."""
    ids = common_prefix(rows)
    return PrefixCache(model, ids) if len(ids) >= MIN_PREFIX_TOKENS else None
