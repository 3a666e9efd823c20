"""A simulated learner: uses the running app only through its public API, as a person would.

    python bench/learner.py --url http://127.0.0.1:7860/ --items 150 --rubric uses_example

For each tutoring opener of the prompt set's training part it opens a conversation, asks for k answers
(/compare), ranks them by its rubric (each comparison it makes going the wrong way at `error_rate`), sometimes rates
the winner with a reason, sometimes rewrites a winner that fails the rubric, and sometimes follows up and
rates the follow-up answer. A feedback item is one /pick, /rate or /rewrite call; the learner stops once
the budget is spent. Evaluation conversations (`evaluate`) are opened with purpose "eval" and never become
training data.
"""
from __future__ import annotations

import argparse
import json
import queue
import random
import sys
import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.store import LABELS  # noqa: E402  (display labels of compared answers, A to D)
from bench.rubrics import RUBRICS, Rubric  # noqa: E402

PROMPT_SET = Path(__file__).resolve().parents[1] / "rlhf" / "assets" / "tutoring_prompts.jsonl"


@dataclass(frozen=True)
class TutoringPrompt:
    id: str
    subject: str
    level: str
    opener: str
    follow_up: str | None
    keywords: tuple[str, ...]
    split: str  # train | heldout


def load_prompt_set(path: Path = PROMPT_SET, split: str | None = None) -> list[TutoringPrompt]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = [TutoringPrompt(r["id"], r["subject"], r["level"], r["opener"], r.get("follow_up"),
                              tuple(r["keywords"]), r["split"]) for r in rows]
    return [p for p in prompts if split is None or p.split == split]


@dataclass
class LearnerConfig:
    k: int = 4  # answers per comparison
    error_rate: float = 0.2  # share of comparisons (and ratings) made the wrong way round
    rate_share: float = 0.3  # share of picked winners also rated, with a reason
    rewrite_share: float = 0.1  # share of failing winners rewritten
    follow_up_share: float = 0.3  # share of prompts with a follow-up where the learner asks it (and rates it)


@dataclass
class FeedbackCounts:
    picks: int = 0
    ties: int = 0
    ratings: int = 0
    rewrites: int = 0
    follow_ups: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def items(self) -> int:
        return self.picks + self.ratings + self.rewrites

    def as_dict(self) -> dict[str, int]:
        return {"items": self.items, "picks": self.picks, "ties": self.ties, "ratings": self.ratings,
                "rewrites": self.rewrites, "follow_ups": self.follow_ups}

    def add(self, other: Counter) -> None:
        with self.lock:
            for key, value in other.items():
                setattr(self, key, getattr(self, key) + value)


class Budget:
    """Feedback items left to give, shared by learners at once: an item is taken before its call, so
    the learners together never give more than the budget."""

    def __init__(self, items: int):
        self.left = items
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True


def perceived_order(scores: list[float], error_rate: float, rng: random.Random) -> list[int]:
    """The learner's order, best first, built by insertion, one comparison of two answers at a time.

    Each comparison goes the wrong way with probability `error_rate`, and equal scores are a coin
    flip, as a person's would be. Mistakes are per decision, as labelers' disagreements are (InstructGPT's
    73% agreement is pairwise); at 0.2 about 22% of the ranking's pairs end up reversed.
    """
    order: list[int] = []
    for i in sorted(range(len(scores)), key=lambda _: rng.random()):  # answers seen in a random order
        place = len(order)
        for position, j in enumerate(order):
            better = scores[i] > scores[j] if scores[i] != scores[j] else rng.random() < 0.5
            if rng.random() < error_rate:
                better = not better
            if better:
                place = position
                break
        order.insert(place, i)
    return order


def decide(scores: list[float], error_rate: float, rng: random.Random) -> str:
    """The learner's choice for /pick: 'tie', the winner's label, or a full order best first in which
    equally good answers share a place ("C,A=B,D").

    All answers equally good: a tie. When the answers other than the (perceived) winner are all equally
    good, only the winner is named (it beats each of them). A person who finds two answers equally good
    says so instead of ordering them by a coin flip, which would be a pair of pure noise.
    """
    values = sorted(set(scores))
    if len(values) == 1:
        return "tie"
    # The learner orders what they can tell apart (each comparison of two different answers wrong at
    # error_rate); answers they find equally good take one place together.
    places = [[i for i in range(len(scores)) if scores[i] == values[v]]
              for v in perceived_order(values, error_rate, rng)]
    for place in places:
        rng.shuffle(place)  # named in the order the learner happens to see them
    if len(scores) == 2 or (len(places) == 2 and len(places[0]) == 1):
        return LABELS[places[0][0]]
    return ",".join("=".join(LABELS[i] for i in place) for place in places)


