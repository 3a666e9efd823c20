"""The teacher's view of the loop, a tab of the page: what feedback came in, what each cycle did with it
and why it ended as it did, PPO's curves, each learner's feedback and weight, the versions and their
lineage, who was left out; a rollback and a retrain. The two versions' answers side by side are the
gate's, on held-out prompts. Everything is read from the store and the models directory, which the
cycles write.

The tab is shown to teachers, admins and the one local user of a server without accounts; every
handler checks the session's role again, so hiding the tab is a courtesy, not the protection.
"""
from __future__ import annotations

import json

import gradio as gr
import pandas as pd

from app.accounts import Account
from app.service import TutorService, UserError
from app.versions import ModelError, ModelRegistry, RegistryBusy
from core.privacy import pseudonym

STEWARDS = ("teacher", "admin", "local")
PPO_CURVES = ("score", "kl", "entropy", "answer_length", "clipfrac")
CYCLE_COLUMNS = ["cycle", "started (UTC)", "status", "version", "reward model held-out accuracy",
                 "gate: reward gain [95% CI]", "left out", "reason"]
LEARNER_COLUMNS = ["learner", "conversations", "chat turns", "comparisons picked", "ratings", "rewrites",
                   "asked again", "last cycle: agreement", "last cycle: weight", "left out"]
VERSION_COLUMNS = ["version", "parent", "cycle", "reward model", "feedback rows", "left out", "served"]


def may_steer(actor: Account) -> bool:
    return actor.role in STEWARDS


def feedback_frame(service: TutorService) -> pd.DataFrame:
    rows = service.store.feedback_by_day()
    return pd.DataFrame(rows or [], columns=["day", "kind", "n"])


def cycles_rows(service: TutorService) -> list[list]:
    rows = []
    for cycle in service.store.cycles():
        metrics = cycle.get("metrics") or {}
        gate, reward = metrics.get("gate") or {}, metrics.get("reward") or {}
        accuracy = reward.get("heldout_accuracy")
        gain, ci = gate.get("reward_gain_length_controlled"), gate.get("reward_gain_ci95")
        rows.append([cycle["id"], (cycle["started_at"] or "")[:16].replace("T", " "), cycle["status"],
                     cycle["policy_version"] or "", "" if accuracy is None else f"{accuracy:.0%}",
                     "" if gain is None else f"{gain:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]",
                     len(metrics.get("left_out") or []), (cycle["reason"] or "")[:200]])
    return rows


def learners_rows(service: TutorService, registry: ModelRegistry, actor: Account) -> list[list]:
    """A teacher's learners (an admin's: every learner; the local user: itself) with what each gave, and
    how the last cycle weighed them (its annotators.json names users by pseudonym)."""
    store = service.store
    if actor.role == "teacher":
        learners = store.learners_of(actor.name)
    elif actor.role == "admin":
        learners = [a["name"] for a in store.accounts() if a["role"] == "learner"]
    else:
        learners = [actor.name]
    last = store.last_cycle()
    path = registry.root / "cycles" / f"{last['id']:04d}" / "annotators.json" if last else None
    weighed = json.loads(path.read_text()) if path is not None and path.exists() else {}
    out = {e["target"]: e["reason"] for e in weighed.get("left_out", []) if e.get("kind") == "user"}
    rows = []
    for learner in learners:
        done = store.activity_since(learner, "")
        entry = weighed.get("users", {}).get(pseudonym(learner), {})
        rows.append([learner or "(local)", done["conversation"], done["chat"], done["pick"], done["rate"],
                     done["rewrite"], done["recheck"], "" if entry.get("agreement") is None else entry["agreement"],
                     entry.get("weight", ""), out.get(pseudonym(learner), "")])
    return rows


def versions_rows(service: TutorService, registry: ModelRegistry) -> list[list]:
    served = service.engine.version
    rows = []
    for version in reversed(registry.versions()):
        meta = registry.meta(version)
        lineage = meta.get("lineage") or {}
        rows_used = sum(len(v) for v in (lineage.get("feedback_rows") or {}).values() if isinstance(v, list))
        rows.append([version, meta.get("parent") or "", lineage.get("cycle") or "", lineage.get("reward_model") or "",
                     rows_used or "", "; ".join(f"{e['kind']} {e['target']}: {e['reason']}"
                                                for e in lineage.get("left_out") or []),
                     "served" if version == served else ""])
    return rows


def ppo_frame(registry: ModelRegistry, cycle_id: int | None) -> pd.DataFrame:
    """PPO's per-update statistics of one cycle, long format (update, curve, value)."""
    rows = []
    if cycle_id:
        path = registry.root / "cycles" / f"{int(cycle_id):04d}" / "ppo_history.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                stats = json.loads(line)
                if "score" not in stats:
                    continue
                rows += [{"update": stats["update"], "curve": name, "value": float(stats[name])}
                         for name in PPO_CURVES if isinstance(stats.get(name), (int, float))]
    return pd.DataFrame(rows, columns=["update", "curve", "value"])


def samples_rows(registry: ModelRegistry, cycle_id: int | None) -> list[list]:
    """The gate's answers of the current and the new version to the same held-out prompts, side by side."""
    path = registry.root / "cycles" / f"{int(cycle_id):04d}" / "report.json" if cycle_id else None
    if path is None or not path.exists():
        return []
    return [[s["prompt"], f"{s['current']}  ({s['reward_current']:+.2f})", f"{s['new']}  ({s['reward_new']:+.2f})"]
            for s in json.loads(path.read_text()).get("samples", [])]


