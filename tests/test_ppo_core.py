"""Tests of the PPO maths against hand-computed values and torch.distributions references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical

from core.causal_lm import logprobs_from_logits
from rlhf.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalty,
    last_response_index,
    length_penalty_for_unfinished,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# -- log-probs and entropy ---------------------------------------------------------------------

def test_logprobs_match_categorical():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)  # (B, T, V)
    tokens = torch.randint(0, 5, (2, 3))  # (B, T)
    expected = Categorical(logits=logits).log_prob(tokens)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), expected)


def test_logprobs_hand_value_and_stability():
    # softmax([0, log 3]) = [1/4, 3/4]; shifting every logit by 1e4 must change nothing.
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1]])
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), t([math.log(0.75)]))
    shifted = logprobs_from_logits(logits + 1e4, tokens)
    torch.testing.assert_close(shifted, t([math.log(0.75)]), atol=1e-3, rtol=0)
    huge = torch.tensor([[[1e4, -1e4]]])
    assert torch.isfinite(logprobs_from_logits(huge, torch.tensor([[1]]))).all()


def test_entropy_matches_categorical():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7)
    torch.testing.assert_close(entropy_from_logits(logits), Categorical(logits=logits).entropy())


def test_entropy_hand_values_with_filtered_vocabulary():
    # Uniform over 4 tokens: log 4. Two tokens filtered out (-inf): uniform over 2, log 2.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -math.inf, -math.inf]]])
    torch.testing.assert_close(entropy_from_logits(logits), t([math.log(4.0), math.log(2.0)]))


# -- masked statistics -------------------------------------------------------------------------

X = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)  # entries 1, 2, 4


def test_masked_mean_hand_values():
    torch.testing.assert_close(masked_mean(X, MASK), torch.tensor(7 / 3))  # (1 + 2 + 4) / 3
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_mean(X, MASK.float()), torch.tensor(7 / 3))


def test_masked_mean_ignores_inf_and_nan_at_masked_positions():
    x = X.clone()
    x[0, 2], x[1, 1] = math.inf, math.nan
    torch.testing.assert_close(masked_mean(x, MASK), torch.tensor(7 / 3))


def test_masked_var_hand_values():
    # Deviations from 7/3: -4/3, -1/3, 5/3; squares sum to 42/9 = 14/3.
    torch.testing.assert_close(masked_var(X, MASK, unbiased=False), torch.tensor(14 / 9))
    torch.testing.assert_close(masked_var(X, MASK), torch.tensor(7 / 3))  # 14/3 / (3 - 1)
    torch.testing.assert_close(masked_var(X, MASK), torch.tensor([1.0, 2.0, 4.0]).var())
    with pytest.raises(ValueError):
        masked_var(X, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_masked_whiten_mean_zero_var_one_over_masked_entries():
    torch.manual_seed(2)
    x = torch.randn(4, 6) * 3 + 5
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 4:], mask[2, 1:] = False, False
    x[~mask] = 1e6  # padding must not move the statistics
    w = masked_whiten(x, mask)
    torch.testing.assert_close(masked_mean(w, mask), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_var(w, mask), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert (w[~mask] == 0).all()


def test_masked_whiten_hand_values_and_shift_mean():
    # Entries 1, 2, 4: mean 7/3, unbiased std sqrt(7/3) = 1.527525.
    w = masked_whiten(X, MASK)
    torch.testing.assert_close(w[MASK], torch.tensor([-0.872872, -0.218218, 1.091089]))
    kept = masked_whiten(X, MASK, shift_mean=False)  # same spread, mean 7/3 kept
    torch.testing.assert_close(kept[MASK], torch.tensor([1.460461, 2.115115, 3.424422]))
    torch.testing.assert_close(masked_mean(kept, MASK), torch.tensor(7 / 3))


# -- KL penalty and per-token rewards ----------------------------------------------------------

def test_kl_penalty_is_the_log_ratio():
    logp, ref = t(0.0, 1.0), t(1.0, 0.0)
    torch.testing.assert_close(kl_penalty(logp, ref), t(-1.0, 1.0))


def test_kl_estimator_is_unbiased():
    # Averaged over tokens sampled from the policy, the log-ratio estimates KL(p || q).
    torch.manual_seed(3)
    p = Categorical(probs=torch.tensor([0.5, 0.3, 0.2]))
    q = Categorical(probs=torch.tensor([0.2, 0.3, 0.5]))
    exact = torch.distributions.kl_divergence(p, q)  # 0.3 * ln(2.5) = 0.274887
    tokens = p.sample((200_000,))
    estimate = kl_penalty(p.log_prob(tokens), q.log_prob(tokens)).mean()
    torch.testing.assert_close(estimate, exact, atol=5e-3, rtol=0)


def test_per_token_rewards_hand_values():
    logp = t([-1.0, -2.0, -0.5], [-1.0, -1.0, 9.0])
    ref = t([-1.5, -1.0, -0.5], [-2.0, -1.0, -9.0])  # row 1, t=2 is padding: 18 must not leak
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    score = torch.tensor([1.0, -2.0])
    rewards, kl = per_token_rewards(score, logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, t([0.5, -1.0, 0.0], [1.0, 0.0, 0.0]))
    # -0.1 * kl everywhere; the score lands on t=2 in row 0 and t=1 in row 1.
    torch.testing.assert_close(rewards, t([-0.05, 0.1, 1.0], [-0.1, -2.0, 0.0]))


def test_per_token_rewards_pays_token_scores_on_their_tokens():
    """A reward that is a sum over tokens: each token's part on it, the rest of the score on the last
    token, so every answer's rewards still add up to score - beta * KL."""
    logp, ref = t([-1.0, -2.0, -0.5], [-1.0, -1.0, 9.0]), t([-1.5, -1.0, -0.5], [-2.0, -1.0, -9.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    score = torch.tensor([1.0, -2.0])  # row 0: 0.5 + 0.25 from tokens 0 and 1, 0.25 left for the end
    parts = t([0.5, 0.25, 0.0], [-1.5, 0.0, 7.0])  # row 1, t=2 is padding: its 7 must not count
    rewards, kl = per_token_rewards(score, logp, ref, mask, kl_coef=0.1, token_scores=parts)
    torch.testing.assert_close(rewards, t([-0.05 + 0.5, 0.1 + 0.25, 0.25], [-0.1 - 1.5, -0.5, 0.0]))
    torch.testing.assert_close(rewards.sum(1), score - 0.1 * kl.sum(1))


def test_per_token_rewards_score_lands_on_the_last_response_token_with_left_padding():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])  # prompt, response, padding
    assert last_response_index(mask).tolist() == [2, 3]
    zeros = torch.zeros(2, 4)
    rewards, _ = per_token_rewards(torch.tensor([3.0, 4.0]), zeros, zeros, mask, 0.1)
    torch.testing.assert_close(rewards, t([0, 0, 3.0, 0], [0, 0, 0, 4.0]))


