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
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig

from core.causal_lm import sequence_logprob
from core.chat_format import (ANSWER_MAX_NEW_TOKENS, ANSWER_TEMPERATURE, TUTOR_SYSTEM_PROMPT, end_of_turn_ids,
                              generation_prompt_ids)
from core.precision import check_inference_precision, for_sampling, wants_bf16
from core.prefix_cache import generate_answers, shared_prefix_cache
from core.sampling import check_token_draw
from core.stats import bootstrap, wilson

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
    max_new_tokens: int = ANSWER_MAX_NEW_TOKENS  # the served answer's (core/chat_format.py)
    temperature: float = ANSWER_TEMPERATURE
    seed: int = 0
    samples_in_report: int = 6
    # Weights' dtype for sampling the answers (and the regression set's): "auto" as this machine's
    # precision plan says (bf16 on a GPU or a CPU with bf16 instructions), "bf16" or "fp32". KL is
    # computed in the models' own dtype.
    precision: str = "auto"
    prefix_cache: bool = True  # the system turn's KV computed once per sampler (core/prefix_cache.py)
    # bf16 autocast for the gate's reward scores and the KL's log-probs: True, False or "auto" (this
    # machine's precision plan, as PPO, which trained against the same scores under autocast). Both
    # policies are scored alike; on the embedded model the KL moved 4.63 -> 4.67 nats, 2.2x faster.
    bf16: str | bool = "auto"
    # Answers sampled at once: a decoding step costs far less than its batch's rows one by one (on a
    # 2-core CPU 64 answers took 0.6x the time at 64 a batch that they took at 16).
    batch_size: int = 64
    # How a sampled token is drawn: "inverse_cdf" (one uniform number per answer, core/sampling.py) or
    # "multinomial" (generate's own, one random number per vocabulary entry at every step, which on a
    # CPU costs more the more rows decode together). The same distribution.
    token_draw: str = "inverse_cdf"
    # A second opinion from a reward model PPO did not optimise (another form, fitted on the same feedback):
    # PPO pushes the policy where its own reward model is wrong, and a gate that judges by that model
    # alone promotes what it was fooled by (docs/learning.md, "A judge PPO did not optimise"). A
    # candidate that the judge finds clearly worse (95% interval below 0) is rejected.
    judge: bool = True

    def __post_init__(self) -> None:
        check_inference_precision(self.precision)  # a bad setting fails when read, not after PPO
        check_token_draw(self.token_draw)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, not {self.batch_size!r}")


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
             batch_size: int = 16, seed: int = 0, prefix_cache: bool = True,
             token_draw: str = "inverse_cdf") -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Left-padded batched generation. Returns texts, prompt token ids and answer token ids; an answer that
    ended keeps its EOS token: ending there is one of the policy's choices, and its log-probability
    belongs in the KL (a policy taught to stop early spends much of its KL on that one token).
    prefix_cache: the prompts' shared system turn is run once, not once per answer (core/prefix_cache.py).
    token_draw: how a sampled token is drawn (core/sampling.py)."""
    torch.manual_seed(seed)
    eos = end_of_turn_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    encoded = [generation_prompt_ids(tokenizer, p) for p in prompts]
    prefix = shared_prefix_cache(model, encoded) if prefix_cache else None
    sample = temperature > 0
    filters = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {}  # greedy: none to warn of
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=eos, **filters)
    texts, prompt_ids, answer_ids = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = encoded[start:start + batch_size]
        out = generate_answers(model, chunk, pad_id, prefix, config, token_draw=token_draw)
        for prompt, row in zip(chunk, out.tolist()):
            end = next((i for i, token in enumerate(row) if token in eos), None)
            answer = row if end is None else row[:end + 1]
            prompt_ids.append(prompt)
            answer_ids.append(answer)
            texts.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
    return texts, prompt_ids, answer_ids


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


def load_regression_set(path: Path = REGRESSION_SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_correct(answer: str, accepted: list[str]) -> bool:
    text = answer.lower()
    return any(re.search(rf"(?<![\w.]){re.escape(a.lower())}(?![\w])", text) for a in accepted)


def regression_accuracy(model, tokenizer, system_prompt: str, items: list[dict], max_new_tokens: int,
                        prefix_cache: bool = True, batch_size: int = 16) -> tuple[float, list[str]]:
    prompts = [[{"role": "system", "content": system_prompt}, {"role": "user", "content": it["question"]}] for it in items]
    answers, _, _ = generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size,
                             prefix_cache=prefix_cache)  # greedy: repeatable
    return sum(is_correct(a, it["answers"]) for a, it in zip(answers, items)) / len(items), answers


@dataclass
class GateModels:
    """The causal LMs the gate compares: the candidate against the served policy, and its distance from
    this cycle's reference and from the base version."""

    current: nn.Module
    new: nn.Module
    reference: nn.Module
    base: nn.Module


