"""One RLHF cycle, the InstructGPT loop closed inside the app:

    1. data      feedback in the DB -> demonstrations, preference groups, PPO prompts (held out by conversation);
                 exclusions, per-user agreement weights and share caps (rlhf/annotators.py)
    2. SFT       on demonstrations, when there are enough (merged: this cycle's reference policy)
    3. reward    model on all preference pairs so far, its form chosen on a validation part of the training
                 feedback (one form or an ensemble, rlhf/ensemble.py); stop here unless clearly above chance
                 on held-out pairs
    3b committee bag-of-tokens models on bootstrap samples of the feedback, for active comparisons
                 (core/active.py); written whatever the gate decides
    4. PPO       the reference policy against the reward model, per-token KL penalty to the reference
    5. evaluate  new vs current on held-out prompts, and the gate
    6. promote   write the version whole, then switch models/CURRENT atomically; prune old versions.
                 With [retrain.canary] enabled, the version becomes a canary instead: it serves a share of
                 learners and arena pairs, and the server promotes or withdraws it on their votes
                 (app/canary.py); the offline gate stays the first gate.

Nothing is written to the served state before step 6, so Ctrl-C or a crash anywhere leaves the served
version and every feedback row as they were. One cycle at a time: a lock file guards the models dir.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from app.failpoints import failpoint
from core.chat_format import TUTOR_SYSTEM_PROMPT
from core import precision as machine_precision
from core.precision import inference_dtype, wants_bf16
from app.loop_view import write_cycle_report
from app.store import Store
from app.versions import ModelError, ModelRegistry, RegistryBusy, load_pretrained, record_versions, registry_lock
from rlhf.annotators import AnnotatorConfig, weigh_annotators
from core.arena import CanaryConfig
from rlhf.data import (NotEnoughData, TrainingData, check_enough, collect, gate_prompts, shipped_heldout_prompts,
                       split_data)
from rlhf.evaluate import GateConfig, GateModels, Verdict, gate, length_preference, write_report
from rlhf.ppo import PPOConfig, rollout_engine, save_history, train_ppo
from rlhf.ensemble import CommitteeConfig, EnsembleConfig, RewardEnsemble, choose_reward, save_any, train_committee
from rlhf.reward import REWARD_CHOICES, RewardConfig, RewardResult, RewardTooWeak, check_reward_model, train_reward_model
from rlhf.sft import SFTSettings, run_sft


@dataclass
class WatchConfig:
    """When `--retrain --watch` starts a cycle by itself (rlhf/watch.py)."""

    min_new_feedback: int = 50  # ratings, picks and rewrites since the last cycle started
    min_interval_s: float = 3600.0  # between two attempts, so a busy class does not retrain all day
    poll_s: float = 60.0


@dataclass
class CycleConfig:
    min_pairs: int = 20
    min_prompts: int = 8
    # The fewest prompts the gate may judge on (after dropping any a training conversation used); fewer,
    # and the cycle stops before training and says so: too few to judge is not a rejection.
    min_heldout_prompts: int = 24
    heldout_fraction: float = 0.15
    max_eval_prompts: int = 32  # the gate's prompts: the class's unseen held-out ones first
    # Fill the gate's prompts up to max_eval_prompts from the shipped held-out tutoring prompts
    # (rlhf/assets/tutoring_prompts.jsonl), never trained on: a class asks the same questions, so
    # few of its own held-out prompts are unseen by training.
    shipped_eval_prompts: bool = True
    keep_versions: int = 3  # besides the base, the current version and its parent
    skip_if_nothing_new: bool = True  # False re-runs on the same feedback (benchmarks, new settings)
    run_ppo: bool = True  # False: the cycle's policy is its SFT step alone (to measure what PPO adds)
    # The retrain process's CPU priority (`nice`, 0..19): on the machine that serves, a cycle takes only
    # the CPU time serving leaves (docs/performance.md, Load); alone on a machine it runs at full speed.
    niceness: int = 10
    sft: SFTSettings = field(default_factory=SFTSettings)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)  # the candidates of form "auto"/"ensemble"
    committee: CommitteeConfig = field(default_factory=CommitteeConfig)  # for active comparisons (core/active.py)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    annotators: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)

    def __post_init__(self) -> None:
        if self.min_heldout_prompts > self.max_eval_prompts:
            raise ValueError(f"min_heldout_prompts ({self.min_heldout_prompts}) is more than the gate ever judges on "
                             f"(max_eval_prompts {self.max_eval_prompts})")


class CycleError(RuntimeError):
    """The cycle could not run; the message is one line for the user."""


@dataclass
class CycleOutcome:
    status: str  # promoted | canary | rejected | nothing_new
    message: str
    version: str | None = None


@contextmanager
def retrain_lock(models_dir: Path):
    """The registry's lock (app/versions.py), with a busy registry reported as a CycleError."""
    try:
        with registry_lock(models_dir):
            yield
    except RegistryBusy as exc:
        raise CycleError(str(exc)) from None


