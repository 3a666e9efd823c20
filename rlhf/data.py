"""Feedback -> training data: SFT demonstrations, preference groups and PPO prompts.

The rules (CONTRACT.md, "Feedback -> training data"):
- A ranking of K candidates gives its C(K, 2) pairs as one PreferenceGroup: each completion is
  stored once, the group goes to one side of the split and counts as one example (InstructGPT).
  A ranking that names only the winner (k > 2) gives winner > each other candidate. Answers a ranking
  puts in one place ("C,A=B,D": the learner finds A and B equally good) make no pair with each other.
- `tie` gives nothing; `both_bad` gives nothing by itself, but a rewrite of any candidate of that
  comparison then beats every candidate.
- Among answers to the same exact context, each up-rated one beats each down-rated one (only the
  latest vote of a message counts); they form one group per context and user, so that no user's
  votes are paired with another's (rlhf/annotators.py weighs each user's items by that user).
- A rewrite (the latest per message) beats the answer it rewrites.
- Demonstrations: rewrites and up-rated answers, with the exact context the answer was generated
  from as the prompt (system prompt included), so the loss falls on the demonstrated answer only.
- PPO prompts: system prompt + main line up to and including each user turn, rewrites in place.
- `eval` conversations never appear (the Store's training_* queries leave them out), nor do those of
  a user who declined consent, nor flagged messages as answers (moderation stopped them).
- Personal details (emails, phone numbers, addresses, given names) are redacted in every text.

Every item keeps the feedback rows it came from, so a model's lineage can name them, and the account
that owns its conversation (`user`, "" on a server without accounts). The store is
only read here, through its public query methods.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from app.store import Store, rank_tiers
from core.privacy import redact

Message = dict[str, str]
FeedbackRef = tuple[str, int]  # ("rating" | "pick" | "rewrite", row id)
FEEDBACK_KINDS = {"rating": "ratings", "pick": "picks", "rewrite": "rewrites"}


class NotEnoughData(Exception):
    """Too little feedback for a training cycle; the message is one line with the numbers."""


@dataclass
class Demonstration:
    prompt: list[Message]
    completion: list[Message]  # [{"role": "assistant", "content": text}]
    conversation_id: str
    source: str  # 'rewrite' | 'upvote'
    message_id: str
    feedback: tuple[FeedbackRef, ...] = ()
    user: str = ""  # the account that owns the conversation


@dataclass
class PreferenceGroup:
    """All pairs that one piece of feedback gives for one prompt, kept together."""
    prompt: list[Message]
    completions: list[str]  # each distinct text once
    pairs: list[tuple[int, int]]  # (chosen index, rejected index) into completions
    conversation_id: str
    source: str  # 'ranking' | 'rating' | 'rewrite'
    weight: float = 1.0  # of the whole group: a trainer spreads it over the group's pairs
    group_id: str = ""
    feedback: tuple[FeedbackRef, ...] = ()
    user: str = ""  # the account that owns the conversation(s): one user per group


@dataclass
class PpoPrompt:
    prompt: list[Message]
    conversation_id: str
    user: str = ""


@dataclass
class TrainingData:
    demonstrations: list[Demonstration] = field(default_factory=list)
    preference_groups: list[PreferenceGroup] = field(default_factory=list)
    ppo_prompts: list[PpoPrompt] = field(default_factory=list)

    @property
    def n_pairs(self) -> int:
        return sum(len(g.pairs) for g in self.preference_groups)

    def counts(self) -> dict[str, int]:
        return {"demonstrations": len(self.demonstrations),
                "preference_groups": len(self.preference_groups),
                "preference_pairs": self.n_pairs, "ppo_prompts": len(self.ppo_prompts)}

    def lineage(self) -> dict[str, list[int]]:
        """Row ids of the feedback these items came from: {"ratings", "picks", "rewrites"}."""
        ids: dict[str, set[int]] = {name: set() for name in FEEDBACK_KINDS.values()}
        for item in [*self.demonstrations, *self.preference_groups]:
            for kind, row_id in item.feedback:
                ids[FEEDBACK_KINDS[kind]].add(row_id)
        return {name: sorted(row_ids) for name, row_ids in ids.items()}


# -- collecting --------------------------------------------------------------------------------


def _prompt_key(prompt: list[Message]) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def _group(prompt: list[Message], text_pairs: Iterable[tuple[str, str]], conversation_id: str,
           source: str, group_id: str, feedback: Iterable[FeedbackRef],
           user: str = "") -> PreferenceGroup | None:
    """A group with each distinct text once; None when no pair says anything."""
    ordered = list(dict.fromkeys(text_pairs))
    # Equal texts teach nothing, and two candidates with the same text can put it on both sides.
    useful = [(c, r) for c, r in ordered if c != r and (r, c) not in ordered]
    if not useful:
        return None
    completions = list(dict.fromkeys(text for pair in useful for text in pair))
    index = {text: i for i, text in enumerate(completions)}
    return PreferenceGroup(prompt=prompt, completions=completions,
                           pairs=[(index[c], index[r]) for c, r in useful],
                           conversation_id=conversation_id, source=source, group_id=group_id,
                           feedback=tuple(dict.fromkeys(feedback)), user=user)


def _ranking_pairs(tiers: list[list[str]], all_ids: list[str]) -> list[tuple[str, str]]:
    """Ids in each place (best first) beat the ids of every later place; ids that share a place make no
    pair; unranked ids lose to every ranked one."""
    ranked = {m for tier in tiers for m in tier}
    rest = [m for m in all_ids if m not in ranked]
    return [(better, worse) for i, tier in enumerate(tiers) for better in tier
            for worse in [m for later in tiers[i + 1:] for m in later] + rest]


class _Histories:
    """Main lines of the chat conversations, for PPO prompts and contexts that were not stored."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.system: dict[str, str] = {}
        self.user: dict[str, str] = {}
        self.lines: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            self.system[row["conversation_id"]] = row["system_prompt"]
            self.user[row["conversation_id"]] = row.get("user", "")
            self.lines.setdefault(row["conversation_id"], []).append(row)

    def before(self, conversation_id: str, position: int) -> list[Message]:
        # Only for messages stored without their context (older rows): the best rebuild there is.
        line = [m for m in self.lines.get(conversation_id, []) if m["position"] < position]
        return [{"role": "system", "content": self.system.get(conversation_id, "")},
                *({"role": m["role"], "content": m["content"]} for m in line)]

    def ppo_prompts(self) -> list[PpoPrompt]:
        prompts = []
        for conversation_id, line in self.lines.items():
            messages = [{"role": "system", "content": self.system[conversation_id]}]
            for m in line:
                messages.append({"role": m["role"], "content": m["content"]})
                if m["role"] == "user":
                    prompts.append(PpoPrompt(list(messages), conversation_id,
                                             self.user[conversation_id]))
        return prompts


