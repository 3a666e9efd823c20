"""A simulated learner's taste: rubrics, plain functions of the dialogue and the answer.

Each rubric returns a score in [0, 1]; an answer *succeeds* when its score is at least SUCCESS (0.5).
A rubric may grade scores below that line (`stays_short` ranks failing answers by length), so a
learner can rank answers that all fail instead of calling such a comparison a tie; a grade that the
preference itself does not care about only adds noise to the pairs (see `uses_example`).

Rubrics judge content, not wording: a question must be about the learner's topic, an example must
carry concrete detail, a short answer must still talk about what was asked. Every rubric first asks
for an answer of substance (`substantive`): at least two different sentences, most of them about the
learner's topic, that bring content words of their own, and no refusal. So no stock phrase, no
on-topic refusal, no one-liner and no sentence said over and over passes any of them
(tests/test_learning.py tries each on every rubric).

What no rubric sees: whether the answer is right. A fluent, on-topic, wrong explanation passes; the
report says so next to every success rate.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import pyphen

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


# A first-person refusal to do what was asked ("I will not talk about fractions today.").
REFUSAL = re.compile(r"\bI\s*(?:will\s+not|won'?t|can\s*not|can'?t|am\s+not\s+going\s+to|'m\s+not\s+going\s+to|"
                     r"refuse\s+to|do\s+not\s+want\s+to|don'?t\s+want\s+to|am\s+unable\s+to|'m\s+unable\s+to)\s+"
                     r"(?:talk|discuss|help|answer|explain|tell|say|go\s+into|get\s+into|do)\b", re.I)
MIN_NEW_STEMS = 6  # content words of its own, beyond the learner's: a template echoing the question has few


def substantive(dialogue: list[Message], answer: str) -> bool:
    """What every rubric asks first: an answer of its own, not a template. At least two different
    sentences (a one-liner or a sentence said twice is not an explanation), two of them sharing a
    content word with the learner's turns (a topic word dropped into generic encouragement is not enough),
    MIN_NEW_STEMS content words the learner did not use, and no refusal."""
    return why_not_substantive(dialogue, answer) is None


def why_not_substantive(dialogue: list[Message], answer: str) -> str | None:
    """The first check of `substantive` the answer fails, in words; None when it has substance."""
    parts = [s for s in sentences(answer) if WORD.search(s)]
    said = [" ".join(w.lower() for w in WORD.findall(s)) for s in parts]
    if len(parts) < 2:
        return "fewer than 2 sentences"
    if len(set(said)) < len(said):
        return "a repeated sentence"
    if REFUSAL.search(answer):
        return "a refusal"
    topic = topic_stems(dialogue)
    if sum(bool(content_stems(s) & topic) for s in parts) < 2:
        return "fewer than 2 sentences on the learner's topic"
    if len(content_stems(answer) - topic) < MIN_NEW_STEMS:
        return f"fewer than {MIN_NEW_STEMS} content words of its own"
    return None


def checks_understanding(dialogue: list[Message], answer: str) -> float:
    """The tutor explains, then checks understanding with a question about the learner's topic.

    1.0: at least 12 words of explanation and a question sharing a topic word with the dialogue (the
    learner's turns or the explanation just given) that is not an echo of the learner's own question; 0.3: a question off the topic
    ("Any questions?") after an explanation; 0.0: no question or no explanation.
    """
    if not substantive(dialogue, answer):
        return 0.0
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
# "such as" mostly lists kinds ("operations such as addition or subtraction"), which works no case
# through; it introduces an example only with a number in it ("fractions such as 3/4").
LISTING = re.compile(r"\bsuch as\b", re.I)


def has_number(sentence: str) -> bool:
    return bool(re.search(r"\d", sentence))


def has_detail(sentence: str) -> bool:
    """The stuff a concrete example is made of: at least six words, and a number with two content
    words or four content words ("For example, 1 fraction." has neither); a "such as" list only with
    a number."""
    stems = len(content_stems(sentence))
    if word_count(sentence) < 6:
        return False
    if has_number(sentence):
        return stems >= 2
    return stems >= 4 and not (LISTING.search(sentence) and not EXAMPLE_MARKER.search(LISTING.sub("", sentence)))


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
    if not marked or not substantive(dialogue, answer):
        return 0.0
    return 1.0 if any(has_detail(s) for s in marked) else 0.3


SHORT_WORDS = 80


def stays_short(dialogue: list[Message], answer: str) -> float:
    """The tutor answers in a few finished sentences (at most 80 words) that stay on the topic.

    1.0 when all three hold; otherwise partial credit that falls with length (shorter is better),
    and 0.0 for an answer without substance (`substantive`): shortness is not bought with a one-liner.
    """
    words = word_count(answer)
    if not substantive(dialogue, answer):
        return 0.0
    if words <= SHORT_WORDS and ends_cleanly(answer):
        return 1.0
    return 0.45 * max(0.0, 1 - max(0, words - SHORT_WORDS) / 150)


PLAIN_EASE = 70.0  # Flesch reading ease: 70 and above reads as "fairly easy" (about age 12-13)
_HYPHENATOR = pyphen.Pyphen(lang="en_US")


def reading_ease(text: str) -> float:
    """Flesch reading ease, 206.835 - 1.015 words/sentence - 84.6 syllables/word; syllables counted as
    pyphen's hyphenation points + 1 (a dictionary shipped in the package: nothing is fetched)."""
    words = WORD.findall(text)
    parts = [s for s in sentences(text) if WORD.search(s)]
    if not words or not parts:
        return 0.0
    syllables = sum(len(_HYPHENATOR.positions(w.lower())) + 1 for w in words)
    return 206.835 - 1.015 * len(words) / len(parts) - 84.6 * syllables / len(words)


def plain_words(dialogue: list[Message], answer: str) -> float:
    """The tutor explains in words a child reads easily: short sentences of short words.

    A taste about the language's level, where `stays_short` is about length and `uses_example` about
    content. 1.0: reading ease at least PLAIN_EASE in an answer of substance; below it, credit that
    rises with the ease (so learners can rank two hard answers); 0.0 without substance.
    """
    if not substantive(dialogue, answer):
        return 0.0
    ease = reading_ease(answer)
    return 1.0 if ease >= PLAIN_EASE else 0.45 * min(1.0, max(0.0, (ease - 30.0) / (PLAIN_EASE - 30.0)))


def rewrite_plainer(dialogue: list[Message], answer: str, keywords: list[str], rng: random.Random) -> str | None:
    """The tutor's answer without its hard sentences: the whole sentences that read easily on their own,
    in the answer's order (at most four); None when none does."""
    topic, body = _topic_and_body(dialogue, answer, keywords)
    if not topic or not body:
        return None
    easy = [s.strip() for s in body if reading_ease(s) >= PLAIN_EASE][:4]
    if not easy:
        return None
    text = " ".join(s if s[-1] in ".!" else s + "." for s in easy)
    return text if substantive(dialogue, text) else f"This is about {topic}. " + text


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
    "plain_words": Rubric("plain_words", plain_words, rewrite_plainer),
    "random": Rubric("random", random_taste()),
}
# The tastes the learning targets are reported on: base rates of 10-40% on the embedded model, each of
# another kind (length, content, language level). checks_understanding is too rare (about 1%).
SHIPPED = ("stays_short", "uses_example", "plain_words")
