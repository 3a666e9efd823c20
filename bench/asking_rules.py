"""Which pair of a comparison's answers each asking rule would show, and how often the rubric tells that pair
apart: a learner can only tie or err on two answers the rubric scores the same.

    python bench/asking_rules.py docs/learning/uses_example-implicit-run12 [more report folders]

Offline, on a run's saved k-answer comparisons (k >= 3): each is a pool the rules choose two answers from.
The comparisons are taken in order and cut in thirds; the committee that judges the second third is fitted
(rlhf/ensemble.py `train_committee`, as a cycle fits it) on the first third's preference groups, and the one
that judges the last third on the first two thirds'. The rules:

- random: every pair of the pool, counted once each (what random asking shows, on average);
- BALD: the pair of most information about the committee (core/active.py, what active asking shows);
- best vs worst: the answers of the highest and lowest committee mean (as online iterative RLHF pairs them);
- best vs its most informative partner;
- any: whether the pool holds a pair the rubric tells apart at all (the ceiling of any rule).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.store import Store  # noqa: E402
from bench.bench_learning import unpack_database  # noqa: E402
from bench.feedback_audit import cycle_view  # noqa: E402
from bench.rubrics import RUBRICS  # noqa: E402
from core.active import Committee, pair_information  # noqa: E402

RULES = ("random", "BALD", "best vs worst", "best vs its most informative partner", "any")


def pools_of(db: Path, rubric_name: str) -> list[tuple[list[float], list[str]]]:
    """Each decided comparison of three or more answers: the rubric's score of each answer, and the texts."""
    rubric, pools = RUBRICS[rubric_name], []
    with Store(db) as store:
        for row in store.training_comparisons():
            context = json.loads(row["context"]) if isinstance(row["context"], str) else row["context"]
            dialogue = [m for m in context if m["role"] != "system"]
            texts = [c["content"] for c in row["candidates"]]
            if len(texts) >= 3:
                pools.append(([rubric.score(dialogue, t) for t in texts], texts))
    return pools


def chosen_pairs(committee: Committee, answers: list[list[int]]) -> dict[str, list[tuple[int, int]]]:
    """The pair (or, for random, every pair) of the pool's answers (token ids) each rule shows."""
    scores = committee.scores(answers)  # (M, N)
    information, mean = pair_information(scores), scores.mean(0)
    pairs = list(itertools.combinations(range(len(answers)), 2))
    best, worst = int(mean.argmax()), int(mean.argmin())
    partner = max((j for j in range(len(answers)) if j != best), key=lambda j: float(information[best, j]))
    if best == worst:  # every member scores every answer the same: no order to follow
        worst = next(j for j in range(len(answers)) if j != best)
    return {"random": pairs, "BALD": [max(pairs, key=lambda p: float(information[p]))],
            "best vs worst": [(best, worst)], "best vs its most informative partner": [(best, partner)]}


def tally(pools: list[tuple[list[float], list[list[int]]]], committees: list[Committee]) -> dict[str, tuple[int, int]]:
    """{rule: (pairs the rubric tells apart, pairs shown)}; committees[t] judges the (t + 1)-th third."""
    counts = {rule: [0, 0] for rule in RULES}
    n = len(pools)
    for third, committee in enumerate(committees, start=1):
        for rubric_scores, answers in pools[round(n * third / 3):round(n * (third + 1) / 3)]:
            for rule, pairs in chosen_pairs(committee, answers).items():
                counts[rule][0] += sum(rubric_scores[a] != rubric_scores[b] for a, b in pairs)
                counts[rule][1] += len(pairs)
            counts["any"][0] += len(set(rubric_scores)) > 1
            counts["any"][1] += 1
    return {rule: (apart, shown) for rule, (apart, shown) in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", type=Path, nargs="+", help="learning runs' report folders (results.json, "
                    "conversations.db.gz)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from app.embedded import ensure_base
    from app.versions import ModelRegistry
    from rlhf.ensemble import CommitteeConfig, train_committee
    from rlhf.reward import RewardConfig

    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(Path(tmp) / "models")
        ensure_base(registry, say=lambda *_: None)
        policy = registry.path(registry.current_version())
        tokenizer = AutoTokenizer.from_pretrained(policy)
        for report in args.reports:
            rubric = json.loads((report / "results.json").read_text())["rubric"]
            db = unpack_database(report / "conversations.db.gz", Path(tmp) / f"{report.name}.db")
            pools = [(scores, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
                     for scores, texts in pools_of(db, rubric)]
            groups = cycle_view(db).preference_groups
            committees = [train_committee(policy, groups[:round(len(groups) * third / 3)], CommitteeConfig(),
                                          RewardConfig(form="bag_of_tokens")) for third in (1, 2)]
            oob = ", ".join(f"{(c.meta.get('out_of_bag') or {}).get('accuracy', float('nan')):.2f}" for c in committees)
            print(f"{report.name} ({rubric}): {len(pools)} pools; committees out of bag {oob}")
            for rule, (apart, shown) in tally(pools, committees).items():
                print(f"  {rule:38s} {apart:4d} / {shown:4d} = {apart / max(shown, 1):.2f}")


if __name__ == "__main__":
    main()
