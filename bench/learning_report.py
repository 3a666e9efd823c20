"""The learning benchmark's report: a table with 95% intervals, the cycles' verdicts, a PNG of the
curves, and answers of the base and the last version side by side."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def _ci(value) -> str:
    if not value:
        return "-"
    mean, low, high = value
    return f"{mean:.3g} [{low:.3g}, {high:.3g}]"


def _pct(value) -> str:
    mean, low, high = value
    return f"{mean:.1%} [{low:.1%}, {high:.1%}]"


def table(rows: list[dict], cycles: list[dict]) -> list[str]:
    kl_to_base = {c["version"]: c["gate"].get("kl_to_base") for c in cycles if c.get("version")}
    lines = ["| cycle | version | feedback items | rubric success | win rate vs base (W/L/T) | KL to base | words | "
             "perplexity (base model) | distinct-2 | repeated endings | on topic |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        vs = row.get("vs_base")
        win = (f"{vs['win_rate']:.1%} [{vs['ci'][0]:.1%}, {vs['ci'][1]:.1%}] ({vs['wins']}/{vs['losses']}/{vs['ties']})"
               if vs else "-")
        kl = f"{kl_to_base[row['version']]:.2f}" if kl_to_base.get(row["version"]) is not None else "-"
        version = f"{row['version']} (cycle rejected, unchanged)" if row.get("unchanged") else row["version"]
        lines.append(f"| {row['cycle']} | {version} | {row['feedback_items']} | {_pct(row['success'])} | {win} | "
                     f"{kl} | {_ci(row['length_words'])} | {_ci(row.get('perplexity'))} | {_ci(row['distinct_2'])} | "
                     f"{_pct(row['repeated_endings'])} | {_pct(row['on_topic'])} |")
    return lines


def _num(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def cycle_line(cycle: dict) -> str:
    """One cycle in words: its feedback, where its time went, and what each stage found."""
    feedback = cycle["feedback"]
    rm, gate, ppo = cycle.get("reward") or {}, cycle.get("gate") or {}, cycle.get("ppo_last") or {}
    stages = ", ".join(f"{name} {entry['seconds']:.0f} s" for name, entry in (cycle.get("stages") or {}).items())
    parts = [f"- cycle {cycle['cycle']}: **{cycle['status']}** after {cycle['seconds']:.0f} s"
             + (f" ({stages})" if stages else ""),
             f"feedback: {feedback['items']} items ({feedback['picks']} picks of which {feedback['ties']} ties, "
             f"{feedback['ratings']} ratings, {feedback['rewrites']} rewrites)"]
    if rm:
        parts.append(f"reward model held-out accuracy {_num(rm.get('heldout_accuracy'))} on {rm.get('heldout_pairs')} pairs, "
                     f"reward-length correlation {_num(rm.get('length_correlation'))}")
    if ppo:
        parts.append(f"PPO's last update {ppo.get('update')}: score {_num(ppo.get('score'))}, KL {_num(ppo.get('kl'))}, "
                     f"answer length {_num(ppo.get('answer_length'), 0)} tokens"
                     + (f", score gain over its updates {_num(cycle['ppo_score_gain'])}"
                        if cycle.get("ppo_score_gain") is not None else "")
                     + (f" ({cycle['ppo_stopped']})" if cycle.get("ppo_stopped") else ""))
    if gate:
        gain, (low, high) = gate.get("reward_gain_length_controlled"), gate.get("reward_gain_ci95", [None, None])
        what = "length-controlled reward gain" if gate.get("length_controlled") else "reward gain (users prefer " \
            f"{gate.get('preferred_length')} answers)"
        parts.append(f"gate: {what} {_num(gain)} [{_num(low)}, {_num(high)}], KL to reference {_num(gate.get('kl_to_reference'))} "
                     f"and to base {_num(gate.get('kl_to_base'))}, length {_num(gate.get('length_current'), 0)} -> "
                     f"{_num(gate.get('length_new'), 0)} tokens"
                     + (f", the judge PPO did not optimise ({gate['judge']}) {_num(gate.get('judge_gain'))} "
                        f"[{_num(gate['judge_gain_ci95'][0])}, {_num(gate['judge_gain_ci95'][1])}]" if gate.get("judge") else ""))
    parts.append(f"verdict: {cycle['reason']}")
    return "; ".join(parts)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [r["feedback_items"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    series = [("rubric success", [r["success"] for r in rows], axes[0]),
              ("win rate vs base", [(r["vs_base"]["win_rate"], *r["vs_base"]["ci"]) if r.get("vs_base") else None
                                    for r in rows], axes[0]),
              ("perplexity (base model)", [r.get("perplexity") for r in rows], axes[1]),
              ("distinct-2", [r["distinct_2"] for r in rows], axes[2]),
              ("repeated endings", [r["repeated_endings"] for r in rows], axes[2])]
    for label, values, ax in series:
        points = [(x, v) for x, v in zip(items, values) if v]
        if not points:
            continue
        xs = [x for x, _ in points]
        ax.errorbar(xs, [v[0] for _, v in points], yerr=[[v[0] - v[1] for _, v in points], [v[2] - v[0] for _, v in points]],
                    marker="o", capsize=3, label=label)
    for ax, name in zip(axes, ("rate", "perplexity", "share")):
        ax.set_xlabel("feedback items")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.5, color="grey", lw=0.8, ls=":")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, samples: dict[str, list[dict]], out: Path, n_examples: int = 6) -> None:
    rows = results["rows"]
    arm = "PPO off (SFT on the same feedback only)" if results["no_ppo"] else "RLHF (reward model + PPO)"
    title = f"Learning curve: rubric {results['rubric']}, {arm}"
    plot(rows, out / "curves.png", title)
    lines = [f"# {title}", "",
             f"{results['samples_per_measurement']} answers per measurement ({results['heldout_openers']} held-out openers "
             f"of the {results.get('eval_part', 'dev')} part, "
             f"never trained on), learners' error rate {results['error_rate']:.0%}, k = {results['k']}, "
             f"{results['items_per_cycle']} feedback items per cycle, comparisons shown {results.get('asking', 'random')}ly "
             f"(`[serve.asking]`); the whole run took {results['minutes']} minutes."
             + (f" The feedback is not new: one cycle retrained on all the feedback of the run in "
                f"`{results['feedback_from']}`, replayed from its database." if results.get("feedback_from") else ""),
             "Intervals are 95% (Wilson for rates, bootstrap otherwise). Win rate: the new version's answer against "
             "the base's on the same opener, judged by the rubric's score; ties are left out of the rate. KL to base: "
             "nats per answer, measured by the cycle's gate on its held-out prompts.", "",
             *table(rows, results["cycles"]), "", "![curves](curves.png)", "", "## Cycles", ""]
    for cycle in results["cycles"]:
        lines.append(cycle_line(cycle))
    first, last = rows[0]["version"], rows[-1]["version"]
    if first != last:
        lines += ["", f"## Answers before ({first}) and after ({last})", ""]
        for before, after in list(zip(samples[first], samples[last]))[:: max(1, len(samples[first]) // n_examples)][:n_examples]:
            lines += [f"**Learner:** {before['dialogue'][-1]['content']}", "",
                      f"- before (score {before['score']:.2f}): {before['answer']!r}",
                      f"- after (score {after['score']:.2f}): {after['answer']!r}", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot_arms(arms: dict[str, list[dict]], path: Path, title: str) -> None:
    """Rubric success against feedback items, one line per arm (e.g. random and active asking, the same
    learners and seeds), with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, rows in arms.items():
        xs = [r["feedback_items"] for r in rows]
        mean = [r["success"][0] for r in rows]
        ax.errorbar(xs, mean, yerr=[[m - r["success"][1] for m, r in zip(mean, rows)],
                                    [r["success"][2] - m for m, r in zip(mean, rows)]],
                    marker="o", capsize=3, label=name)
    ax.set_xlabel("feedback items")
    ax.set_ylabel("rubric success on the held-out openers")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def arms_table(arms: dict[str, dict]) -> list[str]:
    """Each arm's curve in numbers: success after each cycle, the cycle's reward model and verdict, and the
    first point at which the arm reached the first arm's last success rate (its point estimate)."""
    target = next(iter(arms.values()))["rows"][-1]["success"][0]
    lines = ["| arm | feedback items | rubric success | reward model held-out accuracy (pairs) | verdict |",
             "|---|---|---|---|---|"]
    for name, results in arms.items():
        cycles = {c["cycle"]: c for c in results.get("cycles", [])}
        for row in results["rows"]:
            cycle = cycles.get(row.get("cycle"), {})
            rm = cycle.get("reward") or {}
            accuracy = (f"{rm['heldout_accuracy']:.2f} ({rm.get('heldout_pairs')})"
                        if isinstance(rm.get("heldout_accuracy"), float) else "-")
            lines.append(f"| {name} | {row['feedback_items']} | {_pct(row['success'])} | {accuracy} | "
                         f"{cycle.get('status', 'base' if not row.get('cycle') else '-')} |")
    reached = {name: next((r["feedback_items"] for r in results["rows"] if r["success"][0] >= target), None)
               for name, results in arms.items()}
    first = next(iter(arms))
    lines.append("")
    lines.append(f"Items at which each arm first reached {first}'s last success rate ({target:.1%}): "
                 + ", ".join(f"{name} {items if items is not None else 'not within the run'}"
                             for name, items in reached.items()))
    return lines


