"""PPO fine-tuning of the tutor against a reward function (InstructGPT, Ouyang et al. 2022).

One update is the numbered steps of lm-human-preferences / cleanrl:
  1. generate answers to a batch of prompts by sampling from the policy
  2. score them with the reward function (minus a penalty for answers that never ended)
  3. log-probs of the policy (old) and the reference, and the values, on the sampled tokens
  4. per-token rewards: -kl_coef * KL to the reference on every token, the score on the last
  5. advantages and returns by GAE; advantages whitened
  6. a few epochs of minibatch PPO (clipped policy loss + vf_coef * clipped value loss),
     then the adaptive KL controller moves kl_coef towards target_kl
The maths lives in rlhf/ppo_core.py; this file only wires it up.

Memory holds one copy of the weights: the base model is frozen and the policy is LoRA adapters
on it; the reference is the same base with the adapters disabled; the value head is a linear
layer on the policy's last hidden state. Policy and value share the LoRA trunk (cleanrl's shared
network): a separate value model would cost a second base or a second adapter set swapped in on
every step, and vf_coef keeps the value regression from dominating the policy's gradient.

Accelerate places the model and runs backward / mixed precision, so `accelerate launch` runs the
same code data-parallel: every process generates its own rollout_batch_size answers, statistics
and the KL controller use the mean over processes, advantages are whitened per process.

Alignment (core/causal_lm.py): logits at position t predict token t + 1. For a (B, P + R) prompt +
response batch, logits[:, P - 1 : P + R - 1] score the R response tokens, and the value at the same
position is V of the state just before that token. The response mask covers the generated tokens up to and
including the first EOS, never the padding after it.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, set_seed
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from core.causal_lm import answer_logprob, answer_mask, causal_lm_forward, left_pad, logprobs_from_logits, right_pad
from core.chat_format import (ANSWER_MAX_NEW_TOKENS, ANSWER_TEMPERATURE, end_of_turn_ids, generation_prompt_ids,
                              scored_answer_ids)
from core.prefix_cache import generate_answers, shared_prefix_cache
from core.sampling import check_token_draw
from core.precision import check_inference_precision, inference_dtype, sampling_copy, wants_bf16
from rlhf import ppo_core
from rlhf.vllm_rollouts import EngineChoice, VLLMRollouts, check_rollout_engine, choose_rollout_engine

Message = dict[str, str]
RewardFn = Callable[[list[list[Message]], list[str], list[list[int]]], torch.Tensor]
# How a reward that is a sum over tokens splits: the answers' token ids -> one value per token each.
TokenRewardFn = Callable[[list[list[int]]], list[torch.Tensor]]


@dataclass
class PPOConfig:
    total_episodes: int = 256  # answers generated over the whole run, all processes together
    rollout_batch_size: int = 16  # answers per update, per process
    minibatch_size: int = 8
    ppo_epochs: int = 2
    learning_rate: float = 1e-4  # LoRA and value head
    lora_r: int = 16
    lora_alpha: int = 32
    # The served answer's length and temperature (core/chat_format.py). The ratio and the KL are taken
    # on the same tempered distribution the rollouts were drawn from (logits / temperature).
    max_new_tokens: int = ANSWER_MAX_NEW_TOKENS
    temperature: float = ANSWER_TEMPERATURE
    top_k: int = 0  # 0: no top-k filtering
    init_kl_coef: float = 0.05
    adaptive_kl: bool = True
    target_kl: float = 6.0  # nats per answer (summed over its tokens)
    kl_horizon: int = 10000
    # Early stop: the run ends before training on a batch whose rollouts are this far (nats per answer)
    # from the reference. Past it PPO mostly exploits the reward model: answers shrink while the reward
    # keeps rising (docs/learning.md, run 1). 0 turns it off.
    stop_kl: float = 8.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    unfinished_penalty: float = 1.0  # subtracted from the score of answers without EOS
    # With a reward that is a sum over the answer's tokens (train_ppo's token_reward_fn), pay each token
    # its part on that token (ppo_core.per_token_rewards); False: the whole score on the last token.
    dense_rewards: bool = True
    max_grad_norm: float = 1.0
    # PPO-ptx (InstructGPT, eq. 2): gamma times the language-modelling loss on demonstrations (the class's
    # rewrites and up-rated answers) added to every minibatch's loss, so the policy keeps writing what
    # learners wrote or approved while it climbs the reward. 0: off.
    ptx_coef: float = 0.0
    ptx_batch_size: int = 4  # demonstrations per PPO minibatch
    ptx_max_length: int = 1024  # tokens of prompt + demonstration; longer ones lose their start
    seed: int = 0
    bf16: str | bool = "auto"  # "auto": as this machine's precision plan says (core/precision.py)
    # Rollouts are sampled by a plain copy of the policy with the LoRA adapters merged, made before each
    # update, as RLHF systems hand fresh weights to a separate generation engine: no adapter products in
    # every decoding step. The old log-probs of the PPO ratio still come from the trained module.
    # False: the trained module samples itself (LoRA unmerged, under autocast when bf16 is on).
    merged_rollouts: bool = True
    # The merged copy's dtype: "auto" (the precision plan: bf16 on a GPU or a CPU with bf16
    # instructions), "bf16" or "fp32".
    rollout_precision: str = "auto"
    # The tutor system prompt's KV cache computed once per update and shared by every rollout
    # (core/prefix_cache.py), instead of once per answer.
    prefix_cache: bool = True
    # Who decodes the merged copy: "auto" (vLLM on a GPU where it is installed, else generate), "hf"
    # (generate), "vllm" (as auto, saying why when it falls back). rlhf/vllm_rollouts.py.
    rollout_engine: str = "auto"
    # How generate draws each rollout token: "inverse_cdf" (one uniform number per answer,
    # core/sampling.py) or "multinomial" (generate's own draw, one random number per vocabulary
    # entry). The same distribution; vLLM draws its own way.
    token_draw: str = "inverse_cdf"

    def __post_init__(self) -> None:
        check_inference_precision(self.rollout_precision)
        check_token_draw(self.token_draw)
        check_rollout_engine(self.rollout_engine)
        if self.ptx_coef < 0 or self.ptx_batch_size < 1:
            raise ValueError(f"ptx_coef must be >= 0 and ptx_batch_size >= 1, not {self.ptx_coef}, {self.ptx_batch_size}")

    def use_bf16(self) -> bool:
        return wants_bf16(self.bf16)


@dataclass
class PPOResult:
    model: nn.Module  # the policy: LoRA merged into a plain model, or the PeftModel if merge=False
    value_head: nn.Linear
    history: list[dict] = field(default_factory=list)  # one entry of statistics per update


class PolicyAndValue(nn.Module):
    """LoRA policy with a value head, on a frozen base that doubles as the reference."""

    def __init__(self, model: nn.Module, config: PPOConfig):
        super().__init__()
        # lora_dropout=0: the policy must be deterministic, or the PPO ratio of the first
        # epoch would not start at 1. get_peft_model freezes the base and wraps it in place.
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        # A model fresh from a Trainer (this cycle's SFT step) keeps gradient checkpointing on; with
        # the base frozen, reentrant checkpointing would let no gradient reach the adapters.
        if hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
        self.policy = get_peft_model(model, lora)
        hidden = model.config.get_text_config().hidden_size
        # Starts at V = 0 for every state: the first advantages are the rewards themselves
        # instead of noise from a random head.
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits (B, R, V) and values (B, R) for the last R tokens of input_ids."""
        out = causal_lm_forward(self.policy, input_ids, attention_mask, response_len,
                                output_hidden_states=True)
        hidden = out.hidden_states[-1][:, -response_len - 1:-1]  # (B, R, H), after the final norm
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # (B, R)
        return out.logits[:, :-1], values.float()

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         response_len: int) -> torch.Tensor:
        """Logits (B, R, V) of the reference: the same weights with the adapters switched off."""
        with self.policy.disable_adapter():
            return causal_lm_forward(self.policy, input_ids, attention_mask, response_len).logits[:, :-1]