def feedback_digest(data) -> str:
    """Names the set of feedback rows behind `data`: equal digests mean nothing new to learn from."""
    import hashlib

    return hashlib.sha256(json.dumps(data.lineage(), sort_keys=True).encode()).hexdigest()[:16]


def precision_choices(config: CycleConfig) -> dict:
    """What each stage runs in on this machine, with the plan's reason (settings other than "auto" win)."""
    plan = machine_precision.precision_plan()
    ppo = config.ppo
    engine = rollout_engine(ppo, ppo.merged_rollouts, 1)
    rollouts = (f"merged {'bf16' if inference_dtype(ppo.rollout_precision) == torch.bfloat16 else 'fp32'} copy"
                if ppo.merged_rollouts else "trained model (LoRA unmerged)")
    choices = {"sft_bf16": wants_bf16(config.sft.bf16), "reward_bf16": config.reward.use_bf16(),
               "ppo_bf16": ppo.use_bf16(), "gate_bf16": wants_bf16(config.gate.bf16), "rollouts": rollouts,
               "rollout_prefix_cache": ppo.prefix_cache,
               "rollout_engine": engine.engine, "rollout_engine_reason": engine.reason,
               "gate_sampling": "bf16" if inference_dtype(config.gate.precision) == torch.bfloat16 else "fp32",
               "gate_prefix_cache": config.gate.prefix_cache, "rollout_token_draw": ppo.token_draw,
               "gate_token_draw": config.gate.token_draw, "plan": plan.reason}
    on = [name for name, key in (("SFT", "sft_bf16"), ("reward model", "reward_bf16"), ("PPO", "ppo_bf16"),
                                 ("the gate's scores", "gate_bf16")) if choices[key]]
    decoder = (" decoded by vLLM" if engine.engine == "vllm"
               else f" ({engine.reason})" if plan.device == "cuda" and ppo.rollout_engine != "hf"
               else " with the system turn cached" if ppo.prefix_cache else "")
    draw = (ppo.token_draw if ppo.token_draw == config.gate.token_draw
            else f"{ppo.token_draw} in rollouts, {config.gate.token_draw} in the gate")
    choices["summary"] = (f"precision: bf16 autocast for {', '.join(on) or 'nothing'}; rollouts from the {rollouts}"
                          f"{decoder}; gate samples in {choices['gate_sampling']}; tokens drawn by {draw} "
                          f"(on {plan.device}: {plan.reason})")
    return choices


def run_cycle(store: Store, registry: ModelRegistry, config: CycleConfig, say=print) -> CycleOutcome:
    with retrain_lock(registry.root):
        left = registry.clean_leftovers()
        if left:
            say(f"removed what an earlier cycle left unfinished: {', '.join(left)}")
        return _run_cycle(store, registry, config, say)


@dataclass
class CycleRun:
    """What one cycle carries from step to step: where it reads and writes, the feedback it learns from,
    and the metrics it records as it goes."""

    store: Store
    registry: ModelRegistry
    config: CycleConfig
    cycle_id: int
    current: str  # the served version the cycle starts from
    train: TrainingData
    heldout: TrainingData
    eval_prompts: list  # what the gate judges on (rlhf/data.py gate_prompts), fixed at step 1
    workdir: Path  # models/cycles/NNNN: the report and PPO's history
    say: Callable[[str], None]
    metrics: dict[str, Any] = field(default_factory=dict)


