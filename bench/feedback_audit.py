"""What a run's feedback can teach: how its preference pairs stand against the learners' rubric, and why
answers fail the rubric's substance check.

    python bench/feedback_audit.py docs/learning/final-stays_short-test

A reward model is judged on held-out pairs (the cycle's check wants more than 0.60). Learners of runs
before rankings had shared places ordered all k answers, so two answers the rubric scores the same made a
pair, decided by a coin flip (today's learner joins them, bench/learner.py `decide`); and about a fifth to
a quarter of the other pairs go the wrong way (the error rate, per comparison). The best any reward model can do on such
pairs is the share the rubric orders rightly plus half of the coin flips: the ceiling this prints. The
cycle's own pairs are read as it reads them (rlhf/data.py `collect`, rlhf/annotators.py), and the
training feedback only: the learners ask the prompt set's training part.

    python bench/feedback_audit.py docs/learning/final-stays_short-test --fit bag_of_tokens,score_head

`--fit` asks whether a reward form can see the taste at all: each form is trained on the same training
answers twice, once on the learners' pairs and once on the pairs the rubric itself gives (no noise, no
ties decided by chance), and both are judged on the rubric's order of a held-out part of the groups. A
form that stays near 0.5 with the rubric's own labels needs more than cleaner or more feedback.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.store import Store  # noqa: E402
from bench.bench_learning import unpack_database  # noqa: E402
from bench.rubrics import RUBRICS, why_not_substantive  # noqa: E402
from rlhf.annotators import AnnotatorConfig, weigh_annotators  # noqa: E402
from rlhf.data import collect, is_heldout  # noqa: E402


def cycle_view(db: Path):
    """The preference groups and demonstrations as a cycle weighs them (rlhf/annotators.py)."""
    with Store(db) as store:
        data, _ = weigh_annotators(collect(store), store.training_exclusions(), store.repeat_checks(), AnnotatorConfig())
    return data


def audit(db: Path, rubric_name: str) -> dict:
    rubric = RUBRICS[rubric_name]
    data = cycle_view(db)
    pairs, scores, failures = Counter(), Counter(), Counter()
    for group in data.preference_groups:
        dialogue = [m for m in group.prompt if m["role"] != "system"]
        score = [rubric.score(dialogue, text) for text in group.completions]
        for text, value in zip(group.completions, score):
            scores[round(value, 2)] += 1
            failures[why_not_substantive(dialogue, text) or "has substance"] += 1
        for chosen, rejected in group.pairs:
            pairs["equal" if score[chosen] == score[rejected] else
                  "as the rubric orders" if score[chosen] > score[rejected] else "against the rubric"] += 1
    total = sum(pairs.values())
    ceiling = (max(pairs["as the rubric orders"], pairs["against the rubric"]) + pairs["equal"] / 2) / max(total, 1)
    return {"rubric": rubric_name, "groups": len(data.preference_groups), "pairs": dict(pairs),
            "equal_share": round(pairs["equal"] / max(total, 1), 3), "ceiling": round(ceiling, 3),
            "answers_by_score": dict(scores.most_common(8)), "substance": dict(failures.most_common())}


def learnability(db: Path, rubric_name: str, policy_dir: Path, forms: list[str],
                 heldout_fraction: float = 0.3) -> list[dict]:
    """Held-out accuracy against the rubric's order of each form, trained on the learners' pairs and on
    the rubric's own pairs of the same rankings."""
    import dataclasses

    from rlhf.reward import RewardConfig, train_reward_model

    rubric = RUBRICS[rubric_name]
    data = cycle_view(db)
    learners, rubric_own = [], []
    for group in data.preference_groups:
        if group.source != "ranking":
            continue
        dialogue = [m for m in group.prompt if m["role"] != "system"]
        score = [rubric.score(dialogue, text) for text in group.completions]
        ordered = [(i, j) for i in range(len(score)) for j in range(len(score)) if score[i] > score[j]]
        if ordered:
            learners.append(group)
            rubric_own.append(dataclasses.replace(group, pairs=ordered, weight=1.0))
    held = [g for g in rubric_own if is_heldout(g.conversation_id, heldout_fraction)]
    rows = []
    for labels, groups in (("learners", learners), ("rubric", rubric_own)):
        train = [g for g in groups if not is_heldout(g.conversation_id, heldout_fraction)]
        for form in forms:
            metrics = train_reward_model(policy_dir, train, held, RewardConfig(form=form)).metrics
            rows.append({"labels": labels, "form": form, "train_groups": len(train),
                         "train_pairs": sum(len(g.pairs) for g in train),
                         "heldout_vs_rubric": round(metrics["heldout_accuracy"], 3),
                         "heldout_pairs": metrics["heldout_pairs"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="a learning run's report folder (results.json, conversations.db.gz)")
    ap.add_argument("--fit", default="", help="reward forms to train on the learners' and the rubric's own "
                    "pairs, e.g. bag_of_tokens,score_head (the embedded model's tokenizer and backbone)")
    args = ap.parse_args()
    rubric = json.loads((args.report / "results.json").read_text())["rubric"]
    with tempfile.TemporaryDirectory() as tmp:
        db = unpack_database(args.report / "conversations.db.gz", Path(tmp) / "conversations.db")
        print(json.dumps(audit(db, rubric), indent=1))
        if args.fit:
            from app.embedded import ensure_base
            from app.versions import ModelRegistry

            registry = ModelRegistry(Path(tmp) / "models")
            ensure_base(registry, say=lambda *_: None)
            for row in learnability(db, rubric, registry.path(registry.current_version()), args.fit.split(",")):
                print(json.dumps(row))


if __name__ == "__main__":
    main()