def rows_in_chunks(forward: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, response_len: int, size: int) -> tuple[torch.Tensor, ...]:
    """forward(ids, mask, response_len) over `size` rows at a time, the rows with the most left padding
    together, its outputs put back in row order. A chunk then runs only as wide as its own prompts
    (causal_lm_forward drops the columns that are padding in every row): one long prompt in a rollout
    batch widens one chunk, not the whole batch."""
    order = attention_mask.argmax(1).argsort(descending=True, stable=True)  # argmax: leading padding
    chunks = [forward(input_ids[rows], attention_mask[rows], response_len) for rows in order.split(size)]
    chunks = [c if isinstance(c, tuple) else (c,) for c in chunks]
    inverse = order.argsort()
    return tuple(torch.cat(parts)[inverse] for parts in zip(*chunks))


def check_gradients_reach(module: nn.Module) -> None:
    """Fails loudly when no gradient reaches the policy's adapters (the update would do nothing)."""
    adapters = [p for name, p in module.named_parameters() if p.requires_grad and "lora_" in name]
    if not any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in adapters):
        raise RuntimeError("PPO: no gradient reaches the LoRA adapters; the policy would not change")


def response_mask(responses: torch.Tensor, eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, R) bool, ended (B,) bool): mask covers the tokens up to and including the
    first EOS; `generate` pads after it (often with the EOS id itself). Rows without EOS keep
    every token and are not ended."""
    is_eos = torch.isin(responses, torch.tensor(list(eos_ids), device=responses.device))  # (B, R)
    eos_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly earlier
    return ~eos_before, is_eos.any(1)


def score_responses(reward_fn: RewardFn, prompts: list[list[Message]], responses: torch.Tensor,
                    mask: torch.Tensor, ended: torch.Tensor, tokenizer,
                    unfinished_penalty: float) -> tuple[torch.Tensor, list[str]]:
    """Scores (B,) float32 and the decoded answers. The reward function sees each answer's
    tokens without the closing EOS and padding; answers that never ended lose the penalty."""
    token_ids = answer_token_ids(responses, mask, ended)
    completions = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    score = torch.as_tensor(reward_fn(prompts, completions, token_ids)).float().to(responses.device)
    score = ppo_core.length_penalty_for_unfinished(score, ended, unfinished_penalty)
    return score, completions


def answer_token_ids(responses: torch.Tensor, mask: torch.Tensor, ended: torch.Tensor) -> list[list[int]]:
    """Each answer's tokens without the closing EOS and the padding."""
    lengths = mask.sum(1) - ended.long()  # (B,)
    return [row[:n].tolist() for row, n in zip(responses.cpu(), lengths.cpu().tolist())]


