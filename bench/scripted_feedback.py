"""Gives feedback to a running app through its public API, as learners would, with a known taste.

    python bench/scripted_feedback.py --url http://127.0.0.1:7860 --items 100 --rubric asks_question

Each item opens a conversation on a tutoring prompt, asks for k answers with /compare, and picks by
the rubric (with a configurable error rate); a share of answers is also rated or rewritten.
`--rubric random` picks at random: feedback with no consistent preference, which a training cycle
must honestly reject.
"""
from __future__ import annotations

import argparse
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

TOPICS = [
    "fractions", "photosynthesis", "nouns and verbs", "the phases of the moon", "solving 2x + 3 = 11",
    "variables in programming", "the French Revolution", "studying for a maths test", "the area of a rectangle",
    "weather and climate", "prime numbers", "why the sky is blue", "for loops", "magnets", "percentages",
    "adjectives", "Julius Caesar", "writing a good paragraph", "gravity", "verb tenses", "how the heart works",
    "the Pythagorean theorem", "lists in Python", "the seasons", "dividing fractions", "atoms", "the Silk Road",
    "remembering vocabulary", "ratios", "how rain forms", "negative numbers", "the water cycle", "past tense verbs",
    "the Roman Empire", "electric circuits", "long division", "food chains", "if statements", "volcanoes",
    "the solar system",
]
TEMPLATES = ["Can you explain {}?", "I don't understand {}. Can you help me?", "What should I know about {}?"]
PROMPTS = [t.format(topic) for topic in TOPICS for t in TEMPLATES]


def asks_question(answer: str) -> float:
    """A tutor checks understanding: the answer asks the learner a question."""
    return 1.0 if re.search(r"\?\s*$|\?\s+\S", answer.strip()) else 0.0


EXAMPLE_MARKERS = re.compile(r"\b(for example|for instance|e\.g\.|imagine|let's say|suppose|such as|like when)\b", re.I)


def uses_example(answer: str) -> float:
    """A tutor makes ideas concrete: the answer uses an example (more markers, a little better)."""
    return min(len(EXAMPLE_MARKERS.findall(answer)), 3) / 3


def random_taste(answer: str) -> float:
    return random.random()


RUBRICS = {"asks_question": asks_question, "uses_example": uses_example, "random": random_taste}


def give_feedback(client, prompt: str, rubric, k: int, error_rate: float, rng: random.Random, counts: dict,
                  lock: threading.Lock) -> None:
    conversation = client.predict("scripted-learner", "chat", api_name="/new_conversation")["conversation_id"]
    result = client.predict(conversation, prompt, k, api_name="/compare")
    candidates = result["candidates"]
    scores = [rubric(c["text"]) for c in candidates]
    labels = "ABCD"[: len(candidates)]
    if len(set(scores)) == 1:
        choice = "tie"
    else:
        order = sorted(range(len(candidates)), key=lambda i: -scores[i])
        if rng.random() < error_rate:  # a learner's mistake: the order reversed
            order.reverse()
        choice = ",".join(labels[i] for i in order) if len(candidates) > 2 else labels[order[0]]
    client.predict(result["comparison_id"], choice, api_name="/pick")
    winner = candidates[0] if choice == "tie" else candidates[labels.index(choice[0])]
    if rng.random() < 0.3:
        rating = "up" if rubric(winner["text"]) >= 0.5 else "down"
        client.predict(winner["message_id"], rating, "", api_name="/rate")
    with lock:
        counts["items"] += 1
        counts["ties"] += choice == "tie"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860/")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rubric", choices=sorted(RUBRICS), default="uses_example")
    ap.add_argument("--error-rate", type=float, default=0.2)
    ap.add_argument("--learners", type=int, default=4, help="learners at once")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from gradio_client import Client

    rng = random.Random(args.seed)
    counts, lock = {"items": 0, "ties": 0}, threading.Lock()
    clients = [Client(args.url, verbose=False) for _ in range(args.learners)]
    prompts = rng.sample(PROMPTS, k=min(args.items, len(PROMPTS))) + [rng.choice(PROMPTS) for _ in range(args.items - len(PROMPTS))]
    with ThreadPoolExecutor(args.learners) as pool:
        jobs = [pool.submit(give_feedback, clients[i % args.learners], p, RUBRICS[args.rubric], args.k, args.error_rate,
                            random.Random(args.seed + i), counts, lock) for i, p in enumerate(prompts)]
        for n, job in enumerate(jobs, 1):
            job.result()
            if n % 10 == 0:
                print(f"{n}/{args.items} feedback items given ({counts['ties']} ties)", flush=True)
    print(f"done: {counts['items']} comparisons decided, {counts['ties']} ties")


if __name__ == "__main__":
    main()
