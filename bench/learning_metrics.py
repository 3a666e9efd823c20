"""What the learning benchmark reports about a set of answers, each with a 95% confidence interval.

- rubric success rate (Wilson interval) and win rate against the base, judged pairwise by the rubric on
  the same prompt and sample index (ties left out of the rate, reported beside it);
- fluency: the base model's perplexity of the answers, distinct-n, the share of answers that end with
  the same sentence as another, and the share that stay on the question's topic (a keyword of the prompt);
- mean answer length in words.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from bench.rubrics import SUCCESS, sentences, word_count
from core.stats import bootstrap, wilson


def success_rate(scores: Sequence[float]) -> tuple[float, float, float]:
    return wilson(sum(s >= SUCCESS for s in scores), len(scores))


def win_rate(new: Sequence[float], base: Sequence[float]) -> dict:
    """Pairwise by rubric score, sample against sample on the same prompt; ties apart."""
    wins = sum(n > b for n, b in zip(new, base))
    losses = sum(n < b for n, b in zip(new, base))
    rate, low, high = wilson(wins, wins + losses)
    return {"win_rate": rate, "ci": (low, high), "wins": wins, "losses": losses, "ties": len(new) - wins - losses}


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return list(zip(*(words[i:] for i in range(n))))


def distinct_n(answers: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams, averaged per answer (so it does not fall with the sample size)."""
    per_answer = [len(set(g)) / len(g) for g in (_ngrams(a, n) for a in answers) if g]
    return sum(per_answer) / len(per_answer) if per_answer else float("nan")


def last_sentence(answer: str) -> str:
    parts = sentences(answer)
    return re.sub(r"\W+", " ", parts[-1].lower()).strip() if parts else ""


def repeated_ending_flags(answers: Sequence[str]) -> list[float]:
    """1.0 for each answer whose last sentence is also the last sentence of another answer."""
    endings = [last_sentence(a) for a in answers]
    counts = Counter(endings)
    return [float(bool(e) and counts[e] > 1) for e in endings]


def on_topic_flags(answers: Sequence[str], keywords: Sequence[Sequence[str]]) -> list[float]:
    return [float(any(re.search(rf"\b{re.escape(k[:5])}", a.lower()) for k in kws)) for a, kws in zip(answers, keywords)]


def summarise(samples: list[dict], base_scores: Sequence[float] | None, keywords: Sequence[Sequence[str]],
              log_perplexities: Sequence[float] | None = None) -> dict:
    """One row of the learning curve from evaluation samples (dicts with 'answer' and 'score')."""
    answers = [s["answer"] for s in samples]
    scores = [s["score"] for s in samples]
    row = {"samples": len(samples), "success": success_rate(scores),
           "length_words": bootstrap([word_count(a) for a in answers]),
           "distinct_2": bootstrap(answers, statistic=lambda v: distinct_n(v, 2)),
           "repeated_endings": bootstrap(repeated_ending_flags(answers)),
           "on_topic": bootstrap(on_topic_flags(answers, keywords))}
    if base_scores is not None:
        row["vs_base"] = win_rate(scores, base_scores)
    if log_perplexities:
        mean, low, high = bootstrap(log_perplexities)
        row["perplexity"] = (math.exp(mean), math.exp(low), math.exp(high))
    return row
