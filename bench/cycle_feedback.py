"""The feedback of `bench_cycle.py`'s two-column runs: the start of a learning run's DB, re-ranked by one
error-free rule, so that every learner's feedback passes the agreement check and the reward model clears
its bar (a timing run needs a cycle that reaches PPO and the gate).

    python bench/cycle_feedback.py docs/learning/stays_short/conversations.db.gz short.db [--comparisons 80]

Keeps the first `--comparisons` comparisons and the ratings, rewrites, messages and conversations written
before the next one; every kept ranking is re-given as shorter answers first (characters; ties by label). From the `stays_short`
run's DB this gives 80 comparisons, 33 ratings and 7 rewrites.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_learning import unpack_database  # noqa: E402


def build(source: Path, out: Path, comparisons: int) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix == ".gz":
        unpack_database(source, out)
    else:
        shutil.copyfile(source, out)
    db = sqlite3.connect(out)
    with db:
        kept = [row[0] for row in db.execute("SELECT id FROM comparisons ORDER BY created_at, id LIMIT ?",
                                             (comparisons,))]
        cutoff = db.execute("SELECT created_at FROM comparisons ORDER BY created_at, id LIMIT 1 OFFSET ?",
                            (comparisons,)).fetchone()
        marks = ",".join("?" * len(kept))
        for table, column in (("comparison_picks", "comparison_id"), ("comparison_candidates", "comparison_id"),
                              ("comparisons", "id")):
            db.execute(f"DELETE FROM {table} WHERE {column} NOT IN ({marks})", kept)
        if cutoff is not None:
            for table in ("ratings", "rewrites", "messages", "conversations"):
                db.execute(f"DELETE FROM {table} WHERE created_at >= ?", cutoff)
        for comparison_id, in db.execute("SELECT comparison_id FROM comparison_picks").fetchall():
            candidates = db.execute("SELECT c.label, m.id, m.content FROM comparison_candidates c "
                                    "JOIN messages m ON m.id = c.message_id WHERE c.comparison_id = ?",
                                    (comparison_id,)).fetchall()
            ranked = sorted(candidates, key=lambda c: (len(c[2]), c[0]))
            db.execute("UPDATE comparison_picks SET choice = ?, ranking = ? WHERE comparison_id = ?",
                       (",".join(c[0] for c in ranked), json.dumps([c[1] for c in ranked]), comparison_id))
    counts = {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
              for table in ("comparisons", "comparison_picks", "ratings", "rewrites")}
    db.execute("VACUUM")
    db.close()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="a learning run's conversations.db (or .db.gz)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--comparisons", type=int, default=80)
    args = ap.parse_args()
    print(json.dumps(build(args.source, args.out, args.comparisons)))


if __name__ == "__main__":
    main()