def token_scores_of(token_reward_fn: TokenRewardFn, responses: torch.Tensor, mask: torch.Tensor,
                    ended: torch.Tensor) -> torch.Tensor:
    """(B, R) float32: each answer token's part of the score at its position; 0 on EOS and padding."""
    out = torch.zeros(responses.shape, dtype=torch.float32)
    for i, parts in enumerate(token_reward_fn(answer_token_ids(responses, mask, ended))):
        out[i, :len(parts)] = torch.as_tensor(parts, dtype=torch.float32)
    return out.to(responses.device)


def generation_config_for(config: PPOConfig, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    # Every filter set explicitly, so a checkpoint's own generation_config (a repetition
    # penalty, a top_p) cannot change the distribution the PPO log-probs assume.
    return GenerationConfig(do_sample=True, temperature=config.temperature, top_k=config.top_k,
                            top_p=1.0, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                            max_new_tokens=config.max_new_tokens, eos_token_id=eos_ids,
                            pad_token_id=pad_id)


def rollout_engine(config: PPOConfig, merged: bool, processes: int) -> EngineChoice:
    """Which engine decodes this run's rollouts, and why: vLLM takes a merged copy's weights, in a
    single-process run (one engine per process under a multi-GPU launch is not built)."""
    if config.rollout_engine == "hf":
        return choose_rollout_engine("hf")
    if not merged:
        return EngineChoice("hf", "rollouts from the trained module itself (no merged copy for vLLM)")
    if processes > 1:
        return EngineChoice("hf", f"{processes} processes: vLLM rollouts run in single-process training only")
    return choose_rollout_engine(config.rollout_engine)


def holds_whole_weights(accelerator: Accelerator) -> bool:
    """Whether this process has every weight of the policy to merge into a sampling copy: FSDP and ZeRO-3
    shard them (those runs sample from the trained module itself)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return False
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage < 3
    return True


def ptx_loss(policy: nn.Module, rows: Sequence[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Mean negative log-likelihood per demonstration token of (prompt + answer ids, answer start) rows."""
    input_ids, attention_mask = right_pad([ids for ids, _ in rows], pad_id)
    starts = torch.tensor([start for _, start in rows])
    tokens = answer_mask(attention_mask, starts).sum().clamp(min=1)
    return -answer_logprob(policy, input_ids, attention_mask, starts).sum() / tokens


def train_ppo(model: nn.Module, tokenizer, prompts: Sequence[list[Message]], reward_fn: RewardFn,
              config: PPOConfig | None = None, progress: Callable[[dict], None] | None = None,
              merge: bool = True, token_reward_fn: TokenRewardFn | None = None,
              demonstrations: Sequence[tuple[list[Message], str]] = ()) -> PPOResult:
    """PPO on `prompts` (chat messages). `model` is a plain causal LM: it is wrapped in LoRA in
    place, and with merge=True the returned model is that same object with the adapters merged.
    token_reward_fn: how reward_fn's score splits over the answer's tokens, when it is such a sum.
    demonstrations: (prompt, answer) pairs for PPO-ptx's language-modelling loss (config.ptx_coef)."""
    config = config or PPOConfig()
    if config.rollout_batch_size % config.minibatch_size:
        raise ValueError("rollout_batch_size must be a multiple of minibatch_size")
    precision = "bf16" if config.use_bf16() else "no"
    if AcceleratorState._shared_state and PartialState().num_processes == 1 \
            and AcceleratorState().mixed_precision != precision:
        # One process, one precision, says accelerate; this cycle's SFT Trainer may have fixed another.
        # Under a multi-process launch the launch's config decides, and a clash stays an error.
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=precision)
    set_seed(config.seed + accelerator.process_index)  # each process samples different answers

    eos_ids = end_of_turn_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    gen_config = generation_config_for(config, eos_ids, pad_id)
    prompts = list(prompts)
    encoded = [generation_prompt_ids(tokenizer, p) for p in prompts]
    ptx_rows = ([scored_answer_ids(tokenizer, p, a, config.ptx_max_length) for p, a in demonstrations]
                if config.ptx_coef else [])
    ptx_order = random.Random(config.seed)

    module = PolicyAndValue(model, config).eval()  # eval: no dropout anywhere, see above
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad],
                                  lr=config.learning_rate, eps=1e-5)
    wrapped, optimizer = accelerator.prepare(module, optimizer)  # wrapped: DDP under accelerate launch
    module = accelerator.unwrap_model(wrapped)
    kl_ctl = (ppo_core.AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
              if config.adaptive_kl else ppo_core.FixedKLController(config.init_kl_coef))

    # The same prompt order on every process (shared generator); each takes its own slice.
    order_gen = torch.Generator().manual_seed(config.seed)
    episodes_per_update = config.rollout_batch_size * accelerator.num_processes
    num_updates = max(1, config.total_episodes // episodes_per_update)
    queue: list[int] = []
    history: list[dict] = []
    device = accelerator.device
    rollout_dtype = inference_dtype(config.rollout_precision)
    merged = config.merged_rollouts and holds_whole_weights(accelerator)
    engine = rollout_engine(config, merged, accelerator.num_processes)
    vllm = (VLLMRollouts(module.policy.config, rollout_dtype, config.seed,
                         max_model_len=max(map(len, encoded)) + config.max_new_tokens)
            if engine.engine == "vllm" else None)

    for update in range(1, num_updates + 1):
        while len(queue) < episodes_per_update:
            queue += torch.randperm(len(prompts), generator=order_gen).tolist()
        batch, queue = queue[:episodes_per_update], queue[episodes_per_update:]
        start = accelerator.process_index * config.rollout_batch_size
        b_prompt_idx = batch[start:start + config.rollout_batch_size]
        b_prompts = [prompts[i] for i in b_prompt_idx]
        t0 = time.perf_counter()

        with torch.no_grad(), accelerator.autocast():
            # 1. generate
            rows = [encoded[i] for i in b_prompt_idx]
            queries, query_mask = left_pad(rows, pad_id)
            queries, query_mask = queries.to(device), query_mask.to(device)
            sampler = sampling_copy(module.policy, rollout_dtype) if merged else module.policy
            if vllm is not None:  # the weights just trained, then vLLM decodes
                vllm.load_weights(sampler)
                b_responses = vllm.generate(rows, config.max_new_tokens, config.temperature, config.top_k,
                                            eos_ids, pad_id).to(device)  # (B, R)
            else:
                prefix = shared_prefix_cache(sampler, rows) if config.prefix_cache else None
                b_responses = generate_answers(sampler, rows, pad_id, prefix, gen_config,
                                               token_draw=config.token_draw)  # (B, R)
                del prefix
            del sampler
            b_query_responses = torch.cat([queries, b_responses], dim=1)  # (B, P + R)
            R = b_responses.shape[1]
            b_mask, b_ended = response_mask(b_responses, eos_ids)  # (B, R), (B,)
            b_attention = torch.cat([query_mask, b_mask.long()], dim=1)  # (B, P + R)
            gen_seconds = time.perf_counter() - t0

            # 2. score
            b_scores, _ = score_responses(reward_fn, b_prompts, b_responses, b_mask, b_ended,
                                          tokenizer, config.unfinished_penalty)  # (B,)

            # 3. log-probs of policy (old) and reference, and values: one pass each, a minibatch of rows at a time
            logits, b_values = rows_in_chunks(wrapped, b_query_responses, b_attention, R,
                                              config.minibatch_size)  # (B, R, V), (B, R)
            logits = logits / config.temperature
            b_logprobs = logprobs_from_logits(logits, b_responses)  # (B, R)
            entropy = ppo_core.masked_mean(ppo_core.entropy_from_logits(logits), b_mask)
            del logits
            ref_logits, = rows_in_chunks(module.reference_logits, b_query_responses, b_attention, R,
                                         config.minibatch_size)
            b_ref_logprobs = logprobs_from_logits(ref_logits / config.temperature, b_responses)  # (B, R)
            del ref_logits

            # 4. per-token KL penalty + score on the last response token (or on each token, when it splits)
            b_token_scores = (token_scores_of(token_reward_fn, b_responses, b_mask, b_ended)
                              if token_reward_fn is not None and config.dense_rewards else None)
            b_rewards, b_kl = ppo_core.per_token_rewards(b_scores, b_logprobs, b_ref_logprobs, b_mask,
                                                         kl_ctl.value, token_scores=b_token_scores)  # (B, R) each
            if config.whiten_rewards:
                b_rewards = ppo_core.masked_whiten(b_rewards, b_mask, shift_mean=False)

            mean_kl = accelerator.reduce(b_kl.sum(1).mean().float(), reduction="mean").item()
            if config.stop_kl and mean_kl > config.stop_kl:
                history.append({"update": update, "episodes": (update - 1) * episodes_per_update,
                                "stopped": f"KL to the reference {mean_kl:.2f} > stop_kl {config.stop_kl}",
                                "gen_seconds": gen_seconds})  # sampled, then not trained on
                if progress is not None and accelerator.is_main_process:
                    progress(history[-1])
                break

            # 5. GAE; whitened advantages
            b_advantages, b_returns = ppo_core.gae(b_rewards, b_values, b_mask, config.gamma, config.lam)
            b_advantages = ppo_core.masked_whiten(b_advantages, b_mask)

        # 6. minibatch PPO epochs
        step_stats: list[torch.Tensor] = []
        ptx_losses: list[torch.Tensor] = []
        for _ in range(config.ppo_epochs):
            b_inds = torch.randperm(config.rollout_batch_size, device=device)
            for mb_start in range(0, config.rollout_batch_size, config.minibatch_size):
                mb_inds = b_inds[mb_start:mb_start + config.minibatch_size]
                mb_mask = b_mask[mb_inds]
                logits, mb_values = wrapped(b_query_responses[mb_inds], b_attention[mb_inds], R)
                mb_logprobs = logprobs_from_logits(logits / config.temperature, b_responses[mb_inds])
                pg_loss, pg_stats = ppo_core.policy_loss(mb_logprobs, b_logprobs[mb_inds],
                                                         b_advantages[mb_inds], mb_mask, config.clip_range)
                vf_loss, vf_stats = ppo_core.value_loss(mb_values, b_values[mb_inds], b_returns[mb_inds],
                                                        mb_mask, config.clip_range_value)
                loss = pg_loss + config.vf_coef * vf_loss
                if ptx_rows:  # PPO-ptx: keep the demonstrations likely
                    with accelerator.autocast():
                        mb_ptx = ptx_loss(module.policy, ptx_order.sample(ptx_rows, min(config.ptx_batch_size,
                                                                                          len(ptx_rows))), pad_id)
                    loss = loss + config.ptx_coef * mb_ptx
                    ptx_losses.append(mb_ptx.detach())
                optimizer.zero_grad()
                accelerator.backward(loss)
                if not history and not step_stats:
                    check_gradients_reach(module)
                accelerator.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm)
                optimizer.step()
                step_stats.append(torch.stack([pg_loss.detach(), vf_loss.detach(), pg_stats["clipfrac"],
                                               pg_stats["approx_kl"], vf_stats["vf_clipfrac"]]))
        pg_mean, vf_mean, clipfrac, approx_kl, vf_clipfrac = torch.stack(step_stats).mean(0)

        # Statistics averaged over processes; the KL controller sees the same mean KL everywhere.
        answer_length = (b_mask.sum(1) - b_ended.long()).float()  # tokens, without EOS
        rollout = torch.stack([b_scores.mean(), b_kl.sum(1).mean(), entropy, answer_length.mean(),
                               b_ended.float().mean(), pg_mean, vf_mean, clipfrac, approx_kl,
                               vf_clipfrac, b_rewards.sum(1).mean()]).float()
        rollout = accelerator.reduce(rollout, reduction="mean").tolist()
        stats = {"update": update, "episodes": update * episodes_per_update, "kl_coef": kl_ctl.value}
        stats |= dict(zip(["score", "kl", "entropy", "answer_length", "frac_ended", "policy_loss",
                           "value_loss", "clipfrac", "approx_kl", "vf_clipfrac", "total_reward"], rollout))
        kl_ctl.update(stats["kl"], episodes_per_update)
        # train_seconds: everything but sampling (scoring, the three forward passes, PPO epochs).
        stats |= {"gen_seconds": gen_seconds, "train_seconds": time.perf_counter() - t0 - gen_seconds}
        if ptx_losses:
            stats["ptx_loss"] = accelerator.reduce(torch.stack(ptx_losses).mean().float(), reduction="mean").item()
        history.append(stats)
        if progress is not None and accelerator.is_main_process:
            progress(stats)

    accelerator.wait_for_everyone()
    if vllm is not None:
        vllm.close()
    policy = module.policy.merge_and_unload() if merge else module.policy
    return PPOResult(model=policy, value_head=module.value_head, history=history)


def save_history(history: list[dict], path: str | Path) -> Path:
    """Writes the per-update statistics as JSONL: one JSON object per update, in order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for stats in history:
            f.write(json.dumps(stats) + "\n")
    return path
