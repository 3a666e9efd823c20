"""PPO maths for RLHF (Ouyang et al. 2022, after Ziegler et al. 2019 / lm-human-preferences).

Small torch-only functions, one per equation, so the PPO loop can read as numbered steps:
rewards from the reward model and the per-token KL penalty to the reference, GAE, then the
clipped policy and value losses (token log-probs from logits are core/causal_lm.py's). Every
tensor is (B, T) over the same token positions, and `mask` (B, T), float or bool, marks the
response tokens the policy generated; prompt and padding positions never contribute to a result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, (B, T); a row at a time (see
    core.causal_lm.logprobs_from_logits: the whole batch in float32 is several full-vocabulary copies)."""
    out = []
    for row in logits:
        logp = F.log_softmax(row.float(), dim=-1)  # (T, V)
        p = logp.exp()
        # Filtered vocabulary entries (logit -inf) have p = 0; 0 * -inf would be nan.
        out.append(-(p * torch.where(p > 0, logp, 0.0)).sum(-1))
    return torch.stack(out) if out else logits.new_zeros(logits.shape[:-1], dtype=torch.float32)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is set.

    torch.where rather than x * mask, so an inf or nan at a padding position cannot leak in
    (inf * 0 is nan). An empty mask gives 0 instead of nan.
    """
    m = mask.bool()
    total = torch.where(m, x, 0.0).sum() if dim is None else torch.where(m, x, 0.0).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp_min(1).to(total.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked entries (all rows pooled, as the whitening needs)."""
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered**2, mask)
    if unbiased:
        n = int(mask.bool().sum())
        if n < 2:
            raise ValueError(f"unbiased masked variance needs at least 2 entries, got {n}")
        var = var * n / (n - 1)  # Bessel's correction
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise x to unit variance over the masked entries; zero elsewhere.

    shift_mean=True also centres it (advantages). shift_mean=False keeps the mean, so
    normalising rewards rescales them without turning a good batch into an average one.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy: the log-ratio
    (k1), unbiased, the estimator InstructGPT uses. Summed over an answer it is the Monte Carlo KL of
    the whole answer that the gate measures too. (B, T)"""
    return logprobs - ref_logprobs


def last_response_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last response token of each row, (B,); 0 for a row without one."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask.bool(), positions, 0).amax(dim=1)


def per_token_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float | torch.Tensor,
                      token_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """R(x, y) = r(x, y) - beta * KL, spread over tokens as in Ziegler et al.: the KL penalty
    on every response token, the reward-model score on the last one (the only token after
    which the whole answer has been seen). Returns (rewards, kl), both (B, T).

    token_scores (B, T): the part of each score that belongs to single tokens, for a reward that is a
    sum over the answer's tokens. Each part is paid on its own token and the rest of the score on the
    last one: the same return, but the credit lands where the token was chosen instead of reaching it
    through GAE's lambda^k (0.95^50 = 0.08 fifty tokens before the end).
    """
    m = mask.bool()
    kl = torch.where(m, kl_penalty(logprobs, ref_logprobs), 0.0)  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    if token_scores is not None:
        token_scores = torch.where(m, token_scores.to(rewards.dtype), 0.0)
        rewards = rewards + token_scores
        score = score - token_scores.sum(1)
    last_index = last_response_index(mask)  # (B,)
    has_response = m.any(dim=1)  # (B,)
    bonus = torch.where(has_response, score.to(rewards.dtype), 0.0)  # (B,)
    rewards = rewards.scatter_add(1, last_index.long().unsqueeze(1), bonus.unsqueeze(1))
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), backwards over T.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}.
    The episode ends at the last response token: V and A beyond it count as 0, so values
    the value head predicted on padding never bootstrap into the answer. The response is
    assumed contiguous. Returns (advantages, returns), zero outside the mask; whitening the
    advantages is left to the caller (masked_whiten).
    """
    m = mask.to(values.dtype)  # (B, T)
    values, rewards = values * m, rewards * m
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * m[:, t]
        advantages[:, t] = next_advantage
    returns = (advantages + values) * m  # lambda-returns, the value head's regression target
    return advantages, returns


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate: mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))."""
    # Mask the log-ratio before exp: a huge difference at a padding position would give
    # ratio = inf and a nan gradient, even though torch.where discards its value.
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)  # (B, T)
    ratio = log_ratio.exp()
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses_clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
            # 0.5 * log_ratio^2 (k2): cheap, non-negative, tracks how far one epoch moved.
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range_value: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (clip(V, V_old +- c) - R)^2)."""
    values_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    vf_losses = (values - returns) ** 2  # (B, T)
    vf_losses_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_losses_clipped > vf_losses).float(), mask)}
    return loss, stats


class AdaptiveKLController:
    """KL coefficient beta steered towards a target KL (Ziegler et al. 2019, eq. 2).

    The error is clipped to +-0.2 so one unusual batch cannot swing beta by much.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return self.value


class FixedKLController:
    """Constant KL coefficient, with the adaptive controller's interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        return self.value


def length_penalty_for_unfinished(score: torch.Tensor, ended: torch.Tensor,
                                  penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the score of answers cut off at the length limit without EOS,
    so the policy cannot earn reward with text the reward model never saw finished."""
    return torch.where(ended.bool(), score, score - penalty)