def collect(store: Store) -> TrainingData:
    """Everything the chat conversations' feedback gives, following the rules above."""
    histories = _Histories(store.training_histories())
    comparisons = store.training_comparisons()
    both_bad = {c["comparison_id"]: c for c in comparisons if c["choice"] == "both_bad"}

    def context(row: dict[str, Any]) -> list[Message]:
        return row["context"] or histories.before(row["conversation_id"], row["position"])

    groups: list[PreferenceGroup | None] = []
    for c in comparisons:
        if not c["ranking"]:  # tie or both_bad
            continue
        text = {m["message_id"]: m["content"] for m in c["candidates"]}
        pairs = _ranking_pairs(rank_tiers(c["choice"], c["ranking"]), [m["message_id"] for m in c["candidates"]])
        groups.append(_group(c["context"], [(text[a], text[b]) for a, b in pairs],
                             c["conversation_id"], "ranking", f"ranking:{c['comparison_id']}",
                             [("pick", c["pick_id"])], c.get("user", "")))

    demonstrations: list[Demonstration] = []
    for w in store.training_rewrites():
        prompt, feedback = context(w), [("rewrite", w["rewrite_id"])]
        demonstrations.append(Demonstration(prompt, _assistant(w["text"]), w["conversation_id"],
                                            "rewrite", w["message_id"], tuple(feedback),
                                            w.get("user", "")))
        losers = [w["content"]]
        if w["comparison_id"] in both_bad:
            bad = both_bad[w["comparison_id"]]
            losers = [m["content"] for m in bad["candidates"]]
            feedback.append(("pick", bad["pick_id"]))
        groups.append(_group(prompt, [(w["text"], loser) for loser in losers],
                             w["conversation_id"], "rewrite", f"rewrite:{w['rewrite_id']}",
                             feedback, w.get("user", "")))

    # One group per (user, context): pairing one user's up-vote with another's down-vote would make
    # a pair that neither of them decided, and that no user's weight could be applied to.
    by_context: dict[tuple[str, str], list[tuple[dict[str, Any], list[Message]]]] = {}
    for r in store.training_ratings():
        prompt, user = context(r), r.get("user", "")
        if r["rating"] == "up":
            demonstrations.append(Demonstration(prompt, _assistant(r["content"]),
                                                r["conversation_id"], "upvote", r["message_id"],
                                                (("rating", r["rating_id"]),), user))
        by_context.setdefault((user, _prompt_key(prompt)), []).append((r, prompt))
    for (user, key), rated in by_context.items():
        ups = [r for r, _ in rated if r["rating"] == "up"]
        downs = [r for r, _ in rated if r["rating"] == "down"]
        if ups and downs:
            # Answers to one context may come from several conversations (the same opening
            # question); the smallest id keeps the group's side of the split stable.
            groups.append(_group(
                rated[0][1], [(u["content"], d["content"]) for u in ups for d in downs],
                min(r["conversation_id"] for r in ups + downs), "rating",
                # user "" (no accounts) keeps the ids that groups had before there were users
                "rating:" + hashlib.sha256((f"{user}\n{key}" if user else key).encode()).hexdigest()[:16],
                [("rating", r["rating_id"]) for r in ups + downs], user))

    seen: set[tuple[str, str]] = set()
    unique_demonstrations = []
    for d in demonstrations:  # an up-rated answer rewritten to the same text is one example
        key = (_prompt_key(d.prompt), d.completion[0]["content"])
        if key not in seen:
            seen.add(key)
            unique_demonstrations.append(d)
    return _redacted(TrainingData(demonstrations=unique_demonstrations,
                                  preference_groups=[g for g in groups if g is not None],
                                  ppo_prompts=histories.ppo_prompts()))