def _run_cycle(store: Store, registry: ModelRegistry, config: CycleConfig, say) -> CycleOutcome:
    # 1. data -------------------------------------------------------------------------------------
    timing: dict[str, Any] = {}
    with stage(timing, "data"):
        data, annotators = weigh_annotators(collect(store), store.training_exclusions(), store.repeat_checks(),
                                            config.annotators)
        train, heldout = split_data(data, config.heldout_fraction)
    try:
        check_enough(train, config.min_pairs, config.min_prompts)
    except NotEnoughData as exc:
        left = [e for e in annotators["left_out"] if e["kind"] == "user"]
        why = (f" ({len(left)} users' feedback left out: {'; '.join(e['reason'] for e in left)})"[:600]
               if left else "")
        raise CycleError(f"{exc}{why}") from None
    shipped = shipped_heldout_prompts(TUTOR_SYSTEM_PROMPT) if config.shipped_eval_prompts else []
    eval_prompts, own = gate_prompts(train, heldout, shipped, config.max_eval_prompts)
    if len(eval_prompts) < config.min_heldout_prompts:
        raise CycleError(f"too few prompts to judge a new version on: need at least {config.min_heldout_prompts} "
                         f"held-out prompts that training did not use, have {len(eval_prompts)} ({own} from the "
                         f"class's conversations); more conversations are needed")
    digest = feedback_digest(data)
    last = store.last_cycle(statuses=("promoted", "canary", "rejected"))
    if config.skip_if_nothing_new and last and (last.get("metrics") or {}).get("feedback_digest") == digest:
        return CycleOutcome("nothing_new", f"nothing new to learn from since cycle {last['id']}")

    current = registry.current_version()
    record_versions(store, registry)
    cycle_id = store.start_cycle()
    started = time.perf_counter()
    say(f"cycle {cycle_id}: from policy {current}; {data.counts()} (held out: {heldout.counts()})")
    run = CycleRun(store, registry, config, cycle_id, current, train, heldout, eval_prompts,
                   workdir=registry.root / "cycles" / f"{cycle_id:04d}", say=say,
                   metrics={"from_version": current, "train": train.counts(), "heldout": heldout.counts(),
                            "gate_prompts": {"class": own, "shipped": len(eval_prompts) - own},
                            "left_out": annotators["left_out"], **timing})
    run.metrics["precision"] = precision_choices(config)
    say(f"   {run.metrics['precision']['summary']}")
    for entry in annotators["left_out"]:
        say(f"   left out {entry['kind']} {entry['target']} ({entry['items']} items): {entry['reason']}")
    if "why" in annotators.get("peer_check", {}):
        say(f"   peer check off: {annotators['peer_check']['why']}")
    try:
        run.workdir.mkdir(parents=True, exist_ok=True)
        (run.workdir / "annotators.json").write_text(json.dumps(annotators, indent=2) + "\n", encoding="utf-8")
        outcome = _train_and_gate(run)
    except KeyboardInterrupt:
        store.finish_cycle(cycle_id, "interrupted", reason="interrupted by the user")
        raise
    except Exception as exc:
        _record_failure(store, cycle_id, f"{type(exc).__name__}: {exc}"[:500], say)
        if isinstance(exc, OSError):  # a full disk or an I/O error: one line for the user, not a traceback
            served = registry.current_or_none()
            if served is not None and served != current:  # it failed after the switch, the commit point
                raise CycleError(f"cycle {cycle_id} promoted {served}, then a disk error stopped it ({exc}); "
                                 f"{served} is served, the app records it in the DB when it next starts, and "
                                 "all feedback is unchanged") from exc
            raise CycleError(f"cycle {cycle_id} stopped by a disk error ({exc}); nothing was promoted, the "
                             "served version and all feedback are unchanged") from exc
        raise
    run.metrics.update(feedback_digest=digest, seconds=round(time.perf_counter() - started, 1))
    store.finish_cycle(cycle_id, outcome.status, reason=outcome.message, policy_version=outcome.version,
                       reward_version=outcome.version and f"{outcome.version}/reward_model", metrics=run.metrics)
    try:  # the figures a teacher sees, as one file; the cycle's outcome stands without it
        say(f"   report: {write_cycle_report(store, registry, cycle_id)}")
    except (OSError, ValueError, LookupError) as exc:
        say(f"   (no HTML report: {exc})")
    return outcome


def _record_failure(store: Store, cycle_id: int, reason: str, say) -> None:
    try:
        store.finish_cycle(cycle_id, "failed", reason=reason)
    except Exception as exc:  # the disk that failed the cycle may refuse this write too
        say(f"could not record cycle {cycle_id} as failed ({exc}); it stays 'running' in the DB")


