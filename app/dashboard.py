"""The teacher's view of the loop, a tab of the page: what feedback came in (by kind and by learner), what
each cycle did with it and why it ended as it did, PPO's curves, each learner's feedback and weight, the
versions and their lineage, the arena's leaderboard and the canary; a rollback, a retrain, and each
cycle's static report. The two versions' answers side by side are the gate's, on held-out prompts. The
figures come from app/loop_view.py, which reads what the cycles write.

The tab is shown to teachers, admins and the one local user of a server without accounts; every
handler checks the session's role again, so hiding the tab is a courtesy, not the protection.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from app import loop_view as view
from app.accounts import Account
from app.service import TutorService, UserError
from app.versions import ModelError, ModelRegistry, RegistryBusy

STEWARDS = ("teacher", "admin", "local")


def may_steer(actor: Account) -> bool:
    return actor.role in STEWARDS


def log_tail(path, lines: int = 20) -> str:
    """The end of a retrain's output, progress bars (carriage returns) folded to their last state."""
    text = path.read_text(errors="replace") if path.exists() else ""
    shown = [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()]
    return "\n".join(shown[-lines:])


def build_tab(service: TutorService, registry: ModelRegistry, actor, retrain_command: list[str] | None = None):
    """Inside a gr.Blocks: the tab, its components and its events. `actor(request)` -> Account;
    `retrain_command`: what "Retrain now" runs (the server's own `launch.py --retrain`), in its own process."""
    store = service.store
    with gr.Tab("Teacher", visible=False, elem_id="teacher-tab") as tab:
        summary = gr.Markdown(elem_id="dashboard-summary")
        with gr.Row():
            feedback = gr.BarPlot(x="day", y="n", color="kind", title="Feedback per day", elem_id="feedback-plot")
            by_learner = gr.BarPlot(x="day", y="n", color="learner", title="Feedback per day by learner",
                                    elem_id="learner-plot")
        gr.Markdown("#### Training cycles")
        cycles = gr.Dataframe(headers=view.CYCLE_COLUMNS, interactive=False, wrap=True, elem_id="cycles-table")
        with gr.Row():
            chosen = gr.Dropdown([], label="PPO curves of cycle", elem_id="ppo-cycle", scale=2)
            report = gr.DownloadButton("Cycle report (HTML)", elem_id="cycle-report", scale=1)
        curves = gr.LinePlot(x="update", y="value", color="curve", title="PPO per update", elem_id="ppo-plot")
        answers = gr.Dataframe(headers=view.SAMPLE_COLUMNS, interactive=False, wrap=True, elem_id="answers-table",
                               label="The two versions' answers to the same prompts (from the gate)")
        gr.Markdown("#### Arena and canary")
        canary = gr.Markdown(elem_id="canary-summary")
        leaderboard = gr.Dataframe(headers=view.LEADERBOARD_COLUMNS, interactive=False, elem_id="leaderboard",
                                   label="Versions rated by learners' blind votes (Bradley-Terry, Elo scale)")
        canaries = gr.Dataframe(headers=view.CANARY_COLUMNS, interactive=False, wrap=True, elem_id="canaries-table",
                                label="Canaries")
        gr.Markdown("#### Learners")
        learners = gr.Dataframe(headers=view.LEARNER_COLUMNS, interactive=False, wrap=True, elem_id="learners-table")
        with gr.Row():
            left_out = gr.Dropdown([], label="Leave a learner out of training", elem_id="exclude-learner", scale=2)
            exclude_reason = gr.Textbox(label="Why (kept with the exclusion)", max_lines=1, scale=3,
                                        elem_id="exclude-reason")
            exclude_btn = gr.Button("Leave out", elem_id="exclude", scale=1)
        gr.Markdown("#### Versions")
        versions = gr.Dataframe(headers=view.VERSION_COLUMNS, interactive=False, wrap=True, elem_id="versions-table")
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

    def for_cycle(cycle_id) -> dict:
        path = None
        if cycle_id:  # written afresh (a canary may have ended since), where Gradio serves downloads from
            try:
                path = Path(tempfile.mkdtemp(prefix="tutor-report-")) / f"cycle-{int(cycle_id):04d}.html"
                path.write_text(view.cycle_report_html(store, registry, int(cycle_id), service.arena), encoding="utf-8")
            except (LookupError, OSError):
                path = None
        return {curves: view.ppo_frame(registry, cycle_id), answers: view.samples_rows(registry, cycle_id),
                report: gr.update(value=str(path) if path else None, interactive=path is not None)}

    def load(request: gr.Request):
        account = steward(request)
        if service.arena is not None:
            service.arena.review()  # a canary whose time is up ends before it is shown as running
        rows = view.cycles_rows(store)
        last = store.last_cycle()
        text = f"**Served: {service.engine.version}.** " + (
            f"Last cycle {last['id']}: {last['status']}" + (f" — {last['reason']}" if last["reason"] else "")
            if last else "No training cycle yet.")
        ids = [r[0] for r in rows]
        names = view.learners_of(store, account.role, account.name)
        return {summary: text, feedback: view.feedback_frame(store),
                by_learner: view.learner_feedback_frame(store, names, lambda n: n or "(local)"), cycles: rows,
                chosen: gr.update(choices=ids, value=ids[0] if ids else None), **for_cycle(ids[0] if ids else None),
                canary: view.canary_text(service.arena.summary() if service.arena else None),
                leaderboard: view.leaderboard_rows(service.arena) if service.arena else [],
                canaries: view.canaries_rows(store),
                versions: view.versions_rows(store, registry, service.engine.version),
                learners: view.learners_rows(store, registry, names),
                left_out: gr.update(choices=[n for n in names if n], value=None),
                target: gr.update(choices=registry.versions(), value=None)}

    def pick_cycle(cycle_id, request: gr.Request):
        steward(request)
        return for_cycle(cycle_id)

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

    def exclude(learner: str | None, reason: str, request: gr.Request):
        account = steward(request)
        if not learner:
            raise gr.Error("choose a learner to leave out", print_exception=False)
        try:  # the service checks again that this learner is the teacher's
            service.exclude(account, "user", learner, reason or "")
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        gr.Info(f"{learner}'s feedback is left out of every later cycle")
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

    outputs = [summary, feedback, by_learner, cycles, chosen, curves, answers, report, canary, leaderboard,
               canaries, learners, left_out, versions, target]
    retrain_btn.click(retrain_now, None, [progress, timer], api_visibility="private")
    timer.tick(follow, None, [*outputs, progress, timer], api_visibility="private", show_progress="hidden")
    tab.select(load, None, outputs, api_visibility="private")
    refresh.click(load, None, outputs, api_visibility="private")
    chosen.input(pick_cycle, [chosen], [curves, answers, report], api_visibility="private")
    rollback_btn.click(roll_back, [target], outputs, api_visibility="private")
    exclude_btn.click(exclude, [left_out, exclude_reason], outputs, api_visibility="private")
    return tab, show