def _redacted(data: TrainingData) -> TrainingData:
    """Personal details replaced by placeholders (core/privacy.py) in every text that can be trained on."""
    seen: dict[str, str] = {}

    def text(t: str) -> str:  # histories repeat in every later prompt: each text is redacted once
        if t not in seen:
            seen[t] = redact(t)
        return seen[t]

    def messages(ms: list[Message]) -> list[Message]:
        return [{**m, "content": text(m["content"])} for m in ms]

    return TrainingData(
        demonstrations=[replace(d, prompt=messages(d.prompt), completion=messages(d.completion))
                        for d in data.demonstrations],
        preference_groups=[replace(g, prompt=messages(g.prompt), completions=[text(c) for c in g.completions])
                           for g in data.preference_groups],
        ppo_prompts=[replace(p, prompt=messages(p.prompt)) for p in data.ppo_prompts])


# -- held-out split ----------------------------------------------------------------------------


class _HasConversation(Protocol):
    conversation_id: str


T = TypeVar("T", bound=_HasConversation)


def is_heldout(conversation_id: str, heldout_fraction: float = 0.1, salt: str = "tutor") -> bool:
    """A fixed coin per conversation: the same answer in every cycle, whatever else is stored."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be between 0 and 1, not {heldout_fraction}")
    digest = hashlib.sha256(f"{salt}{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def split_by_conversation(items: Sequence[T], heldout_fraction: float = 0.1,
                          salt: str = "tutor") -> tuple[list[T], list[T]]:
    """(train, heldout) by conversation id; a group, with all its pairs, stays whole."""
    train: list[T] = []
    heldout: list[T] = []
    for item in items:
        side = heldout if is_heldout(item.conversation_id, heldout_fraction, salt) else train
        side.append(item)
    return train, heldout


def split_data(data: TrainingData, heldout_fraction: float = 0.1,
               salt: str = "tutor") -> tuple[TrainingData, TrainingData]:
    parts = [split_by_conversation(items, heldout_fraction, salt) for items in
             (data.demonstrations, data.preference_groups, data.ppo_prompts)]
    train, heldout = (replace(data, demonstrations=parts[0][side], preference_groups=parts[1][side],
                              ppo_prompts=parts[2][side]) for side in (0, 1))
    return train, heldout


# -- export ------------------------------------------------------------------------------------


def to_trl_records(data: TrainingData) -> dict[str, list[dict[str, Any]]]:
    """TRL's conversational formats; preference records keep group_id and a per-pair weight
    (the group's weight spread over its pairs) so a trainer can regroup and weight them."""
    preference = []
    for i, g in enumerate(data.preference_groups):
        for chosen, rejected in g.pairs:
            preference.append({"prompt": g.prompt, "chosen": _assistant(g.completions[chosen]),
                               "rejected": _assistant(g.completions[rejected]),
                               "group_id": g.group_id or f"group:{i}",
                               "weight": g.weight / len(g.pairs)})
    return {"sft": [{"prompt": d.prompt, "completion": d.completion} for d in data.demonstrations],
            "preference": preference,
            "prompts": [{"prompt": p.prompt} for p in data.ppo_prompts]}


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)  # a reader never sees half a file