def asks_by_reason(folder: Path) -> dict[str, int] | None:
    """Why the run's decided comparisons showed what they showed (core/active.py `Asked.why`), from its
    saved database."""
    import tempfile

    from app.store import Store
    from bench.bench_learning import unpack_database

    source = folder / "conversations.db.gz"
    if not source.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        reasons: dict[str, int] = {}
        with Store(unpack_database(source, Path(tmp) / "c.db")) as store:
            for row in store.training_comparisons():
                asked = store.comparison(row["comparison_id"])["asked"]
                why = asked["why"] if asked else "not recorded"
                reasons[why] = reasons.get(why, 0) + 1
    return reasons


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Learning curves of several runs in one plot, e.g. active and random "
                                             "asking with the same learners and seeds")
    ap.add_argument("arms", nargs="+", metavar="NAME=FOLDER", help="a name and a report folder with results.json")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = ap.parse_args()
    arms, folders, rubrics = {}, {}, set()
    for arm in args.arms:
        name, _, folder = arm.partition("=")
        if not folder:
            ap.error(f"{arm!r} is not NAME=FOLDER")
        folders[name] = Path(folder)
        results = json.loads((folders[name] / "results.json").read_text())
        arms[name], rubrics = results, rubrics | {results["rubric"]}
    if len(rubrics) != 1:
        ap.error(f"the runs are of different rubrics: {sorted(rubrics)}")
    plot_arms({name: results["rows"] for name, results in arms.items()}, args.out,
              f"rubric {rubrics.pop()}: " + " vs ".join(arms))
    print("\n".join(arms_table(arms)))
    for name, folder in folders.items():
        print(f"{name}: comparisons asked by reason: {asks_by_reason(folder)}")
    print(args.out)


if __name__ == "__main__":
    main()
