"""A simulated learner's taste: rubrics, plain functions of the dialogue and the answer.

Each rubric returns a score in [0, 1]; an answer *succeeds* when its score is at least SUCCESS (0.5).
A rubric may grade scores below that line (`stays_short` ranks failing answers by length), so a
learner can rank answers that all fail instead of calling such a comparison a tie; a grade that the
preference itself does not care about only adds noise to the pairs (see `uses_example`).

Rubrics judge content, not wording: a question must be about the learner's topic, an example must
carry concrete detail, a short answer must still talk about what was asked. No stock phrase and no
empty answer satisfies any of them.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

Message = dict[str, str]
SUCCESS = 0.5

STOPWORDS = frozenset("""
about above after again against also always another answer anything because been before being below
between both cannot could does doing down during each even every from further have having here
how into just know like make many maybe more most much must need only other over really same
should some something such than that their them then there these they thing things think this those
through under until very want well were what when where which while will with would your you
yours please help explain understand tell mean means does doesn don't what's can't it's i'm
question questions learn learning good great right sure okay thanks thank
""".split())
WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")


def content_stems(text: str) -> set[str]:
    """Lower-cased 5-letter prefixes of the words of 4+ letters that carry meaning."""
    return {w.lower()[:5] for w in WORD.findall(text) if len(w) >= 4 and w.lower() not in STOPWORDS}


def topic_stems(dialogue: list[Message]) -> set[str]:
    return set().union(*(content_stems(m["content"]) for m in dialogue if m["role"] == "user"))


def sentences(answer: str) -> list[str]:
    return [s.strip() for s in SENTENCE.findall(answer) if s.strip()]


def word_count(text: str) -> int:
    return len(WORD.findall(text))


def ends_cleanly(answer: str) -> bool:
    """The answer ends with a finished sentence (not cut off mid-way)."""
    return bool(re.search(r"[.!?)\"']\s*$", answer.strip()))


def on_topic(dialogue: list[Message], answer: str) -> bool:
    return bool(topic_stems(dialogue) & content_stems(answer))


def checks_understanding(dialogue: list[Message], answer: str) -> float:
    """The tutor explains, then checks understanding with a question about the learner's topic.

    1.0: at least 12 words of explanation and a question sharing a topic word with the dialogue (the
    learner's turns or the explanation just given) that is not an echo of the learner's own question; 0.3: a question off the topic
    ("Any questions?") after an explanation; 0.0: no question or no explanation.
    """
    parts = sentences(answer)
    questions = [s for s in parts if s.endswith("?")]
    explanation = sum(word_count(s) for s in parts if not s.endswith("?"))
    if not questions or explanation < 12:
        return 0.0
    topic = topic_stems(dialogue) | content_stems(" ".join(s for s in parts if not s.endswith("?")))
    asked = [content_stems(m["content"]) for m in dialogue if m["role"] == "user"]
    for question in questions:
        stems = content_stems(question)
        echo = any(stems and len(stems & a) / len(stems | a) > 0.6 for a in asked)
        if stems & topic and not echo:
            return 1.0
    return 0.3


EXAMPLE_MARKER = re.compile(r"\b(for example|for instance|e\.g\.|imagine|let's say|let us say|suppose|say you|"
                            r"such as|think of|picture)\b", re.I)


def has_number(sentence: str) -> bool:
    return bool(re.search(r"\d", sentence))


def has_detail(sentence: str) -> bool:
    """A number, or at least four content words: the stuff a concrete example is made of."""
    return has_number(sentence) or len(content_stems(sentence)) >= 4


def uses_example(dialogue: list[Message], answer: str) -> float:
    """The tutor makes the idea concrete with an example that carries detail.

    1.0: a sentence that introduces an example and holds a number or at least four content words, in
    an answer on the topic; 0.3: an example marker without such detail; 0.0: no example. Answers
    without an example tie, so four of them make a tied comparison (about 43% on the embedded model).
    Grading them by their share of sentences with a number broke those ties, and hid the examples
    from every learner of the pairs: on the same 203 comparisons a reward model reached 0.51 held-out
    with that grade and 0.61 without it, a bag of words 0.60 and 0.71 (docs/learning.md).
    """
    marked = [s for s in sentences(answer) if EXAMPLE_MARKER.search(s)]
    if not marked:
        return 0.0
    return 1.0 if on_topic(dialogue, answer) and any(has_detail(s) for s in marked) else 0.3


SHORT_WORDS = 80


def stays_short(dialogue: list[Message], answer: str) -> float:
    """The tutor answers in a few finished sentences (at most 80 words) that stay on the topic.

    1.0 when all three hold; otherwise partial credit that falls with length (shorter is better),
    and 0.0 for an answer that does not touch the topic or says almost nothing.
    """
    words = word_count(answer)
    if words < 5 or not on_topic(dialogue, answer):
        return 0.0
    if words <= SHORT_WORDS and ends_cleanly(answer):
        return 1.0
    return 0.45 * max(0.0, 1 - max(0, words - SHORT_WORDS) / 150)


def _topic_and_body(dialogue: list[Message], answer: str, keywords: list[str]) -> tuple[str | None, list[str]]:
    # A keyword of the learner's own words that the rubrics can see (words of four letters or more).
    visible = [k for k in keywords if len(k) >= 4]
    asked = topic_stems(dialogue)
    topic = next((k for k in visible if k[:5] in asked), next(iter(visible or keywords), None))
    return topic, [s for s in sentences(answer) if not s.endswith("?")]


def rewrite_checking_understanding(dialogue: list[Message], answer: str, keywords: list[str], rng: random.Random) -> str | None:
    """The tutor's explanation, then a question that makes the learner use the topic."""
    topic, body = _topic_and_body(dialogue, answer, keywords)
    if not topic or not body:
        return None
    asks = [f"Can you tell me in your own words what {topic} means here?",
            f"Quick check: how would you use {topic} in a problem of your own?",
            f"What do you think would change about the {topic} if we did it the other way round?",
            f"Try it yourself: where would {topic} come in a first step?"]
    return " ".join(body[:4]) + " " + rng.choice(asks)


def rewrite_shorter(dialogue: list[Message], answer: str, keywords: list[str], rng: random.Random) -> str | None:
    """The first finished sentences of the tutor's answer that fit the word limit."""
    topic, body = _topic_and_body(dialogue, answer, keywords)
    if not topic or not body:
        return None
    kept, words = [], 0
    for sentence in body:
        if words + word_count(sentence) > SHORT_WORDS - 10:
            break
        kept.append(sentence if sentence[-1] in ".!" else sentence + ".")
        words += word_count(sentence)
    text = " ".join(kept) if kept else " ".join(body[0].split()[:SHORT_WORDS - 15]) + "."
    return text if on_topic(dialogue, text) else f"In short, this is about {topic}. " + text


def rewrite_with_example(dialogue: list[Message], answer: str, keywords: list[str], rng: random.Random) -> str | None:
    """The tutor's explanation, then an example built on the topic's own words."""
    topic, body = _topic_and_body(dialogue, answer, keywords)
    if not topic or not body:
        return None
    others = [k for k in keywords if k != topic] or [topic]
    examples = [f"For example, take one {topic} problem with the number 3 and work through the {others[0]} step by step.",
                f"For instance, imagine you meet {topic} in a real task: first look at the {others[-1]}, then at what changes."]
    return " ".join(body[:3]) + " " + rng.choice(examples)


@dataclass(frozen=True)
class Rubric:
    name: str
    score: Callable[[list[Message], str], float]
    # (dialogue, answer, topic keywords, rng) -> the learner's better answer, or None when it cannot help
    rewrite: Callable[[list[Message], str, list[str], random.Random], str | None] | None = None

    def success(self, dialogue: list[Message], answer: str) -> bool:
        return self.score(dialogue, answer) >= SUCCESS


def random_taste(seed: int = 0) -> Callable[[list[Message], str], float]:
    """No consistent preference: feedback that a training cycle must reject."""
    rng = random.Random(seed)
    return lambda dialogue, answer: rng.random()


RUBRICS: dict[str, Rubric] = {
    "checks_understanding": Rubric("checks_understanding", checks_understanding, rewrite_checking_understanding),
    "uses_example": Rubric("uses_example", uses_example, rewrite_with_example),
    "stays_short": Rubric("stays_short", stays_short, rewrite_shorter),
    "random": Rubric("random", random_taste()),
}