def export_jsonl(data: TrainingData, out_dir: str | Path, heldout_fraction: float = 0.1,
                 salt: str = "tutor") -> dict[str, Path]:
    """sft / preference / prompts .jsonl and their *_heldout twins, plus manifest.json (counts
    and the feedback row ids of each side). A side with no records gets an empty file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = split_data(data, heldout_fraction, salt)
    paths: dict[str, Path] = {}
    for suffix, part in (("", train), ("_heldout", heldout)):
        for name, records in to_trl_records(part).items():
            paths[name + suffix] = out / f"{name}{suffix}.jsonl"
            _write_jsonl(paths[name + suffix], records)
    paths["manifest"] = out / "manifest.json"
    paths["manifest"].write_text(json.dumps({
        "heldout_fraction": heldout_fraction, "salt": salt,
        "train": {"counts": train.counts(), "lineage": train.lineage()},
        "heldout": {"counts": heldout.counts(), "lineage": heldout.lineage()},
    }, indent=2) + "\n", encoding="utf-8")
    return paths


def check_enough(data: TrainingData, min_pairs: int = 20, min_prompts: int = 8) -> None:
    problems = []
    if data.n_pairs < min_pairs:
        problems.append(f"need at least {min_pairs} preference pairs, have {data.n_pairs}")
    if len(data.ppo_prompts) < min_prompts:
        problems.append(f"need at least {min_prompts} PPO prompts, have {len(data.ppo_prompts)}")
    if problems:
        raise NotEnoughData("; ".join(problems))


# The shipped tutoring prompts (rlhf/assets/tutoring_prompts.jsonl): learners of the learning benchmark
# ask the "train" part; the "heldout" part is never trained on by any benchmark and is where settings are
# chosen; the "test" part is for final reported benchmark runs only, so nothing here reads it.
TUTORING_PROMPTS = Path(__file__).parent / "assets" / "tutoring_prompts.jsonl"


def shipped_heldout_prompts(system_prompt: str, path: Path = TUTORING_PROMPTS) -> list[list[Message]]:
    """The shipped held-out openers as one-turn prompts, in a fixed order (so cycles are judged alike)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = sorted((r for r in rows if r["split"] == "heldout"), key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
    return [[{"role": "system", "content": system_prompt}, {"role": "user", "content": r["opener"]}] for r in rows]


def gate_prompts(train: TrainingData, heldout: TrainingData, shipped: list[list[Message]],
                 limit: int) -> tuple[list[list[Message]], int]:
    """The prompts the gate judges on, and how many of them are the class's own: the held-out conversations'
    prompts that no training prompt shares (each once), then shipped held-out prompts whose question no
    training conversation asked, up to `limit`. A class that repeats its questions has few prompts of its
    own left unseen; the shipped ones still give the gate enough to judge on."""
    trained = {_prompt_key(p.prompt) for p in train.ppo_prompts}
    asked = {m["content"].strip().lower() for p in train.ppo_prompts for m in p.prompt if m["role"] == "user"}
    chosen: dict[str, list[Message]] = {}
    for prompt in (p.prompt for p in heldout.ppo_prompts):
        if _prompt_key(prompt) not in trained:
            chosen.setdefault(_prompt_key(prompt), prompt)
    own = min(len(chosen), limit)
    for prompt in shipped:
        if len(chosen) >= limit:
            break
        if prompt[-1]["content"].strip().lower() not in asked:
            chosen.setdefault(_prompt_key(prompt), prompt)
    return list(chosen.values())[:limit], own