@contextmanager
def stage(metrics: dict, name: str):
    """Records a stage's wall time and the process's peak memory so far (RSS, and GPU when there is one)."""
    import resource

    import torch

    started = time.perf_counter()
    yield
    entry = {"seconds": round(time.perf_counter() - started, 1),
             "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if torch.cuda.is_available():
        entry["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    metrics.setdefault("stages", {})[name] = entry


def _train_and_gate(run: CycleRun) -> CycleOutcome:
    """Steps 2 to 6; nothing the app serves changes before step 6."""
    run.workdir.mkdir(parents=True, exist_ok=True)
    policy = load_pretrained(run.registry.path(run.current), run.current)
    reference = _sft(run, policy.tokenizer)  # 2.
    rm, judge = _reward_model(run)  # 3.
    _committee(run)
    try:
        check_reward_model(rm.metrics, run.config.reward)
    except RewardTooWeak as exc:
        return CycleOutcome("rejected", str(exc))
    new_policy = _ppo(run, reference, policy.tokenizer, rm)  # 4.
    verdict = _evaluate(run, GateModels(current=policy.model, new=new_policy, reference=reference,
                                        base=run.registry.load(run.registry.versions()[0]).model),
                        policy.tokenizer, rm, judge)  # 5.
    if not verdict.promote:
        return CycleOutcome("rejected", verdict.summary())
    version = _promote(run, new_policy, policy.tokenizer, rm, verdict)  # 6.
    if run.config.canary.enabled:
        return CycleOutcome("canary", f"{version} passed the gate and is a canary against {run.current} "
                                      f"until arena votes decide ({verdict.summary()})", version)
    return CycleOutcome("promoted", f"promoted {version} ({verdict.summary()})", version)


def _sft(run: CycleRun, tokenizer):
    """2. SFT on the demonstrations (and, when asked, the ranking winners): this cycle's reference policy.
    Too few demonstrations: the reference is the current policy as it is."""
    reference = load_pretrained(run.registry.path(run.current), run.current).model
    records = [{"prompt": d.prompt, "completion": d.completion} for d in run.train.demonstrations]
    if run.config.sft.ranking_winners:
        records += ranking_winners(run.train.preference_groups)
    if len(records) < run.config.sft.min_demonstrations:
        run.say(f"2. SFT skipped: {len(records)} demonstrations (< {run.config.sft.min_demonstrations})")
        return reference
    run.say(f"2. SFT on {len(records)} demonstrations")
    with stage(run.metrics, "sft"):
        reference, sft_metrics = run_sft(reference, tokenizer, records, run.config.sft,
                                         progress=lambda s, n, loss: run.say(f"   sft step {s}/{n} loss {loss:.3f}"))
    run.metrics.update(sft_metrics)
    return reference


def _reward_model(run: CycleRun) -> tuple[RewardResult | RewardEnsemble, tuple[str, RewardResult] | None]:
    """3. The reward model on all preference pairs so far, measured on the held-out ones; with form "auto",
    the form (or the ensemble) that ranks a validation part of the training feedback best. And the gate's
    judge, a form PPO will not optimise (GateConfig.judge): a candidate "auto" did not keep, or, for a
    form set by hand, a bag of tokens (a second of training); none beside an ensemble or a bag of tokens,
    and none that fails the reward model's own check on pairs it did not train on."""
    run.say(f"3. reward model on {run.train.n_pairs} pairs ({len(run.train.preference_groups)} groups)")
    progress = lambda s, n, loss: run.say(f"   reward step {s}/{n} loss {loss:.3f}")  # noqa: E731
    policy_dir, config = run.registry.path(run.current), run.config.reward
    with stage(run.metrics, "reward"):
        if config.form in REWARD_CHOICES:
            rm, others = choose_reward(policy_dir, run.train.preference_groups, run.heldout.preference_groups,
                                       config, run.config.ensemble, say=run.say, progress=progress)
        else:
            rm = train_reward_model(policy_dir, run.train.preference_groups, run.heldout.preference_groups,
                                    config, progress=progress)
            others = {} if config.form == "bag_of_tokens" or not run.config.gate.judge else {
                "bag_of_tokens": train_reward_model(policy_dir, run.train.preference_groups,
                                                    run.heldout.preference_groups,
                                                    replace(config, form="bag_of_tokens", learning_rate=None))}
    judge = credible_judge(others, config, run.say) if run.config.gate.judge else None
    run.metrics["reward"] = rm.metrics
    accuracy, correlation = rm.metrics["heldout_accuracy"], rm.metrics["length_correlation"]
    run.say(f"   held-out pairwise accuracy {'-' if accuracy is None else f'{accuracy:.2f}'} on "
            f"{rm.metrics['heldout_pairs']} pairs; reward-length correlation "
            f"{'undefined' if correlation is None else f'{correlation:+.2f}'}")
    if judge is not None:
        run.say(f"   the gate's judge, which PPO will not optimise: {judge[0]} (held-out accuracy "
                f"{judge[1].metrics['heldout_accuracy']:.2f})")
    return rm, judge


def _committee(run: CycleRun) -> None:
    """3b. The committee that active comparisons ask by, on every preference group so far (held-out ones
    too: it judges nothing). Written whatever the gate decides, since asking well matters most while
    the reward model is still weak; only which answers a comparison shows depends on it, never what is
    served."""
    config = run.config.committee
    groups = run.train.preference_groups + run.heldout.preference_groups
    if not config.members or not groups:
        return
    with stage(run.metrics, "committee"):
        committee = train_committee(run.registry.path(run.current), groups, config, run.config.reward,
                                    meta={"cycle": run.cycle_id})
        try:
            path = committee.save(run.registry.committee_path())
        except OSError as exc:  # a full disk: the earlier committee (or none) stays; training goes on
            run.metrics["committee"] = {**committee.meta, "error": str(exc)}
            run.say(f"   committee not written ({exc}); comparisons keep the earlier one")
            return
    run.metrics["committee"] = committee.meta
    oob = committee.meta["out_of_bag"]
    run.say(f"   committee of {config.members} bag-of-tokens models on {len(groups)} groups: {path}; out of bag "
            + (f"{oob['accuracy']:.2f} on {oob['pairs']} pairs" if oob["pairs"] else "no pairs")
            + ("" if committee.meta["credible"] else " (not above chance: active comparisons stay random)"))


def _ppo(run: CycleRun, reference, tokenizer, rm: RewardResult):
    """4. PPO from the reference against the reward model; with PPO off, the reference itself."""
    if not run.config.run_ppo:
        run.say("4. PPO switched off: the new policy is this cycle's SFT step")
        return copy.deepcopy(reference)
    prompts = [p.prompt for p in run.train.ppo_prompts]
    run.say(f"4. PPO on {len(prompts)} prompts, {run.config.ppo.total_episodes} episodes")

    def progress(stats):
        run.say(f"   PPO stopped early at update {stats['update']}: {stats['stopped']}" if "stopped" in stats
                else "   " + _line(stats))
        failpoint("training")

    # train_ppo adds LoRA to the model it is given and merges it in place: keep the reference apart.
    with stage(run.metrics, "ppo"):
        demonstrations = [(d.prompt, d.completion[-1]["content"]) for d in run.train.demonstrations]
        result = train_ppo(copy.deepcopy(reference), tokenizer, prompts, _reward_fn(rm), run.config.ppo,
                           progress=progress, token_reward_fn=rm.token_rewards(), demonstrations=demonstrations)
    save_history(result.history, run.workdir / "ppo_history.jsonl")
    updates = [h for h in result.history if "score" in h]
    run.metrics["ppo_last"] = updates[-1] if updates else {}
    # PPO's own view of what it gained (its rollouts' score, last update against the first): set beside
    # the gate's held-out gain, the gap shows how much of it the optimised reward model alone believes.
    run.metrics["ppo_score_gain"] = updates[-1]["score"] - updates[0]["score"] if updates else None
    run.metrics["ppo_stopped"] = next((h["stopped"] for h in result.history if "stopped" in h), None)
    return result.model


def credible_judge(others: dict[str, RewardResult], config: RewardConfig, say=print) -> tuple[str, RewardResult] | None:
    """The first of `others` that passes the reward model's own check on pairs it did not train on. A judge
    blind to the taste still has an opinion, and with 4 answers per prompt a tight interval around it:
    asked, it would reject good candidates about as often as bad ones."""
    for name, other in others.items():
        try:
            check_reward_model(other.metrics, config)
        except RewardTooWeak as exc:
            say(f"   {name} is not asked as the gate's judge: {str(exc).split('; ')[0]}")
            continue
        return name, other
    return None


def _reward_fn(rm: RewardResult):
    def reward_fn(prompts, completions, _token_ids=None):
        return rm.score(prompts, completions)
    return reward_fn


def _evaluate(run: CycleRun, models: GateModels, tokenizer, rm: RewardResult,
              judge: tuple[str, RewardResult] | None = None) -> Verdict:
    """5. The new policy against the current one on held-out prompts never trained on, and the gate."""
    eval_prompts = run.eval_prompts
    shares = run.metrics["gate_prompts"]
    run.say(f"5. evaluating on {len(eval_prompts)} held-out prompts ({shares['class']} from the class's conversations, "
            f"{shares['shipped']} shipped) + the regression set")
    # Which length the users prefer is a count of their own choices, not a fit, so every group votes:
    # a cycle holds out about a sixth of the groups, too few to see a real preference.
    lengths = length_preference([[(len(g.completions[c]), len(g.completions[r])) for c, r in g.pairs]
                                 for g in run.train.preference_groups + run.heldout.preference_groups])
    run.metrics["length_preference"] = lengths
    with stage(run.metrics, "evaluate"):
        verdict = gate(models, tokenizer, _reward_fn(rm), eval_prompts, run.config.gate,
                       preferred_length=lengths["preferred"], system_prompt=TUTOR_SYSTEM_PROMPT,
                       judge=None if judge is None else (judge[0], judge[1].score))
    run.metrics["gate"] = verdict.metrics
    write_report(verdict, run.workdir / "report.md", extra={"cycle": run.cycle_id, "from_version": run.current})
    run.say(f"   report: {run.workdir / 'report.md'}")
    return verdict


def _promote(run: CycleRun, new_policy, tokenizer, rm: RewardResult | RewardEnsemble, verdict: Verdict) -> str:
    """6. The version directory is complete before CURRENT names it; old versions are pruned."""
    registry, current = run.registry, run.current
    version = registry.next_version(taken=[row["version"] for row in run.store.model_versions()])
    lineage = {"parent": current, "reward_model": f"{version}/reward_model", "cycle": run.cycle_id,
               "feedback_rows": run.train.lineage(), "left_out": run.metrics["left_out"]}
    # The reward model that trained this version lives inside it: written, renamed and pruned together.
    with stage(run.metrics, "save"):
        registry.write_version(version, new_policy, tokenizer, {
            "parent": current, "created_at": datetime.now(timezone.utc).isoformat(), "kind": "rlhf",
            "config": asdict(run.config), "metrics": run.metrics, "lineage": lineage},
            extra=lambda folder: save_any(rm, folder / "reward_model"))
    canary = run.config.canary.enabled
    failpoint("before_switch")
    if not canary:
        registry.set_current(version)
    failpoint("recording")
    # Recorded after the switch: a crash before it leaves the DB as it was (the app adds unknown versions on start).
    run.store.add_model_version(f"{version}/reward_model", "reward", str(registry.path(version) / "reward_model"),
                                metrics=rm.metrics)
    run.store.add_model_version(version, "policy", str(registry.path(version)), parent=current,
                                metrics=verdict.metrics, lineage=lineage)
    if canary:  # the server's arena decides; nothing served changes until then
        run.store.start_canary(version, current, asdict(run.config.canary))
        run.say(f"   {version} is a canary: {run.config.canary.conversation_share:.0%} of new conversations, "
                f"{run.config.canary.arena_share:.0%} of two-answer comparisons against {current}")
    prune(registry, run.config.keep_versions, run.say)
    return version


def ranking_winners(groups) -> list[dict]:
    """SFT records from the answers that top a ranking: chosen in some pair and rejected in none."""
    records = []
    for group in groups:
        if group.source != "ranking":
            continue
        rejected = {r for _, r in group.pairs}
        for index in sorted({c for c, _ in group.pairs} - rejected):
            records.append({"prompt": group.prompt, "completion": [{"role": "assistant", "content": group.completions[index]}]})
    return records


def prune(registry: ModelRegistry, keep: int, say=print) -> list[str]:
    """Deletes old versions: never the base, the current one or its parent, nor the `keep` newest."""
    versions = registry.versions()
    current = registry.current_version()
    protected = {versions[0], current, registry.meta(current).get("parent"), *versions[-keep:]}
    removed = []
    for version in versions:
        if version not in protected:
            registry.remove(version)
            removed.append(version)
    if removed:
        say(f"   pruned old versions {', '.join(removed)} (keeping base, current, parent and the {keep} newest)")
    return removed


def _line(stats: dict) -> str:
    keys = ("update", "score", "kl", "kl_coef", "entropy", "answer_length", "frac_ended", "clipfrac", "value_loss",
            "ptx_loss", "gen_seconds", "train_seconds")
    return " ".join(f"{k} {stats[k]:.3g}" if isinstance(stats.get(k), float) else f"{k} {stats.get(k)}"
                    for k in keys if k in stats)


def rollback(registry: ModelRegistry, version: str) -> str:
    """`ModelRegistry.rollback`, its refusals as a CycleError (one line for `launch.py --rollback`)."""
    try:
        return registry.rollback(version)
    except (ModelError, RegistryBusy) as exc:
        raise CycleError(str(exc)) from None