def log_tail(path, lines: int = 20) -> str:
    """The end of a retrain's output, progress bars (carriage returns) folded to their last state."""
    text = path.read_text(errors="replace") if path.exists() else ""
    shown = [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()]
    return "\n".join(shown[-lines:])


def build_tab(service: TutorService, registry: ModelRegistry, actor, retrain_command: list[str] | None = None):
    """Inside a gr.Blocks: the tab, its components and its events. `actor(request)` -> Account;
    `retrain_command`: what "Retrain now" runs (the server's own `launch.py --retrain`), in its own process."""
    with gr.Tab("Teacher", visible=False, elem_id="teacher-tab") as tab:
        summary = gr.Markdown(elem_id="dashboard-summary")
        feedback = gr.BarPlot(x="day", y="n", color="kind", title="Feedback per day", elem_id="feedback-plot")
        gr.Markdown("#### Training cycles")
        cycles = gr.Dataframe(headers=CYCLE_COLUMNS, interactive=False, wrap=True, elem_id="cycles-table")
        with gr.Row():
            chosen = gr.Dropdown([], label="PPO curves of cycle", elem_id="ppo-cycle", scale=1)
        curves = gr.LinePlot(x="update", y="value", color="curve", title="PPO per update", elem_id="ppo-plot")
        answers = gr.Dataframe(headers=["held-out prompt", "current version (reward)", "new version (reward)"],
                               interactive=False, wrap=True, elem_id="answers-table",
                               label="The two versions' answers to the same prompts (from the gate)")
        gr.Markdown("#### Learners")
        learners = gr.Dataframe(headers=LEARNER_COLUMNS, interactive=False, wrap=True, elem_id="learners-table")
        gr.Markdown("#### Versions")
        versions = gr.Dataframe(headers=VERSION_COLUMNS, interactive=False, wrap=True, elem_id="versions-table")
        with gr.Row():
            target = gr.Dropdown([], label="Roll back to", elem_id="rollback-version", scale=2)
            rollback_btn = gr.Button("Roll back", variant="stop", elem_id="rollback", scale=1)
        with gr.Row():
            retrain_btn = gr.Button("Retrain now", elem_id="retrain-now", visible=retrain_command is not None)
            refresh = gr.Button("Refresh", elem_id="dashboard-refresh")
        progress = gr.Textbox(label="Retrain progress", lines=10, max_lines=20, interactive=False, visible=False,
                              elem_id="retrain-progress")
        timer = gr.Timer(2.0, active=False)
    running: dict = {}  # the retrain this server started from the page: its process and its log

    def steward(request: gr.Request) -> Account:
        try:
            account = actor(request)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        if not may_steer(account):
            raise gr.Error("only a teacher or an admin can see the loop", print_exception=False)
        return account

    def show(request: gr.Request):
        try:
            allowed = may_steer(actor(request))
        except UserError:
            allowed = False
        return {tab: gr.update(visible=allowed)}

    def load(request: gr.Request):
        account = steward(request)
        rows = cycles_rows(service)
        last = service.store.last_cycle()
        text = f"**Served: {service.engine.version}.** " + (
            f"Last cycle {last['id']}: {last['status']}" + (f" — {last['reason']}" if last["reason"] else "")
            if last else "No training cycle yet.")
        ids = [r[0] for r in rows]
        return {summary: text, feedback: feedback_frame(service), cycles: rows,
                chosen: gr.update(choices=ids, value=ids[0] if ids else None),
                curves: ppo_frame(registry, ids[0] if ids else None),
                answers: samples_rows(registry, ids[0] if ids else None),
                versions: versions_rows(service, registry),
                learners: learners_rows(service, registry, account),
                target: gr.update(choices=registry.versions(), value=None)}

    def pick_cycle(cycle_id, request: gr.Request):
        steward(request)
        return {curves: ppo_frame(registry, cycle_id), answers: samples_rows(registry, cycle_id)}

    def roll_back(version: str | None, request: gr.Request):
        steward(request)
        if not version:
            raise gr.Error("choose a version to roll back to", print_exception=False)
        try:
            message = registry.rollback(version)
        except (ModelError, RegistryBusy) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        gr.Info(message)
        return load(request)

    def retrain_now(request: gr.Request):
        import subprocess

        steward(request)
        process = running.get("process")
        if process is not None and process.poll() is None:
            raise gr.Error("the retrain started from this page is still running", print_exception=False)
        log = registry.root / "cycles" / "retrain-now.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:  # the child keeps its own copy of the descriptor
            running["process"] = subprocess.Popen(retrain_command, stdout=out, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL)
        running["log"] = log
        return {progress: gr.update(visible=True, value="starting a retrain..."), timer: gr.Timer(active=True)}

    def follow(request: gr.Request):
        steward(request)
        process = running.get("process")
        if process is None:
            return {timer: gr.Timer(active=False)}
        text = log_tail(running["log"])
        if process.poll() is None:
            return {progress: text}
        done = f"{text}\n\n(the retrain ended, exit code {process.returncode})"
        return {**load(request), progress: done, timer: gr.Timer(active=False)}

    outputs = [summary, feedback, cycles, chosen, curves, answers, learners, versions, target]
    retrain_btn.click(retrain_now, None, [progress, timer], api_visibility="private")
    timer.tick(follow, None, [*outputs, progress, timer], api_visibility="private", show_progress="hidden")
    tab.select(load, None, outputs, api_visibility="private")
    refresh.click(load, None, outputs, api_visibility="private")
    chosen.input(pick_cycle, [chosen], [curves, answers], api_visibility="private")
    rollback_btn.click(roll_back, [target], outputs, api_visibility="private")
    return tab, show
