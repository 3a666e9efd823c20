"""The loop's figures, read from the store and the models directory that the cycles write: feedback over
time (by kind, by learner), the cycles table, PPO's curves, the gate's answers of two versions side by
side, the versions' lineage, the learners' weights, the arena's leaderboard and the canaries. The
Teacher tab (app/dashboard.py) shows them on the page; `cycle_report_html` writes the same figures into
one static HTML file per cycle (matplotlib images inline, nothing fetched), with learners named by
pseudonym as every file the loop writes does.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import pandas as pd

from app.store import Store
from app.versions import ModelRegistry
from core.privacy import pseudonym

PPO_CURVES = ("score", "kl", "entropy", "answer_length", "clipfrac")
CYCLE_COLUMNS = ["cycle", "started (UTC)", "status", "version", "reward model held-out accuracy",
                 "gate: reward gain [95% CI]", "left out", "reason"]
LEARNER_COLUMNS = ["learner", "conversations", "chat turns", "comparisons picked", "ratings", "rewrites",
                   "asked again", "last cycle: agreement", "last cycle: weight", "left out"]
VERSION_COLUMNS = ["version", "parent", "cycle", "reward model", "feedback rows", "left out", "canary", "served"]
LEADERBOARD_COLUMNS = ["version", "rating", "95% interval", "style-controlled rating", "95% interval (style)", "votes"]
CANARY_COLUMNS = ["version", "against", "started (UTC)", "status", "votes", "win rate [95% CI]", "reason"]
SAMPLE_COLUMNS = ["held-out prompt", "current version (reward)", "new version (reward)"]


def _when(stamp: str | None) -> str:
    return (stamp or "")[:16].replace("T", " ")


def feedback_frame(store: Store) -> pd.DataFrame:
    return pd.DataFrame(store.feedback_by_day() or [], columns=["day", "kind", "n"])


def learner_feedback_frame(store: Store, learners: list[str] | None, named=lambda name: name) -> pd.DataFrame:
    """Feedback items per day and learner (None: every learner); `named` turns a name into what is shown."""
    rows = [{**r, "learner": named(r["user"])} for r in store.feedback_by_day_and_user(learners)]
    return pd.DataFrame(rows, columns=["day", "learner", "n"])


def cycles_rows(store: Store) -> list[list]:
    rows = []
    for cycle in store.cycles():
        metrics = cycle.get("metrics") or {}
        gate, reward = metrics.get("gate") or {}, metrics.get("reward") or {}
        accuracy = reward.get("heldout_accuracy")
        gain, ci = gate.get("reward_gain_length_controlled"), gate.get("reward_gain_ci95")
        rows.append([cycle["id"], _when(cycle["started_at"]), cycle["status"],
                     cycle["policy_version"] or "", "" if accuracy is None else f"{accuracy:.0%}",
                     "" if gain is None else f"{gain:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]",
                     len(metrics.get("left_out") or []), (cycle["reason"] or "")[:200]])
    return rows


def learners_of(store: Store, role: str, name: str) -> list[str]:
    """Whose feedback a steward sees: a teacher's learners, an admin's every learner, the local user itself."""
    if role == "teacher":
        return store.learners_of(name)
    if role == "admin":
        return [a["name"] for a in store.accounts() if a["role"] == "learner"]
    return [name]


def learners_rows(store: Store, registry: ModelRegistry, learners: list[str]) -> list[list]:
    """Each learner with what they gave, and how the last cycle weighed them (its annotators.json names
    users by pseudonym)."""
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


def versions_rows(store: Store, registry: ModelRegistry, served: str) -> list[list]:
    canaries: dict[str, str] = {}
    for canary in reversed(store.canaries()):  # oldest first: a version's last canary wins
        canaries[canary["version"]] = f"{canary['status']} (against {canary['baseline']})"
    rows = []
    for version in reversed(registry.versions()):
        meta = registry.meta(version)
        lineage = meta.get("lineage") or {}
        rows_used = sum(len(v) for v in (lineage.get("feedback_rows") or {}).values() if isinstance(v, list))
        rows.append([version, meta.get("parent") or "", lineage.get("cycle") or "", lineage.get("reward_model") or "",
                     rows_used or "", "; ".join(f"{e['kind']} {e['target']}: {e['reason']}"
                                                for e in lineage.get("left_out") or []),
                     canaries.get(version, ""), "served" if version == served else ""])
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


def leaderboard_rows(arena) -> list[list]:
    """The arena's ratings, raw and style-controlled, one row per version (best style-controlled first)."""
    raw = {r["version"]: r for r in arena.leaderboard(style_control=False)}
    styled = arena.leaderboard(style_control=True)

    def span(r):
        return "" if r.get("low") is None else f"[{r['low']:.0f}, {r['high']:.0f}]"
    return [[r["version"], f"{raw[r['version']]['elo']:.0f}", span(raw[r["version"]]), f"{r['elo']:.0f}", span(r),
             r["votes"]] for r in styled]