# -- GAE ---------------------------------------------------------------------------------------

def test_gae_hand_computed_1x3():
    # gamma = 1, lam = 0.5, rewards [1, 0, 2], values [0.5, 1.0, 1.5]; V = 0 after the end.
    # t=2: delta = 2 + 0   - 1.5 = 0.5                      A2 = 0.5
    # t=1: delta = 0 + 1.5 - 1.0 = 0.5   A1 = 0.5 + 0.5 * 0.5  = 0.75
    # t=0: delta = 1 + 1.0 - 0.5 = 1.5   A0 = 1.5 + 0.5 * 0.75 = 1.875
    # returns = A + V = [2.375, 1.75, 2.0]
    rewards, values = t([1.0, 0.0, 2.0]), t([0.5, 1.0, 1.5])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, t([1.875, 0.75, 0.5]))
    torch.testing.assert_close(returns, t([2.375, 1.75, 2.0]))


def test_gae_padding_does_not_leak():
    # Same episode followed by two padding positions with arbitrary rewards and values.
    rewards, values = t([1.0, 0.0, 2.0, 100.0, -7.0]), t([0.5, 1.0, 1.5, 50.0, 9.0])
    mask = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, t([1.875, 0.75, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(returns, t([2.375, 1.75, 2.0, 0.0, 0.0]))


def test_gae_lam_one_is_monte_carlo_and_lam_zero_is_td():
    rewards, values = t([1.0, 0.0, 2.0]), t([0.5, 1.0, 1.5])
    mask = torch.ones(1, 3)
    # lam = 1: A_t = sum_k gamma^k r_{t+k} - V_t with gamma = 0.9
    # G = [1 + 0.9*0 + 0.81*2, 0 + 0.9*2, 2] = [2.62, 1.8, 2.0]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(returns, t([2.62, 1.8, 2.0]))
    torch.testing.assert_close(advantages, t([2.12, 0.8, 0.5]))
    # lam = 0: A_t = delta_t = r_t + 0.9 V_{t+1} - V_t = [1.4, 0.35, 0.5]
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    torch.testing.assert_close(advantages, t([1.4, 0.35, 0.5]))


# -- losses ------------------------------------------------------------------------------------

def test_policy_loss_hand_values_and_clipped_gradient():
    # ratios [1.5, 1.5, 0.9, 0.5], advantages [1, -1, 2, -1], clip 0.2:
    #   t=0 A>0, ratio > 1.2: max(-1.5, -1.2) = -1.2 clipped    -> no gradient
    #   t=1 A<0, ratio > 1.2: max( 1.5,  1.2) =  1.5 unclipped  -> gradient -A*ratio/4 = 0.375
    #   t=2 inside the range:                   -1.8            -> gradient -1.8/4 = -0.45
    #   t=3 A<0, ratio < 0.8: max( 0.5,  0.8) =  0.8 clipped    -> no gradient
    # loss = (-1.2 + 1.5 - 1.8 + 0.8) / 4 = -0.175, clipfrac = 2/4
    ratios = [1.5, 1.5, 0.9, 0.5]
    logprobs = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    old = torch.zeros(1, 4)
    advantages = t([1.0, -1.0, 2.0, -1.0])
    loss, stats = policy_loss(logprobs, old, advantages, torch.ones(1, 4), clip_range=0.2)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-0.175))
    torch.testing.assert_close(logprobs.grad, t([0.0, 0.375, -0.45, 0.0]))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.5))
    # 0.5 * (2 ln(1.5)^2 + ln(0.9)^2 + ln(0.5)^2) / 4 = 0.5 * 0.820358 / 4
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(0.1025447))


