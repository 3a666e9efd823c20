"""Does the loop learn? Simulated learners with a known taste teach the embedded tutor through the app.

    python bench/bench_learning.py --rubric stays_short --out docs/learning/stays_short
    python bench/bench_learning.py --rubric stays_short --no-ppo --out docs/learning/stays_short-no-ppo

1. start the app (`launch.py`) on a fresh database and models dir, serving the base version;
2. measure the base: every held-out opener of the prompt set, `--samples-per-prompt` times, through the
   API in `eval` conversations (never training data), scored by the rubric;
3. for each cycle: learners give `--items` feedback items through the API, then `launch.py --retrain`
   runs as a user would run it; the app picks up a promoted version without a restart; measure again;
4. score fluency with the base model (perplexity of every answer), and write `results.json`, `report.md`
   (the table with 95% intervals, the cycles' verdicts, answers before and after) and `curves.png`.

`--no-ppo` runs the same cycles with PPO switched off (SFT on the same feedback only), to show what PPO adds.
Learners' feedback differs from run to run (the answers they judge are sampled), so the cleanest comparison
retrains on the very feedback of an earlier run: `--feedback-from` a report folder that kept its database
(`conversations.db.gz`) replaces the learners with that feedback, for one cycle:

    python bench/bench_learning.py --rubric stays_short --no-ppo --feedback-from docs/learning/stays_short \
        --out docs/learning/stays_short-no-ppo-replay
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.store import Store  # noqa: E402
from bench.learner import LearnerConfig, TutoringPrompt, collect_answers, give_feedback, load_prompt_set  # noqa: E402
from bench.learning_metrics import summarise  # noqa: E402
from bench.rubrics import RUBRICS, Rubric  # noqa: E402
from core.net import free_port  # noqa: E402

DEFAULT_CONFIG = ROOT / "bench" / "configs" / "learning.toml"
EVAL_PARTS = {"dev": "heldout", "test": "test"}  # --eval-part -> the prompt set's split

Say = Callable[[str], None]  # where progress lines go


class ServedApp:
    """`launch.py` in its own process, as a user starts it."""

    def __init__(self, workdir: Path, config: Path, model: Path | None, log):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        command = [sys.executable, str(ROOT / "launch.py"), "--db", str(workdir / "conversations.db"),
                   "--models-dir", str(workdir / "models"), "--port", str(self.port), "--config", str(config)]
        if model:
            command += ["--model", str(model)]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with {self.process.returncode}; see the log")
            try:
                urllib.request.urlopen(self.url, timeout=5)
                return
            except OSError:
                time.sleep(2)
        raise TimeoutError("the app did not start in time")

    def served_version(self) -> str:
        from gradio_client import Client

        client = Client(self.url, verbose=False)
        try:
            return client.predict(api_name="/status")["model_version"]
        finally:
            client.close()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def retrain(workdir: Path, config: Path, log, say) -> dict:
    """`launch.py --retrain` as a user runs it (its progress lines go to the log, PPO updates also to
    `say`), then the cycle as the database recorded it."""
    command = [sys.executable, str(ROOT / "launch.py"), "--retrain", "--db", str(workdir / "conversations.db"),
               "--models-dir", str(workdir / "models"), "--config", str(config)]
    with Store(workdir / "conversations.db") as store:
        before = (store.last_cycle() or {}).get("id")
    started = time.perf_counter()
    last_line = ""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        for line in process.stdout:
            log.write(line)
            log.flush()
            if line.strip():
                last_line = line.strip()
            if re.match(r"\s*(\d\. |update |held-out |cycle |PPO stopped|error)", line):
                say("   retrain: " + line.strip()[:160])
    returncode = process.returncode
    with Store(workdir / "conversations.db") as store:
        cycle = store.last_cycle() or {}
    if cycle.get("id") == before:  # refused before a cycle began (too little data, say)
        cycle = {}
    metrics = cycle.get("metrics") or {}
    return {"exit_code": returncode, "seconds": round(time.perf_counter() - started, 1),
            "status": cycle.get("status") or "not_run", "reason": cycle.get("reason") or last_line, "version": cycle.get("policy_version"),
            "reward": metrics.get("reward", {}), "gate": metrics.get("gate", {}),
            **{key: metrics.get(key) for key in ("stages", "ppo_last", "ppo_stopped", "ppo_score_gain", "length_preference")}}


def base_log_perplexities(model_dir: Path, samples: list[dict], system_prompt: str, batch_size: int = 8) -> list[float]:
    """Mean negative log-likelihood per answer token under the base model, one value per sample (NaN for
    an empty answer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.causal_lm import sequence_logprob
    from core.chat_format import answer_ids, generation_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    contexts = [generation_prompt_ids(tokenizer, [{"role": "system", "content": system_prompt}, *s["dialogue"]])
                for s in samples]
    answers = [answer_ids(tokenizer, s["answer"]) for s in samples]
    totals = sequence_logprob(model, contexts, answers, batch_size=batch_size).tolist()
    return [-total / len(answer) if answer else float("nan") for total, answer in zip(totals, answers)]


def archive_database(db: Path, archive: Path) -> None:
    """The learners' database, gzipped beside the report: it lets anyone inspect every feedback row, and
    `--feedback-from` retrain on it."""
    snapshot = archive.with_suffix("")
    with Store(db) as store:
        store.backup(snapshot)  # consistent, rows still in the WAL included
    with open(snapshot, "rb") as raw, gzip.open(archive, "wb") as packed:
        shutil.copyfileobj(raw, packed)
    snapshot.unlink()


def unpack_database(archive: Path, db: Path) -> Path:
    """The reverse of `archive_database`: the gzipped database at `archive` as a plain file at `db`."""
    with gzip.open(archive) as packed, open(db, "wb") as raw:
        shutil.copyfileobj(packed, raw)
    return db


def replay_feedback(report: Path, workdir: Path, rubric: str) -> dict:
    """Copies the learners' database of an earlier run (`report`: its report folder, holding
    `conversations.db.gz` and `results.json`) into `workdir` without that run's training history, so a
    cycle retrains on exactly its feedback. Returns that run's feedback counts, all cycles together."""
    earlier = json.loads((report / "results.json").read_text())
    if earlier["rubric"] != rubric:
        raise ValueError(f"{report} holds feedback for rubric {earlier['rubric']!r}, not {rubric!r}")
    db = workdir / "conversations.db"
    if db.exists():
        raise FileExistsError(f"{db} exists: replaying feedback needs a fresh --workdir")
    unpack_database(report / "conversations.db.gz", db)
    with Store(db) as store:  # feedback and conversations stay; what was trained from them goes
        store.forget_training_history()
    totals = Counter()
    for cycle in earlier["cycles"]:
        totals.update(cycle["feedback"])
    return {**totals, "replayed_from": str(report)}


@dataclass
class LearningRun:
    rubric: str = "stays_short"
    cycles: int = 2
    items: int = 150  # feedback items per cycle
    error_rate: float = 0.2
    k: int = 4
    # Giving feedback at once (k answers each: 16 rows, the engine's batch); more learners are no faster,
    # since the engine sets the pace (docs/learning.md, run 6).
    learners: int = 4
    eval_clients: int = 16  # measuring at once
    samples_per_prompt: int = 2  # per held-out opener, per measurement
    max_heldout: int = 0  # use only this many held-out openers (0: all)
    # Which held-out openers the measurements ask: "dev" (split "heldout", 112 openers: every choice of a
    # setting is made on these) or "test" (46 openers that only final reported runs ask; docs/learning.md
    # lists which runs touched which).
    eval_part: str = "dev"
    no_ppo: bool = False
    # Which answers a comparison shows ([serve.asking] mode, core/active.py): "random" (as sampled, the
    # default) or "active" (where the committee of reward models is least sure, once a cycle fitted one).
    asking: str = "random"
    reward_form: str = ""  # a RewardConfig.form in place of the settings file's (rlhf/reward.py)
    ppo_learning_rate: float = 0.0  # PPO's learning rate in place of the settings file's (0: keep it)
    ptx_coef: float = -1.0  # PPO-ptx's coefficient in place of the settings file's (-1: keep it; 0: off)
    feedback_from: Path | None = None  # an earlier run's report folder: one cycle on its feedback
    config: Path = DEFAULT_CONFIG
    model: Path | None = None
    workdir: Path | None = None
    out: Path = Path("learning-report")
    seed: int = 0


@dataclass
class Plan:
    """What the run measures and how its feedback comes, fixed before the app starts."""

    rubric: Rubric
    train: list[TutoringPrompt]  # what learners ask when they give feedback
    heldout: list[TutoringPrompt]  # what every measurement asks, samples_per_prompt times each
    keywords: list[tuple[str, ...]]  # one per measured answer: its opener's keywords (the on-topic rate)
    learner_config: LearnerConfig
    replayed: dict | None  # with --feedback-from: that run's feedback counts, given in place of learners
    cycles: int


@dataclass
class Progress:
    """What the run has measured so far."""

    rows: list[dict] = field(default_factory=list)  # the learning curve: one per cycle, 0 the base
    cycles: list[dict] = field(default_factory=list)  # one per retrain: its feedback and verdict
    samples: dict[str, list[dict]] = field(default_factory=dict)  # each measured version's answers
    base_scores: list[float] = field(default_factory=list)  # what later versions' win rates compare with
    items_so_far: int = 0


def settings_file(settings: LearningRun, workdir: Path) -> Path:
    """The settings file the app and `--retrain` read: `settings.config`, or a copy of it in `workdir` with
    PPO switched off, the reward form, PPO's learning rate or PPO-ptx changed, or active asking on."""
    if not (settings.no_ppo or settings.reward_form or settings.ppo_learning_rate or settings.ptx_coef >= 0
            or settings.asking != "random"):
        return settings.config
    import yaml

    from core.settings import read_config_file

    values = read_config_file(settings.config)
    retrain_values = values.setdefault("retrain", {})
    if settings.no_ppo:  # PPO off: SFT on the ranking winners, rewrites and up-votes
        retrain_values["run_ppo"] = False
        retrain_values.setdefault("sft", {})["ranking_winners"] = True
    if settings.reward_form:
        from rlhf.reward import RewardConfig

        RewardConfig(form=settings.reward_form)  # a wrong name fails now, not after the base measurement
        retrain_values.setdefault("reward", {})["form"] = settings.reward_form
    if settings.ppo_learning_rate:
        retrain_values.setdefault("ppo", {})["learning_rate"] = settings.ppo_learning_rate
    if settings.ptx_coef >= 0:
        retrain_values.setdefault("ppo", {})["ptx_coef"] = settings.ptx_coef
    if settings.asking != "random":
        from core.active import AskingConfig

        AskingConfig(mode=settings.asking)  # a wrong name fails now
        values.setdefault("serve", {}).setdefault("asking", {})["mode"] = settings.asking
    config = workdir / "settings.yaml"
    config.write_text(yaml.safe_dump(values))
    return config


def plan_run(settings: LearningRun, workdir: Path, rubric: Rubric | None,
             prompts: tuple[list[TutoringPrompt], list[TutoringPrompt]] | None) -> Plan:
    """The rubric, the prompts, and with `--feedback-from` the earlier run's database copied into `workdir`."""
    rubric = rubric or RUBRICS[settings.rubric]
    if settings.eval_part not in EVAL_PARTS:
        raise SystemExit(f"--eval-part must be one of {', '.join(EVAL_PARTS)}, not {settings.eval_part!r}")
    train, heldout = prompts or (load_prompt_set(split="train"), load_prompt_set(split=EVAL_PARTS[settings.eval_part]))
    if settings.max_heldout:
        heldout = random.Random(settings.seed).sample(heldout, settings.max_heldout)
    keywords = [p.keywords for p in heldout for _ in range(settings.samples_per_prompt)]
    learner_config = LearnerConfig(k=settings.k, error_rate=settings.error_rate)
    replayed = replay_feedback(settings.feedback_from, workdir, rubric.name) if settings.feedback_from else None
    return Plan(rubric=rubric, train=train, heldout=heldout, keywords=keywords, learner_config=learner_config,
                replayed=replayed, cycles=1 if replayed else settings.cycles)


def measure(app: ServedApp, plan: Plan, settings: LearningRun) -> list[dict]:
    """The served version's answers to every held-out opener, samples_per_prompt times, scored by the rubric."""
    return collect_answers(app.url, [p for p in plan.heldout for _ in range(settings.samples_per_prompt)],
                           plan.rubric, settings.eval_clients, settings.seed)


def measure_base(app: ServedApp, plan: Plan, settings: LearningRun, progress: Progress, say: Say) -> None:
    """Step 2: row 0 of the curve, and the scores that later versions are compared with."""
    base_version = app.served_version()
    say(f"app ready at {app.url}, serving {base_version}; measuring the base")
    samples = measure(app, plan, settings)
    progress.base_scores = [s["score"] for s in samples]
    progress.samples[base_version] = samples
    progress.rows.append({"cycle": 0, "version": base_version, "feedback_items": 0,
                          **summarise(samples, None, plan.keywords)})
    say(f"base success {progress.rows[-1]['success'][0]:.1%}")


def one_cycle(n: int, app: ServedApp, plan: Plan, settings: LearningRun, progress: Progress, *,
              workdir: Path, config: Path, log: TextIO, say: Say) -> None:
    """Step 3, cycle `n`: feedback (the learners' or the replayed), `launch.py --retrain`, and a promoted
    version measured once the app serves it."""
    counts = plan.replayed or give_feedback(app.url, plan.train, plan.rubric, settings.items, plan.learner_config,
                                            settings.learners, settings.seed + n, say=say).as_dict()
    progress.items_so_far += counts["items"]
    say(f"cycle {n}: {counts['items']} feedback items {'replayed' if plan.replayed else 'given'}; retraining")
    outcome = retrain(workdir, config, log, say)
    progress.cycles.append({"cycle": n, "feedback": counts, **outcome})
    say(f"cycle {n}: {outcome['status']} in {outcome['seconds']:.0f}s: {outcome['reason']}")
    rows = progress.rows
    if outcome["status"] != "promoted":  # the app still serves the same version: same measurements
        rows.append({**rows[-1], "cycle": n, "feedback_items": progress.items_so_far, "unchanged": True})
        return
    deadline = time.time() + 120
    while app.served_version() != outcome["version"] and time.time() < deadline:
        time.sleep(2)
    samples = measure(app, plan, settings)
    served = {s["model_version"] for s in samples}
    if served != {outcome["version"]}:
        raise RuntimeError(f"expected answers from {outcome['version']}, got {served}")
    progress.samples[outcome["version"]] = samples
    rows.append({"cycle": n, "version": outcome["version"], "feedback_items": progress.items_so_far,
                 **summarise(samples, progress.base_scores, plan.keywords)})
    say(f"cycle {n}: success {rows[-1]['success'][0]:.1%}, win rate vs base {rows[-1]['vs_base']['win_rate']:.1%}")


def score_fluency(progress: Progress, plan: Plan, base_dir: Path) -> None:
    """Step 4, first half: each row's perplexity of its answers under the base model (each version once)."""
    from core.chat_format import TUTOR_SYSTEM_PROMPT

    perplexity = {}
    for row in progress.rows:
        if row["version"] not in perplexity:
            samples = progress.samples[row["version"]]
            logppl = [v for v in base_log_perplexities(base_dir, samples, TUTOR_SYSTEM_PROMPT) if not math.isnan(v)]
            perplexity[row["version"]] = summarise(samples, None, plan.keywords, logppl).get("perplexity")
        row["perplexity"] = perplexity[row["version"]]


def write_results(settings: LearningRun, plan: Plan, progress: Progress, *, config: Path, workdir: Path,
                  out: Path, minutes: float) -> dict:
    """Step 4, second half: results.json, samples.json, the gzipped database, report.md and curves.png in
    `out`; returns what results.json holds."""
    from bench.learning_report import write_report

    replayed = plan.replayed
    results = {"rubric": plan.rubric.name, "no_ppo": settings.no_ppo, "error_rate": settings.error_rate,
               "k": settings.k, "items_per_cycle": replayed["items"] if replayed else settings.items,
               "heldout_openers": len(plan.heldout), "eval_part": settings.eval_part, "asking": settings.asking,
               "feedback_from": replayed and replayed["replayed_from"],
               "samples_per_measurement": len(progress.base_scores), "minutes": minutes,
               "rows": progress.rows, "cycles": progress.cycles, "config": config.read_text(),
               "workdir": str(workdir)}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "samples.json").write_text(json.dumps(progress.samples, indent=1))
    archive_database(workdir / "conversations.db", out / "conversations.db.gz")
    write_report(results, progress.samples, out)
    return results