class SimulatedLearner:
    def __init__(self, client, rubric: Rubric, config: LearnerConfig, rng: random.Random, name: str = "learner"):
        self.client, self.rubric, self.config, self.rng, self.name = client, rubric, config, rng, name

    def _call(self, api_name: str, *args):
        return self.client.predict(*args, api_name=api_name)

    def give_feedback(self, prompt: TutoringPrompt, budget: Budget | None = None) -> Counter:
        """One opener: compare and pick, maybe rate or rewrite, maybe follow up and rate; each feedback
        item only while the budget lasts."""
        budget = budget or Budget(3)
        counts: Counter = Counter()
        if not budget.take():
            return counts
        conversation = self._call("/new_conversation", self.name, "chat")["conversation_id"]
        dialogue = [{"role": "user", "content": prompt.opener}]
        result = self._call("/compare", conversation, prompt.opener, self.config.k)
        candidates = result["candidates"]
        scores = [self.rubric.score(dialogue, c["text"]) for c in candidates]
        choice = decide(scores, self.config.error_rate, self.rng)
        self._call("/pick", result["comparison_id"], choice)
        counts.update(picks=1, ties=choice == "tie")
        winner = candidates[0] if choice == "tie" else candidates[LABELS.index(choice[0])]
        counts += self._rate_or_rewrite(dialogue, winner, prompt, budget)
        if prompt.follow_up and self.rng.random() < self.config.follow_up_share and budget.take():
            dialogue += [{"role": "assistant", "content": winner["text"]}, {"role": "user", "content": prompt.follow_up}]
            reply = self._call("/chat", conversation, prompt.follow_up)
            counts.update(follow_ups=1)
            counts += self._rate(dialogue, reply)
        return counts

    def _rate_or_rewrite(self, dialogue, answer: dict, prompt: TutoringPrompt, budget: Budget) -> Counter:
        wants_rewrite = (self.rubric.rewrite and not self.rubric.success(dialogue, answer["text"])
                         and self.rng.random() < self.config.rewrite_share)
        better = self.rubric.rewrite(dialogue, answer["text"], list(prompt.keywords), self.rng) if wants_rewrite else None
        wants_rate = not better and self.rng.random() < self.config.rate_share
        if (better or wants_rate) and not budget.take():
            return Counter()
        if better:
            self._call("/rewrite", answer["message_id"], better)
            return Counter(rewrites=1)
        return self._rate(dialogue, answer) if wants_rate else Counter()

    def _rate(self, dialogue, answer: dict) -> Counter:
        good = self.rubric.success(dialogue, answer["text"])
        if self.rng.random() < self.config.error_rate:
            good = not good
        reason = self.rng.choice(["clear", "good example"] if good else ["unclear", "too long", "other"])
        self._call("/rate", answer["message_id"], "up" if good else "down", reason)
        return Counter(ratings=1)

    def ask(self, prompt: TutoringPrompt) -> dict:
        """One evaluation sample: a fresh `eval` conversation, the opener, the streamed answer to the end."""
        conversation = self._call("/new_conversation", self.name, "eval")["conversation_id"]
        reply = self._call("/chat", conversation, prompt.opener)
        return {"prompt_id": prompt.id, "dialogue": [{"role": "user", "content": prompt.opener}],
                "answer": reply["text"], "model_version": reply["model_version"]}


def _clients(url: str, n: int) -> list:
    from gradio_client import Client

    return [Client(url, verbose=False) for _ in range(n)]


def give_feedback(url: str, prompts: list[TutoringPrompt], rubric: Rubric, items: int, config: LearnerConfig,
                  learners: int = 4, seed: int = 0, say=print) -> FeedbackCounts:
    """Learners at once give `items` feedback items (each stops when the budget is spent)."""
    counts = FeedbackCounts()
    budget = Budget(items)
    rng = random.Random(seed)
    queue = iter(rng.sample(prompts, len(prompts)) * (items // max(1, len(prompts)) + 1))
    queue_lock = threading.Lock()
    clients = _clients(url, learners)

    def work(index: int) -> None:
        learner = SimulatedLearner(clients[index], rubric, config, random.Random(seed * 1000 + index),
                                   f"learner-{index}")
        while True:
            if budget.left <= 0:
                return
            with queue_lock:
                prompt = next(queue)
            counts.add(learner.give_feedback(prompt, budget))
            if counts.picks % 10 == 0:
                say(f"   {counts.items}/{items} feedback items ({counts.picks} picks, {counts.ties} ties, "
                    f"{counts.ratings} ratings, {counts.rewrites} rewrites)")

    try:
        with ThreadPoolExecutor(learners) as pool:
            for job in [pool.submit(work, i) for i in range(learners)]:
                job.result()
    finally:
        for client in clients:
            client.close()
    return counts


def collect_answers(url: str, prompts: Iterable[TutoringPrompt], rubric: Rubric, clients: int = 16, seed: int = 0) -> list[dict]:
    """Evaluation samples through the API, in the prompts' order; each carries its rubric score. With
    as many clients at once as the engine batches rows (16), a measurement takes a third of the time
    it takes with 4."""
    prompts = list(prompts)
    idle: queue.Queue = queue.Queue()
    connections = _clients(url, clients)
    for c in connections:
        idle.put(SimulatedLearner(c, rubric, LearnerConfig(), random.Random(seed), "eval-learner"))

    def ask(prompt: TutoringPrompt) -> dict:
        learner = idle.get()  # one client per thread at a time
        try:
            return learner.ask(prompt)
        finally:
            idle.put(learner)

    try:
        with ThreadPoolExecutor(clients) as pool:
            samples = list(pool.map(ask, prompts))
    finally:
        for client in connections:
            client.close()
    for sample in samples:
        sample["score"] = rubric.score(sample["dialogue"], sample["answer"])
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860/")
    ap.add_argument("--items", type=int, default=100, help="feedback items to give (picks + ratings + rewrites)")
    ap.add_argument("--rubric", choices=sorted(RUBRICS), default="uses_example")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--error-rate", type=float, default=0.2)
    ap.add_argument("--learners", type=int, default=4, help="learners at once")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = LearnerConfig(k=args.k, error_rate=args.error_rate)
    counts = give_feedback(args.url, load_prompt_set(split="train"), RUBRICS[args.rubric], args.items, config,
                           args.learners, args.seed)
    print(f"done: {counts.items} feedback items: {counts.picks} picks ({counts.ties} ties), {counts.ratings} ratings, "
          f"{counts.rewrites} rewrites, {counts.follow_ups} follow-ups")


if __name__ == "__main__":
    main()