def canaries_rows(store: Store) -> list[list]:
    rows = []
    for canary in store.canaries():
        verdict = canary.get("verdict") or {}
        rate = (f"{verdict['win_rate']:.0%} [{verdict['low']:.0%}, {verdict['high']:.0%}]"
                if verdict.get("votes") else "")
        rows.append([canary["version"], canary["baseline"], _when(canary["started_at"]), canary["status"],
                     verdict.get("votes", ""), rate, canary.get("reason") or ""])
    return rows


def canary_text(summary: dict | None) -> str:
    if summary is None:
        return "No canary is running."
    s = summary["settings"]
    low, high = summary["interval"]
    return (f"**Canary {summary['version']}** against {summary['baseline']} since {_when(summary['started_at'])} UTC: "
            f"{summary['votes']} arena votes, win rate at equal style {summary['win_rate']:.0%} [{low:.0%}, {high:.0%}]. "
            f"It answers {s['conversation_share']:.0%} of new conversations and {s['arena_share']:.0%} of two-answer "
            f"comparisons. After {s['min_votes']} votes it is promoted when the interval's low end reaches "
            f"{0.5 - s['margin']:.0%}, withdrawn when its high end is below 50%; undecided after {s['max_votes']} votes "
            f"or {s['max_hours']:g} hours, it is withdrawn.")


# -- the static report -------------------------------------------------------------------------------

def _figure_png(frame: pd.DataFrame, x: str, y: str, color: str, title: str, kind: str = "line") -> str:
    """One small chart as an inline <img> (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if frame.empty:
        return "<p><i>nothing yet</i></p>"
    table = frame.pivot_table(index=x, columns=color, values=y, aggfunc="sum").fillna(0 if kind == "bar" else float("nan"))
    if kind == "line":  # one panel per curve: their scales differ by orders of magnitude
        fig, axes = plt.subplots(1, len(table.columns), figsize=(2.6 * len(table.columns), 2.4), squeeze=False)
        for ax, name in zip(axes[0], table.columns):
            ax.plot(table.index, table[name], marker=".")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(x, fontsize=8)
            ax.tick_params(labelsize=7)
    else:
        fig, ax = plt.subplots(figsize=(7, 2.6))
        table.plot.bar(stacked=True, ax=ax, fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(headers: list[str], rows: list[list]) -> str:
    if not rows:
        return "<p><i>none</i></p>"
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cycle_report_html(store: Store, registry: ModelRegistry, cycle_id: int, arena=None) -> str:
    """The figures of one cycle as a self-contained HTML page. Learners appear by pseudonym only."""
    cycle = next((c for c in store.cycles() if c["id"] == cycle_id), None)
    if cycle is None:
        raise LookupError(f"no training cycle {cycle_id}")
    served = registry.current_or_none() or ""
    cycle_row = [r for r in cycles_rows(store) if r[0] == cycle_id]
    parts = [
        f"<h1>Training cycle {cycle_id}</h1>",
        f"<p><b>{html.escape(cycle['status'])}</b>: {html.escape(cycle['reason'] or '')}</p>",
        _table(CYCLE_COLUMNS, cycle_row),
        "<h2>Feedback over time</h2>", _figure_png(feedback_frame(store), "day", "n", "kind", "Feedback per day", "bar"),
        _figure_png(learner_feedback_frame(store, None, pseudonym), "day", "n", "learner",
                    "Feedback per day by learner (pseudonyms)", "bar"),
        "<h2>PPO</h2>", _figure_png(ppo_frame(registry, cycle_id), "update", "value", "curve", "PPO per update"),
        "<h2>The two versions' answers to the same held-out prompts (from the gate)</h2>",
        _table(SAMPLE_COLUMNS, samples_rows(registry, cycle_id)),
        "<h2>Left out of this cycle</h2>",
        _table(["kind", "who", "items", "reason"], [[e["kind"], e["target"], e.get("items", ""), e["reason"]]
                                                   for e in (cycle.get("metrics") or {}).get("left_out") or []]),
        "<h2>Versions</h2>", _table(VERSION_COLUMNS, versions_rows(store, registry, served)),
        "<h2>Canaries</h2>", _table(CANARY_COLUMNS, canaries_rows(store)),
    ]
    if arena is not None:
        parts += ["<h2>Arena leaderboard</h2>", _table(LEADERBOARD_COLUMNS, leaderboard_rows(arena))]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid #ccc;"
             "padding:4px 6px;vertical-align:top;text-align:left}th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Cycle {cycle_id}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_cycle_report(store: Store, registry: ModelRegistry, cycle_id: int, arena=None) -> Path:
    """models/cycles/NNNN/report.html, written whole under a temporary name, then renamed."""
    folder = registry.root / "cycles" / f"{cycle_id:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    final, tmp = folder / "report.html", folder / ".report.html.tmp"
    tmp.write_text(cycle_report_html(store, registry, cycle_id, arena), encoding="utf-8")
    os.replace(tmp, final)
    return final
