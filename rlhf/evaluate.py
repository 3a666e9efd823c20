"""Evaluate a new policy against the current one on held-out prompts, and the promotion gate.

PPO has just optimised the reward model, so its score alone proves little. The gate asks for all of:
- reward of new vs current on held-out prompts, controlled for answer length (reward minus its linear
  dependence on length, fitted on both policies' answers), with a bootstrap 95% CI above zero (several
  sampled answers per prompt, prompts resampled);
- KL to this cycle's reference and cumulative KL to the base version, each under its limit;
- mean answer length within a drift band of the current policy's;
- correctness on a fixed regression set of checkable tutoring questions not lower beyond noise.

Length control guards against the known failure of reward models: a gain bought by length alone. When
the users' own choices (all their rankings, ratings and rewrites so far) show that they prefer shorter
(or longer) answers, with a 95% interval clear of 50%, length is a real preference: a policy that moved
in that direction is then judged on its uncorrected reward, and the drift band applies only the other way.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from app.versions import for_sampling, inference_dtype
from rlhf.ppo import causal_lm_forward, left_pad, right_pad
from rlhf.ppo_core import logprobs_from_logits

REGRESSION_SET = Path(__file__).parent / "assets" / "regression_set.jsonl"


@dataclass
class GateConfig:
    max_kl_reference: float = 12.0  # nats per answer, new policy vs this cycle's reference
    max_kl_base: float = 30.0  # nats per answer, new policy vs the base version
    max_length_ratio: float = 1.6  # mean length new / current, both ways (but see length_preference)
    length_control: str = "auto"  # "auto": unless the users' feedback prefers the direction moved; "always"
    bootstrap_samples: int = 2000
    # Answers per held-out prompt from each policy: a cycle holds out few prompts, and one sampled answer
    # each leaves the gain's interval mostly sampling noise. The bootstrap resamples prompts.
    samples_per_prompt: int = 4
    regression_z: float = 1.96  # how many standard errors of the accuracy difference count as noise
    max_new_tokens: int = 96
    temperature: float = 0.7
    seed: int = 0
    samples_in_report: int = 6
    # Weights' dtype for sampling the answers (and the regression set's): "auto" keeps each model's own;
    # "bf16" on a CPU with bf16 instructions samples 1.6-2x faster. KL is computed in the models' own dtype.
    precision: str = "auto"

    def __post_init__(self) -> None:
        inference_dtype(self.precision)  # a bad setting fails when read, not after PPO


@dataclass
class Verdict:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        return "passed the gate" if self.promote else "rejected by the gate: " + "; ".join(self.reasons)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, temperature: float = 0.0,
             batch_size: int = 16, seed: int = 0) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Left-padded batched generation. Returns texts, prompt token ids and answer token ids; an answer that
    ended keeps its EOS token: ending there is one of the policy's choices, and its log-probability
    belongs in the KL (a policy taught to stop early spends much of its KL on that one token)."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    texts, prompt_ids, answer_ids = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts[start:start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sample = temperature > 0
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample, top_k=0,
                             temperature=temperature if sample else None, top_p=None,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        for row in range(out.shape[0]):
            ids = out[row, enc["input_ids"].shape[1]:].tolist()
            ids = ids[:ids.index(eos) + 1] if eos in ids else ids
            prompt_ids.append(enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist())
            answer_ids.append(ids)
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts, prompt_ids, answer_ids


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


def mean_kl(policy, other, prompt_ids, answer_ids, temperature: float = 1.0,
            policy_logprobs: torch.Tensor | None = None) -> float:
    """Monte Carlo KL(policy || other) per answer, on answers sampled from `policy` at `temperature`:
    the divergence of the two distributions that are really sampled (the one PPO's penalty measures).
    `policy_logprobs`: the policy's own `sequence_logprob`, when already computed."""
    if policy_logprobs is None:
        policy_logprobs = sequence_logprob(policy, prompt_ids, answer_ids, temperature)
    return float((policy_logprobs - sequence_logprob(other, prompt_ids, answer_ids, temperature)).mean())


def length_controlled(rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rewards minus their least-squares linear dependence on answer length."""
    x = lengths.float() - lengths.float().mean()
    slope = (x * (rewards - rewards.mean())).sum() / x.pow(2).sum().clamp(min=1e-8)
    return rewards - slope * x


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """A rate and its Wilson score interval (95% for z = 1.96); NaNs when n = 0."""
    if n == 0:
        return (float("nan"),) * 3
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At p = 0 or 1 rounding can put a bound a hair on the wrong side of p (or of [0, 1]).
    return p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def length_preference(groups: list[list[tuple[int, int]]], z: float = 1.96) -> dict:
    """From held-out feedback, a list of groups of pairs (chosen length, rejected length): which length
    the users prefer. Each group (one ranking, say) is one vote, since its pairs are not independent:
    the shorter side wins it when it wins most of the group's pairs of unequal length.

    'shorter' or 'longer' when the share of votes won by the shorter side has a Wilson interval that
    excludes one half; None otherwise (or with no votes).
    """
    votes = []
    for pairs in groups:
        margin = sum((c < r) - (c > r) for c, r in pairs)
        if margin:
            votes.append(margin > 0)
    n = len(votes)
    if not n:
        return {"preferred": None, "shorter_wins": None, "ci95": None, "groups": 0}
    share, low, high = wilson(sum(votes), n, z)
    preferred = "shorter" if low > 0.5 else "longer" if high < 0.5 else None
    return {"preferred": preferred, "shorter_wins": share, "ci95": [low, high], "groups": n}


def bootstrap_ci(diffs: list[float], samples: int, seed: int) -> tuple[float, float, float]:
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choice(diffs) for _ in range(n)) / n for _ in range(samples))
    return sum(diffs) / n, means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def load_regression_set(path: Path = REGRESSION_SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_correct(answer: str, accepted: list[str]) -> bool:
    text = answer.lower()
    return any(re.search(rf"(?<![\w.]){re.escape(a.lower())}(?![\w])", text) for a in accepted)


def regression_accuracy(model, tokenizer, system_prompt: str, items: list[dict], max_new_tokens: int) -> tuple[float, list[str]]:
    prompts = [[{"role": "system", "content": system_prompt}, {"role": "user", "content": it["question"]}] for it in items]
    answers, _, _ = generate(model, tokenizer, prompts, max_new_tokens)  # greedy: repeatable
    return sum(is_correct(a, it["answers"]) for a, it in zip(answers, items)) / len(items), answers


def evaluate(current, new, reference, base, tokenizer, reward_score, prompts: list[list[dict]], system_prompt: str,
             config: GateConfig, preferred_length: str | None = None) -> Verdict:
    """current/new/reference/base: causal LMs; reward_score(prompts, answers) -> tensor of rewards;
    preferred_length: 'shorter' | 'longer' | None, what the users' feedback shows (length_preference)."""
    k = max(1, config.samples_per_prompt) if config.temperature > 0 else 1  # greedy answers repeat themselves
    asked = [p for p in prompts for _ in range(k)]
    sampler_cur, sampler_new = for_sampling(current, config.precision), for_sampling(new, config.precision)
    cur_text, _, cur_ids = generate(sampler_cur, tokenizer, asked, config.max_new_tokens, config.temperature,
                                    seed=config.seed)
    new_text, new_prompt_ids, new_ids = generate(sampler_new, tokenizer, asked, config.max_new_tokens,
                                                 config.temperature, seed=config.seed)
    rewards = reward_score(asked + asked, cur_text + new_text).float().cpu()
    lengths = torch.tensor([len(a) - (a[-1:] == [tokenizer.eos_token_id]) for a in cur_ids + new_ids])  # without EOS
    n = len(asked)
    len_cur, len_new = lengths[:n].float().mean().item(), lengths[n:].float().mean().item()
    moved = "shorter" if len_new < len_cur else "longer"
    users_asked = config.length_control == "auto" and preferred_length == moved
    adjusted = rewards if users_asked else length_controlled(rewards, lengths)
    diffs = (adjusted[n:] - adjusted[:n]).view(len(prompts), k).mean(1).tolist()  # one gain per prompt
    mean_diff, low, high = bootstrap_ci(diffs, config.bootstrap_samples, config.seed)
    temperature = config.temperature or 1.0  # greedy answers: the models' own distributions
    new_logprobs = sequence_logprob(new, new_prompt_ids, new_ids, temperature)  # once, for both KLs
    kl_ref = mean_kl(new, reference, new_prompt_ids, new_ids, temperature, new_logprobs)
    kl_base = mean_kl(new, base, new_prompt_ids, new_ids, temperature, new_logprobs) if base is not reference else kl_ref
    items = load_regression_set()
    acc_cur, _ = regression_accuracy(sampler_cur, tokenizer, system_prompt, items, config.max_new_tokens)
    acc_new, _ = regression_accuracy(sampler_new, tokenizer, system_prompt, items, config.max_new_tokens)
    del sampler_cur, sampler_new
    p = (acc_cur + acc_new) / 2
    noise = config.regression_z * math.sqrt(max(2 * p * (1 - p) / len(items), 1e-12))
    metrics = {
        "heldout_prompts": len(prompts), "samples_per_prompt": k, "reward_current": rewards[:n].mean().item(), "reward_new": rewards[n:].mean().item(),
        "reward_gain_length_controlled": mean_diff, "reward_gain_ci95": [low, high],
        "length_controlled": not users_asked, "preferred_length": preferred_length,
        "kl_to_reference": kl_ref, "kl_to_base": kl_base, "length_current": len_cur, "length_new": len_new,
        "regression_accuracy_current": acc_cur, "regression_accuracy_new": acc_new,
        "regression_noise": noise, "regression_items": len(items),
    }
    reasons = []
    if low <= 0:
        what = "reward gain" if users_asked else "length-controlled reward gain"
        reasons.append(f"{what} {mean_diff:+.3f} has 95% CI [{low:+.3f}, {high:+.3f}] not above 0")
    if kl_ref > config.max_kl_reference:
        reasons.append(f"KL to reference {kl_ref:.1f} > {config.max_kl_reference}")
    if kl_base > config.max_kl_base:
        reasons.append(f"KL to base {kl_base:.1f} > {config.max_kl_base}")
    ratio = (len_new + 1) / (len_cur + 1)
    if not users_asked and not 1 / config.max_length_ratio <= ratio <= config.max_length_ratio:
        reasons.append(f"mean answer length drifted {len_cur:.0f} -> {len_new:.0f} tokens")
    if acc_new < acc_cur - noise:
        reasons.append(f"regression-set accuracy fell {acc_cur:.0%} -> {acc_new:.0%} (noise {noise:.0%})")
    samples = [{"prompt": asked[i][-1]["content"], "current": cur_text[i], "new": new_text[i],
                "reward_current": rewards[i].item(), "reward_new": rewards[n + i].item()}
               for i in range(0, min(config.samples_in_report, len(prompts)) * k, k)]
    return Verdict(promote=not reasons, reasons=reasons, metrics=metrics, samples=samples)


def write_report(verdict: Verdict, path: Path, extra: dict | None = None) -> None:
    """A Markdown report of the cycle: metrics, the verdict, and answers side by side."""
    lines = [f"# Training cycle report\n", f"**Verdict:** {verdict.summary()}\n", "## Metrics\n", "| metric | value |",
             "| --- | --- |"]
    for key, value in {**(extra or {}), **verdict.metrics}.items():
        lines.append(f"| {key} | {_fmt(value)} |")
    lines.append("\n## Sample answers (held-out prompts)\n")
    for s in verdict.samples:
        lines += [f"**Prompt:** {s['prompt']}\n", f"- current ({s['reward_current']:+.2f}): {s['current']}",
                  f"- new ({s['reward_new']:+.2f}): {s['new']}\n"]
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps({**asdict(verdict), "extra": extra or {}}, indent=2, default=str))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)