def run(settings: LearningRun, rubric: Rubric | None = None,
        prompts: tuple[list[TutoringPrompt], list[TutoringPrompt]] | None = None, say: Say | None = None) -> dict:
    """The whole benchmark, the steps of the module's docstring; returns what results.json holds. `rubric` and
    `prompts` (train, held-out) replace the named rubric and the shipped prompt set (tests use a trivial rubric
    and tiny models)."""
    started = time.perf_counter()
    say = say or (lambda line: print(f"[{time.perf_counter() - started:6.0f}s] {line}", flush=True))
    workdir = settings.workdir or Path(tempfile.mkdtemp(prefix=f"learning-{settings.rubric}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    # Whatever can refuse (a wrong reward form, a workdir that already holds a database) does so before step 1.
    config = settings_file(settings, workdir)
    plan = plan_run(settings, workdir, rubric, prompts)
    log = open(workdir / "run.log", "a")
    what = (f"one cycle on the {plan.replayed['items']} feedback items of {settings.feedback_from}" if plan.replayed
            else f"{settings.cycles} cycles of {settings.items} items")
    say(f"workdir {workdir}; rubric {plan.rubric.name}; {len(plan.heldout)} held-out openers x "
        f"{settings.samples_per_prompt}; {what}{'; PPO off' if settings.no_ppo else ''}")

    app = ServedApp(workdir, config, settings.model, log)  # 1. the app, serving the base version
    progress = Progress()
    try:
        app.wait_ready()
        measure_base(app, plan, settings, progress, say)  # 2. the base measured
        for n in range(1, plan.cycles + 1):  # 3. feedback, retrain, measure
            one_cycle(n, app, plan, settings, progress, workdir=workdir, config=config, log=log, say=say)
    finally:
        app.stop()
        log.close()
    say("scoring fluency with the base model")  # 4. fluency, then the results and the report
    score_fluency(progress, plan, workdir / "models" / "v0000")
    results = write_results(settings, plan, progress, config=config, workdir=workdir, out=out,
                            minutes=round((time.perf_counter() - started) / 60, 1))
    say(f"report: {out / 'report.md'}")
    return results


def render(out: Path) -> None:
    """Rewrites report.md and curves.png from the folder's results.json and samples.json."""
    from bench.learning_report import write_report

    write_report(json.loads((out / "results.json").read_text()), json.loads((out / "samples.json").read_text()), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rubric", choices=sorted(RUBRICS), default=LearningRun.rubric)
    ap.add_argument("--out", type=Path, required=True, help="report folder")
    ap.add_argument("--render", action="store_true", help="only rewrite the report from the folder's results")
    ap.add_argument("--no-ppo", action="store_true", help="cycles with PPO switched off: SFT on the same feedback only")
    ap.add_argument("--model", type=Path, help="base model directory (default: the embedded model)")
    ap.add_argument("--workdir", type=Path, help="where the run's database and models go (default: a new temp dir)")
    ap.add_argument("--feedback-from", type=Path, help="an earlier run's report folder with its conversations.db.gz: "
                    "one cycle on that feedback instead of learners")
    for f in fields(LearningRun):
        if f.name not in ("rubric", "out", "no_ppo", "model", "workdir", "feedback_from"):
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = vars(ap.parse_args())
    if args.pop("render"):
        return render(args["out"])
    run(LearningRun(**args))


if __name__ == "__main__":
    main()