@dataclass
class HeadToHead:
    """Both policies' sampled answers to the same held-out prompts (each prompt k times)."""

    prompts: list[list[dict]]  # (n,) the prompts as asked: each held-out prompt k times in a row
    current_text: list[str]
    new_text: list[str]
    new_prompt_ids: list[list[int]]
    new_answer_ids: list[list[int]]  # with the closing EOS where the answer ended
    lengths: torch.Tensor  # (2n,) answer tokens without EOS: the current policy's, then the new one's


def gate(models: GateModels, tokenizer, reward_score, prompts: list[list[dict]], config: GateConfig,
         preferred_length: str | None = None, system_prompt: str = TUTOR_SYSTEM_PROMPT,
         judge: tuple[str, Callable] | None = None) -> Verdict:
    """Whether `models.new` may replace `models.current`. reward_score(prompts, answers) -> (N,) rewards;
    preferred_length: 'shorter' | 'longer' | None, what the users' feedback shows (length_preference);
    judge: (its name, its score function), a reward model PPO did not optimise (GateConfig.judge)."""
    k = max(1, config.samples_per_prompt) if config.temperature > 0 else 1  # greedy answers repeat themselves
    sampler_cur, sampler_new = for_sampling(models.current, config.precision), for_sampling(models.new, config.precision)
    # 1. both policies answer the held-out prompts
    answers = head_to_head(sampler_cur, sampler_new, tokenizer, prompts, k, config)
    n = len(answers.prompts)
    scoring = torch.autocast(next(models.new.parameters()).device.type, dtype=torch.bfloat16,
                             enabled=wants_bf16(config.bf16))
    # 2. reward gain, controlled for length unless the users asked for the length the new policy moved to
    with scoring:
        rewards = reward_score(answers.prompts + answers.prompts, answers.current_text + answers.new_text).float().cpu()
    len_cur, len_new = answers.lengths[:n].float().mean().item(), answers.lengths[n:].float().mean().item()
    moved = "shorter" if len_new < len_cur else "longer"
    users_asked = config.length_control == "auto" and preferred_length == moved

    def gain(rewards: torch.Tensor) -> tuple[float, float, float]:
        """(mean, low, high): the new policy's gain in these rewards, one per prompt, bootstrapped."""
        adjusted = rewards if users_asked else length_controlled(rewards, answers.lengths)
        diffs = (adjusted[n:] - adjusted[:n]).view(len(prompts), k).mean(1).tolist()  # one gain per prompt
        return bootstrap(diffs, samples=config.bootstrap_samples, seed=config.seed)

    mean_diff, low, high = gain(rewards)
    judge_name = None
    if judge is not None and config.judge:  # the same answers, scored by a reward PPO did not optimise
        judge_name, judge_score = judge
        with scoring:
            judged = judge_score(answers.prompts + answers.prompts, answers.current_text + answers.new_text)
        judge_mean, judge_low, judge_high = gain(judged.float().cpu())
    # 3. KL of the new policy's own answers to the reference and to the base
    temperature = config.temperature or 1.0  # greedy answers: the models' own distributions
    with scoring:
        new_logprobs = sequence_logprob(models.new, answers.new_prompt_ids, answers.new_answer_ids, temperature)
        kl_ref = mean_kl(models.new, models.reference, answers.new_prompt_ids, answers.new_answer_ids, temperature,
                         new_logprobs)
        kl_base = kl_ref if models.base is models.reference else mean_kl(
            models.new, models.base, answers.new_prompt_ids, answers.new_answer_ids, temperature, new_logprobs)
    # 4. the regression set
    items = load_regression_set()
    acc_cur, _ = regression_accuracy(sampler_cur, tokenizer, system_prompt, items, config.max_new_tokens,
                                     config.prefix_cache, config.batch_size)
    acc_new, _ = regression_accuracy(sampler_new, tokenizer, system_prompt, items, config.max_new_tokens,
                                     config.prefix_cache, config.batch_size)
    del sampler_cur, sampler_new
    p = (acc_cur + acc_new) / 2
    noise = config.regression_z * math.sqrt(max(2 * p * (1 - p) / len(items), 1e-12))
    metrics = {
        "heldout_prompts": len(prompts), "samples_per_prompt": k, "reward_current": rewards[:n].mean().item(),
        "reward_new": rewards[n:].mean().item(),
        "reward_gain_length_controlled": mean_diff, "reward_gain_ci95": [low, high],
        "length_controlled": not users_asked, "preferred_length": preferred_length,
        "kl_to_reference": kl_ref, "kl_to_base": kl_base, "length_current": len_cur, "length_new": len_new,
        "regression_accuracy_current": acc_cur, "regression_accuracy_new": acc_new,
        "regression_noise": noise, "regression_items": len(items),
    }
    if judge_name is not None:
        metrics |= {"judge": judge_name, "judge_gain": judge_mean, "judge_gain_ci95": [judge_low, judge_high]}
    # 5. the verdict
    reasons = []
    if low <= 0:
        what = "reward gain" if users_asked else "length-controlled reward gain"
        reasons.append(f"{what} {mean_diff:+.3f} has 95% CI [{low:+.3f}, {high:+.3f}] not above 0")
    if judge_name is not None and judge_high < 0:
        reasons.append(f"a reward model PPO did not optimise ({judge_name}) judges it worse: "
                       f"{judge_mean:+.3f}, 95% CI [{judge_low:+.3f}, {judge_high:+.3f}]")
    if kl_ref > config.max_kl_reference:
        reasons.append(f"KL to reference {kl_ref:.1f} > {config.max_kl_reference}")
    if kl_base > config.max_kl_base:
        reasons.append(f"KL to base {kl_base:.1f} > {config.max_kl_base}")
    ratio = (len_new + 1) / (len_cur + 1)
    if not users_asked and not 1 / config.max_length_ratio <= ratio <= config.max_length_ratio:
        reasons.append(f"mean answer length drifted {len_cur:.0f} -> {len_new:.0f} tokens")
    if acc_new < acc_cur - noise:
        reasons.append(f"regression-set accuracy fell {acc_cur:.0%} -> {acc_new:.0%} (noise {noise:.0%})")
    samples = [{"prompt": answers.prompts[i][-1]["content"], "current": answers.current_text[i],
                "new": answers.new_text[i], "reward_current": rewards[i].item(), "reward_new": rewards[n + i].item()}
               for i in range(0, min(config.samples_in_report, len(prompts)) * k, k)]
    return Verdict(promote=not reasons, reasons=reasons, metrics=metrics, samples=samples)


def head_to_head(sampler_cur, sampler_new, tokenizer, prompts: list[list[dict]], k: int,
                 config: GateConfig) -> HeadToHead:
    """Each prompt k times to each policy, from the same seed; answer lengths without their EOS."""
    asked = [p for p in prompts for _ in range(k)]
    cur_text, _, cur_ids = generate(sampler_cur, tokenizer, asked, config.max_new_tokens, config.temperature,
                                    config.batch_size, seed=config.seed, prefix_cache=config.prefix_cache,
                                    token_draw=config.token_draw)
    new_text, new_prompt_ids, new_ids = generate(sampler_new, tokenizer, asked, config.max_new_tokens,
                                                 config.temperature, config.batch_size, seed=config.seed,
                                                 prefix_cache=config.prefix_cache, token_draw=config.token_draw)
    eos = set(end_of_turn_ids(sampler_cur, tokenizer)) | set(end_of_turn_ids(sampler_new, tokenizer))
    lengths = torch.tensor([len(a) - (bool(a) and a[-1] in eos) for a in cur_ids + new_ids])
    return HeadToHead(asked, cur_text, new_text, new_prompt_ids, new_ids, lengths)


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