def test_policy_loss_ignores_padding_even_when_ratio_overflows():
    logprobs = torch.tensor([[math.log(0.9), 200.0]], requires_grad=True)  # exp(200) = inf
    old, advantages = torch.zeros(1, 2), t([2.0, 5.0])
    mask = torch.tensor([[1.0, 0.0]])
    loss, stats = policy_loss(logprobs, old, advantages, mask)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-1.8))
    torch.testing.assert_close(logprobs.grad, t([-1.8, 0.0]))
    assert stats["clipfrac"] == 0


def test_value_loss_hand_values_and_clipped_gradient():
    # values [1, 2, 0], old [0.5, 1, 0], returns [2, 1, 1], clip 0.2 -> clipped [0.7, 1.2, 0]
    #   t=0: (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69, clipped branch -> no gradient
    #   t=1: (2-1)^2 = 1, (1.2-1)^2 = 0.04 -> 1,    gradient 0.5 * 2 * (2-1) / 3 = 1/3
    #   t=2: both 1                        -> 1,    gradient 0.5 * 2 * (0-1) / 3 = -1/3
    # loss = 0.5 * (1.69 + 1 + 1) / 3 = 0.615, vf_clipfrac = 1/3
    values = torch.tensor([[1.0, 2.0, 0.0, 42.0]], requires_grad=True)  # t=3 is padding
    old, returns = t([0.5, 1.0, 0.0, -42.0]), t([2.0, 1.0, 1.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.615))
    torch.testing.assert_close(values.grad, t([0.0, 1 / 3, -1 / 3, 0.0]))
    torch.testing.assert_close(stats["vf_clipfrac"], torch.tensor(1 / 3))


# -- KL coefficient and length penalty ---------------------------------------------------------

def test_adaptive_kl_controller_moves_towards_target():
    # error clipped to +-0.2; mult = 1 + 0.2 * 256 / 10000 = 1.00512
    above = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert above.update(9.0, n_steps=256) == pytest.approx(0.2 * 1.00512)
    below = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert below.update(torch.tensor(3.0), n_steps=256) == pytest.approx(0.2 * 0.99488)
    small = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert small.update(6.6, n_steps=256) == pytest.approx(0.2 * 1.00256)  # error 0.1
    at_target = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert at_target.update(6.0, n_steps=256) == pytest.approx(0.2)
    assert above.value > 0.2 > below.value


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=256)
    assert ctl.value == 0.05


def test_length_penalty_for_unfinished():
    score = torch.tensor([1.0, 2.0, 0.5])
    ended = torch.tensor([True, False, False])
    torch.testing.assert_close(length_penalty_for_unfinished(score, ended, 1.0),
                               torch.tensor([1.0, 1.0, -0.5]))
