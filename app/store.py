"""The SQLite store: schema, migrations and every query of the tutoring chat.

Data model:
- A conversation is a list of messages. `position` is the turn index and `active` marks the main
  line that later turns see; `history()` returns that line.
- A comparison shows k (2..4) candidate replies to one user turn. They share one position and stay
  inactive until the pick marks the winner active, so the conversation goes on from the winner.
- Feedback is append-only: ratings (the latest vote counts), comparison picks (a ranking of message
  ids, best first) and rewrites (the latest one replaces its assistant turn in `history()`).
- Each generated message keeps the exact context the model saw, so training never has to rebuild a
  prompt from a history that may have been rewritten since.
- model_versions and training_cycles record what the trainer produced and what became of it: the
  training history, which `forget_training_history()` clears without touching the feedback.
- An arena comparison (`arena = 1`) pairs answers of two policy versions, blind; its picks are the
  votes that rate versions. A canary is a version that passed the offline gate and serves a share of
  learners until arena votes promote or withdraw it; `canaries` records each one and how it ended.

No other module writes SQL. Ids that the UI passes around are uuid hex strings; feedback rows use
integer ids. Timestamps are ISO-8601 UTC strings; JSON columns are TEXT, decoded on read.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable
from contextlib import closing
from datetime import datetime, timezone
from functools import wraps
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlite_utils import Database, Migrations

MIGRATIONS = Migrations("tutor")
log = logging.getLogger(__name__)

TABLES = (
    "conversations", "messages", "ratings", "comparisons", "comparison_candidates",
    "comparison_picks", "rewrites", "model_versions", "training_cycles",
    "accounts", "consents", "exclusions", "repeat_checks", "deletions", "canaries",
)
TRAINING_HISTORY_TABLES = ("model_versions", "training_cycles", "canaries")
JSON_COLUMNS = ("generation", "context", "ranking", "metrics", "lineage", "feedback", "settings", "verdict")
PURPOSES = ("chat", "eval")
ROLES = ("user", "assistant")
RATINGS = ("up", "down")
MODEL_KINDS = ("policy", "reward")
# "canary": the cycle's version passed the gate and serves a share of learners until votes decide
CYCLE_END_STATUSES = ("promoted", "canary", "rejected", "failed", "interrupted")
CANARY_END_STATUSES = ("promoted", "withdrawn")
LABELS = "ABCD"  # display order of comparison candidates
MIN_CANDIDATES, MAX_CANDIDATES = 2, len(LABELS)
MAX_REASON_CHARS = 500
DEFAULT_DB = Path("conversations.db")  # where the server and the account commands keep everything
ACCOUNT_ROLES = ("learner", "teacher", "admin")
CONSENT_CHOICES = ("given", "declined")
EXCLUSION_KINDS = ("user", "conversation")
# What a user does, for quotas: the table that records it and the timestamp column counted.
ACTIVITY_KINDS = ("conversation", "chat", "compare", "pick", "rate", "rewrite", "recheck")


def _create(
    db: Database, table: str, columns: dict[str, type], pk: str | tuple[str, ...],
    foreign_keys: list[tuple[str, str, str]] | None = None, nullable: tuple[str, ...] = (),
) -> None:
    # NOT NULL unless named: the methods validate, the schema catches what they might miss.
    db.table(table).create(columns, pk=pk, foreign_keys=foreign_keys or [],
                           not_null=set(columns) - set(nullable))


@MIGRATIONS()
def m001_chat(db: Database) -> None:
    _create(db, "conversations", {"id": str, "user": str, "purpose": str, "system_prompt": str,
                                  "created_at": str}, pk="id")
    # comparison_id has no foreign key: comparisons only arrives in m002 and SQLite cannot add a
    # constraint without rebuilding the table; comparison_candidates holds the checked link.
    _create(db, "messages", {
        "id": str, "conversation_id": str, "role": str, "content": str, "position": int,
        "active": int, "model_version": str, "generation": str, "context": str,
        "comparison_id": str, "created_at": str,
    }, pk="id", foreign_keys=[("conversation_id", "conversations", "id")],
        nullable=("model_version", "generation", "context", "comparison_id"))


@MIGRATIONS()
def m002_feedback(db: Database) -> None:
    _create(db, "ratings", {"id": int, "message_id": str, "rating": str, "reason": str,
                            "created_at": str},
            pk="id", foreign_keys=[("message_id", "messages", "id")])
    _create(db, "comparisons", {
        "id": str, "conversation_id": str, "user_message_id": str, "k": int, "context": str,
        "created_at": str, "decided_at": str,
    }, pk="id", foreign_keys=[("conversation_id", "conversations", "id"),
                              ("user_message_id", "messages", "id")], nullable=("decided_at",))
    _create(db, "comparison_candidates", {"comparison_id": str, "message_id": str, "label": str},
            pk=("comparison_id", "label"), foreign_keys=[
                ("comparison_id", "comparisons", "id"), ("message_id", "messages", "id")])
    _create(db, "comparison_picks", {"id": int, "comparison_id": str, "choice": str,
                                     "ranking": str, "created_at": str},
            pk="id", foreign_keys=[("comparison_id", "comparisons", "id")])
    _create(db, "rewrites", {"id": int, "message_id": str, "text": str, "created_at": str},
            pk="id", foreign_keys=[("message_id", "messages", "id")])
    db.table("messages").create_index(["conversation_id", "position"])
    db.table("messages").create_index(["comparison_id"])
    db.table("ratings").create_index(["message_id"])
    db.table("rewrites").create_index(["message_id"])
    db.table("comparisons").create_index(["conversation_id"])
    db.table("comparison_candidates").create_index(["message_id"], unique=True)
    # One pick per comparison, so a double submit from the UI cannot count twice.
    db.table("comparison_picks").create_index(["comparison_id"], unique=True)


@MIGRATIONS()
def m003_training(db: Database) -> None:
    _create(db, "model_versions", {
        "version": str, "kind": str, "parent": str, "path": str, "metrics": str, "lineage": str,
        "created_at": str,
    }, pk="version", foreign_keys=[("parent", "model_versions", "version")], nullable=("parent",))
    _create(db, "training_cycles", {
        "id": int, "started_at": str, "finished_at": str, "status": str, "policy_version": str,
        "reward_version": str, "reason": str, "metrics": str,
    }, pk="id", nullable=("finished_at", "policy_version", "reward_version"))


@MIGRATIONS()
def m004_accounts(db: Database) -> None:
    # Accounts, consent, teachers' exclusions, repeat checks of picks and a record of deletions.
    # `flag` marks a message that moderation stopped: kept for review, never shown to the model
    # again and never training data.
    _create(db, "accounts", {"name": str, "role": str, "password_hash": str, "teacher": str,
                             "disabled": int, "created_at": str}, pk="name",
            foreign_keys=[("teacher", "accounts", "name")], nullable=("teacher",))
    _create(db, "consents", {"user": str, "choice": str, "created_at": str}, pk="user")
    _create(db, "exclusions", {"id": int, "kind": str, "target": str, "reason": str, "by": str,
                               "created_at": str}, pk="id")
    _create(db, "repeat_checks", {"id": int, "comparison_id": str, "user": str, "choice": str,
                                  "agrees": int, "created_at": str}, pk="id",
            foreign_keys=[("comparison_id", "comparisons", "id")])
    _create(db, "deletions", {"id": int, "kind": str, "target": str, "feedback": str,
                              "created_at": str}, pk="id")
    db.table("messages").add_column("flag", str)
    db.table("conversations").create_index(["user"])
    db.table("repeat_checks").create_index(["comparison_id"], unique=True)


@MIGRATIONS()
def m005_abandoned_comparisons(db: Database) -> None:
    # A comparison nobody will pick (its learner left, or skipped it) is abandoned: its user turn
    # leaves the main line, so the conversation goes on as if it had not been asked.
    db.table("comparisons").add_column("abandoned_at", str)


@MIGRATIONS()
def m006_arena(db: Database) -> None:
    db.table("comparisons").add_column("arena", int)
    _create(db, "canaries", {"id": int, "version": str, "baseline": str, "settings": str, "started_at": str,
                             "ended_at": str, "status": str, "reason": str, "verdict": str},
            pk="id", nullable=("ended_at", "reason", "verdict"))


@MIGRATIONS()
def m007_asked(db: Database) -> None:
    # Why a comparison shows the answers it shows (core/active.py): sampled as they came, or chosen where
    # the committee of reward models is least sure; JSON (an arena pair: mode "arena"), None for older comparisons.
    db.table("comparisons").add_column("asked", str)


# A conversation that may train: not an evaluation, and its user has not declined consent.
TRAINABLE = ("c.purpose != 'eval' and c.user not in "
             "(select user from consents where choice = 'declined')")
# Every feedback item given in a chat (not an eval) conversation, as (created_at, kind, user).
CHAT_FEEDBACK = """
    select r.created_at, 'ratings' as kind, c.user from ratings r join messages m on m.id = r.message_id
      join conversations c on c.id = m.conversation_id where c.purpose != 'eval'
    union all
    select p.created_at, 'picks' as kind, c.user from comparison_picks p join comparisons x on x.id = p.comparison_id
      join conversations c on c.id = x.conversation_id where c.purpose != 'eval'
    union all
    select w.created_at, 'rewrites' as kind, c.user from rewrites w join messages m on m.id = w.message_id
      join conversations c on c.id = m.conversation_id where c.purpose != 'eval'"""
NO_FLAGGED_CANDIDATE = ("not exists (select 1 from comparison_candidates f join messages fm "
                        "on fm.id = f.message_id where f.comparison_id = x.id and fm.flag is not null)")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _check(ok: Any, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _dumps(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:  # a bad value, reported before anything is written
        raise ValueError(f"not JSON serialisable: {e}") from e


def _decode(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is not None:
        for column in JSON_COLUMNS:
            if isinstance(row.get(column), str):
                row[column] = json.loads(row[column])
    return row


def _check_context(context: Any) -> None:
    _check(isinstance(context, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in context), "context must be a list of {'role', 'content'} dicts")


def _parse_choice(choice: str, labels: list[str]) -> tuple[str, list[str]]:
    """Normalise a comparison choice; returns (choice as stored, labels ranked best first; `rank_tiers`
    reads the places that equally good answers share back from the stored choice)."""
    _check(isinstance(choice, str), "choice must be a string")
    word = "_".join(choice.lower().split())
    if word in ("tie", "both_bad"):
        return word, []
    parts = "".join(choice.split()).upper().split(",")
    if len(parts) == 1 and parts[0] in labels:
        best = parts[0]
        # With two candidates the best one already fixes the whole order.
        if len(labels) == 2:
            return best, [best] + [label for label in labels if label != best]
        return best, [best]
    # An order of all of them, best first; answers the learner finds equally good share a place ("C,A=B,D"),
    # so they make no pair with each other (a forced order between them would be a coin flip).
    tiers = [part.split("=") for part in parts]
    ranked = [label for tier in tiers for label in tier]
    if sorted(ranked) == sorted(labels):
        if len(tiers) == 1:
            return "tie", []
        if len(labels) == 2:  # "B,A" is "B": one form per pick, as rechecks and arena votes read it
            return ranked[0], ranked
        return ",".join("=".join(tier) for tier in tiers), ranked
    shared = f"{labels[-1]},{'='.join(labels[:-1])}" if len(labels) > 2 else "A=B (a tie)"
    raise ValueError(f"choice {choice!r} must be one of {labels}, 'tie', 'both_bad' or an order "
                     f"of all of them like {','.join(reversed(labels))!r} (equally good ones joined "
                     f"by '=', like {shared!r})")


def rank_tiers(choice: str, ranking: list[str]) -> list[list[str]]:
    """A stored pick's places, best first: each a list of the ranked ids that share it ("C,A=B,D" -> [[C],
    [A, B], [D]]). `ranking` is the flat order stored beside the choice; a winner-only pick is one place."""
    sizes = [part.count("=") + 1 for part in choice.split(",")] if "=" in choice else [1] * len(ranking)
    if sum(sizes) != len(ranking):  # not as decide_comparison stores them: one place per id, nothing lost
        sizes = [1] * len(ranking)
    tiers, start = [], 0
    for size in sizes:
        tiers.append(ranking[start:start + size])
        start += size
    return [tier for tier in tiers if tier]


P = ParamSpec("P")
R = TypeVar("R")


def _locked(method: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[Store, P], R]:
    @wraps(method)
    def wrapper(self: Store, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class Store:
    """All reads and writes of the app's database. Safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = os.fspath(path)
        # Gradio runs handlers on many threads: they share this one connection and the lock
        # serialises them (re-entrant, so public methods may call each other).
        self._lock = threading.RLock()
        self._db = Database(sqlite3.connect(path, check_same_thread=False))
        if path != ":memory:":
            self._db.enable_wal()  # the trainer reads the file while the app writes to it
        self._db.execute("PRAGMA busy_timeout=5000")  # wait for the other process, don't fail
        self._db.execute("PRAGMA foreign_keys=ON")
        # Deleted rows are overwritten with zeros, so a learner's deleted text is not left in free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        MIGRATIONS.apply(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers (callers hold the lock) --

    def _all(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        return [_decode(row) for row in self._db.query(sql, params or [])]  # type: ignore[misc]

    def _one(self, sql: str, params: list[Any] | None = None) -> dict[str, Any] | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _require(self, table: str, key: str, value: Any) -> dict[str, Any]:
        row = self._one(f"select * from [{table}] where [{key}] = ?", [value])
        if row is None:
            noun = table.removesuffix("s").replace("_", " ")
            raise LookupError(f"unknown {noun} {value!r}")
        return row

    def _require_assistant(self, message_id: str) -> None:
        row = self._require("messages", "id", message_id)
        _check(row["role"] == "assistant", "feedback is only for assistant messages")

    def _require_all_decided(self, conversation_id: str) -> None:
        # Until the pick names a winner there is no assistant turn for the next one to follow.
        _check(self.undecided_comparison(conversation_id) is None,
               "conversation has an undecided comparison")

    def _insert(self, table: str, record: dict[str, Any]) -> Any:
        return self._db.table(table).insert(record).last_pk

    def _next_position(self, conversation_id: str) -> int:
        row = self._one("select coalesce(max(position), -1) + 1 as p from messages "
                        "where conversation_id = ?", [conversation_id])
        return int(row["p"]) if row else 0

    def _add_message(
        self, conversation_id: str, role: str, content: str, position: int, active: bool, *,
        model_version: str | None = None, generation: dict[str, Any] | None = None,
        context: list[dict[str, str]] | None = None, comparison_id: str | None = None,
        message_id: str | None = None, flag: str | None = None,
    ) -> str:
        _check(role in ROLES, f"role must be one of {ROLES}")
        _check(isinstance(content, str), "content must be a string")
        _check(role != "user" or content.strip(), "a user message cannot be blank")
        _check(model_version is None or isinstance(model_version, str), "bad model_version")
        _check(generation is None or isinstance(generation, dict), "generation must be a dict")
        if context is not None:
            _check_context(context)
        message_id = message_id or uuid.uuid4().hex
        self._insert("messages", {
            "id": message_id, "conversation_id": conversation_id, "role": role,
            "content": content, "position": position, "active": int(active),
            "model_version": model_version, "generation": _dumps(generation),
            "context": _dumps(context), "comparison_id": comparison_id, "created_at": _now(),
            "flag": flag,
        })
        return message_id

    # -- conversations and messages --

    @_locked
    def new_conversation(self, user: str, purpose: str, system_prompt: str) -> str:
        _check(isinstance(user, str) and isinstance(system_prompt, str),
               "user and system_prompt must be strings")
        _check(purpose in PURPOSES, f"purpose must be one of {PURPOSES}")
        conversation_id = uuid.uuid4().hex
        self._insert("conversations", {
            "id": conversation_id, "user": user, "purpose": purpose,
            "system_prompt": system_prompt, "created_at": _now(),
        })
        return conversation_id

    @_locked
    def conversation(self, conversation_id: str) -> dict[str, Any] | None:
        return self._one("select * from conversations where id = ?", [conversation_id])

    @_locked
    def history(self, conversation_id: str) -> list[dict[str, Any]]:
        """The main line of the conversation, with rewrites in place of what the model said."""
        self._require("conversations", "id", conversation_id)
        return self._all(
            """select m.id as message_id, m.role,
                 coalesce((select r.text from rewrites r where r.message_id = m.id
                           order by r.id desc limit 1), m.content) as content
               from messages m where m.conversation_id = ? and m.active = 1
               order by m.position""", [conversation_id])

    @_locked
    def add_message(
        self, conversation_id: str, role: str, content: str, *, model_version: str | None = None,
        generation: dict[str, Any] | None = None, context: list[dict[str, str]] | None = None,
    ) -> str:
        self._require("conversations", "id", conversation_id)
        self._require_all_decided(conversation_id)
        with self._db.atomic():
            position = self._next_position(conversation_id)
            return self._add_message(conversation_id, role, content, position, True,
                                     model_version=model_version, generation=generation,
                                     context=context)

    @_locked
    def add_turn(
        self, conversation_id: str, user_message: str, reply: str, *, message_id: str | None = None,
        model_version: str | None = None, generation: dict[str, Any] | None = None,
        context: list[dict[str, str]] | None = None, input_flag: str | None = None,
        reply_flag: str | None = None,
    ) -> str:
        """A user message and the assistant's reply to it, stored together or not at all.

        A flagged input (moderation refused it) is kept, with its refusal, off the main line: no
        later turn's context and no training data sees it. A flagged reply is the replacement
        the learner was shown; it stays on the main line but is never feedback to learn from.
        """
        self._require("conversations", "id", conversation_id)
        self._require_all_decided(conversation_id)
        _check(input_flag is None or isinstance(input_flag, str), "bad input_flag")
        _check(reply_flag is None or isinstance(reply_flag, str), "bad reply_flag")
        active = input_flag is None
        with self._db.atomic():
            position = self._next_position(conversation_id)
            self._add_message(conversation_id, "user", user_message, position, active, flag=input_flag)
            return self._add_message(conversation_id, "assistant", reply, position + 1, active,
                                     model_version=model_version, generation=generation,
                                     context=context, message_id=message_id,
                                     flag=input_flag or reply_flag)

    @_locked
    def message(self, message_id: str) -> dict[str, Any] | None:
        row = self._one("select * from messages where id = ?", [message_id])
        if row is not None:
            row["active"] = bool(row["active"])
        return row

    # -- comparisons --

    @_locked
    def undecided_comparison(self, conversation_id: str) -> str | None:
        self._require("conversations", "id", conversation_id)
        row = self._one("select id from comparisons where conversation_id = ? "
                        "and decided_at is null and abandoned_at is null limit 1", [conversation_id])
        return None if row is None else row["id"]

    @_locked
    def turns_since_comparison(self, conversation_id: str) -> int:
        """The learner's turns after the conversation's last comparison, decided or skipped (all of its
        turns if it has none)."""
        self._require("conversations", "id", conversation_id)
        last = self._one("""select max(m.position) as position from comparisons x
                            join messages m on m.id = x.user_message_id where x.conversation_id = ?""",
                         [conversation_id])
        after = -1 if last is None or last["position"] is None else last["position"]
        return self._one("""select count(*) as n from messages where conversation_id = ? and role = 'user'
                            and active = 1 and position > ?""", [conversation_id, after])["n"]

    @_locked
    def add_comparison(
        self, conversation_id: str, user_message: str, context: list[dict[str, str]],
        candidates: list[dict[str, Any]], *, comparison_id: str | None = None,
        message_ids: list[str] | None = None, arena: bool = False, asked: dict[str, Any] | None = None,
    ) -> tuple[str, list[str]]:
        """Store a user turn and k candidate replies, labelled A.. in the (shuffled) given order.
        The ids may be chosen by the caller (a streamed comparison shows them before it is stored).
        `arena`: the candidates come from two different versions, and the pick is a vote between them.
        `asked`: why these candidates are shown (core/active.py `Asked`)."""
        self._require("conversations", "id", conversation_id)
        self._require_all_decided(conversation_id)
        _check_context(context)
        _check(isinstance(candidates, list)
               and MIN_CANDIDATES <= len(candidates) <= MAX_CANDIDATES,
               f"a comparison needs {MIN_CANDIDATES} to {MAX_CANDIDATES} candidates")
        _check(all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in candidates),
               "each candidate needs a 'text' string")
        _check(message_ids is None or (isinstance(message_ids, list) and len(message_ids) == len(candidates)),
               "one message id per candidate")
        comparison_id = comparison_id or uuid.uuid4().hex
        with self._db.atomic():
            position = self._next_position(conversation_id)
            user_message_id = self._add_message(conversation_id, "user", user_message, position,
                                                True)
            self._insert("comparisons", {
                "id": comparison_id, "conversation_id": conversation_id,
                "user_message_id": user_message_id, "k": len(candidates),
                "context": _dumps(context), "created_at": _now(), "decided_at": None, "arena": int(arena),
                "asked": _dumps(asked),
            })
            stored = []
            for label, candidate, message_id in zip(LABELS, candidates, message_ids or [None] * len(candidates)):
                message_id = self._add_message(
                    conversation_id, "assistant", candidate["text"], position + 1, False,
                    model_version=candidate.get("model_version"),
                    generation=candidate.get("generation"), context=context,
                    comparison_id=comparison_id, message_id=message_id, flag=candidate.get("flag"))
                self._insert("comparison_candidates", {
                    "comparison_id": comparison_id, "message_id": message_id, "label": label})
                stored.append(message_id)
        return comparison_id, stored

    @_locked
    def comparison(self, comparison_id: str) -> dict[str, Any] | None:
        row = self._one("select * from comparisons where id = ?", [comparison_id])
        if row is not None:
            row["candidates"] = self._all(
                """select c.label, c.message_id, m.content, m.model_version from comparison_candidates c
                   join messages m on m.id = c.message_id
                   where c.comparison_id = ? order by c.label""", [comparison_id])
            row["pick"] = self._one("select choice, ranking, created_at from comparison_picks "
                                    "where comparison_id = ?", [comparison_id])
            row["asked"] = json.loads(row["asked"]) if row.get("asked") else None
        return row

    @_locked
    def decide_comparison(self, comparison_id: str, choice: str) -> dict[str, Any]:
        """Record the pick and put the winner on the main line (candidate A after tie/both_bad). For an
        arena comparison, `versions` says which version wrote each label (empty otherwise)."""
        comparison = self.comparison(comparison_id)
        if comparison is None:
            raise LookupError(f"unknown comparison {comparison_id!r}")
        _check(comparison["decided_at"] is None, "comparison already decided")
        _check(comparison["abandoned_at"] is None, "this comparison was skipped; ask again to compare")
        by_label = {c["label"]: c["message_id"] for c in comparison["candidates"]}
        stored_choice, ranked_labels = _parse_choice(choice, list(by_label))
        ranking = [by_label[label] for label in ranked_labels]
        winner = ranking[0] if ranking else by_label["A"]
        now = _now()
        with self._db.atomic():
            self._insert("comparison_picks", {
                "comparison_id": comparison_id, "choice": stored_choice,
                "ranking": _dumps(ranking), "created_at": now})
            self._db.execute("update comparisons set decided_at = ? where id = ?",
                             [now, comparison_id])
            self._db.execute("update messages set active = 1 where id = ?", [winner])
        versions = {c["label"]: c["model_version"] for c in comparison["candidates"]} if comparison["arena"] else {}
        return {"ranking": ranking, "winner": winner, "versions": versions}

    @_locked
    def abandon_comparison(self, comparison_id: str) -> None:
        """Close an undecided comparison without a pick: its user turn leaves the main line."""
        comparison = self._require("comparisons", "id", comparison_id)
        _check(comparison["decided_at"] is None, "comparison already decided")
        _check(comparison["abandoned_at"] is None, "comparison already skipped")
        with self._db.atomic():
            self._db.execute("update comparisons set abandoned_at = ? where id = ?", [_now(), comparison_id])
            self._db.execute("update messages set active = 0 where id = ?", [comparison["user_message_id"]])

    # -- ratings and rewrites --

    @_locked
    def add_rating(self, message_id: str, rating: str, reason: str = "") -> int:
        self._require_assistant(message_id)
        _check(rating in RATINGS, f"rating must be one of {RATINGS}")
        _check(isinstance(reason, str) and len(reason) <= MAX_REASON_CHARS,
               f"reason must be a string of at most {MAX_REASON_CHARS} characters")
        return int(self._insert("ratings", {"message_id": message_id, "rating": rating,
                                            "reason": reason, "created_at": _now()}))

    @_locked
    def latest_rating(self, message_id: str) -> dict[str, Any] | None:
        self._require("messages", "id", message_id)
        return self._one("select * from ratings where message_id = ? order by id desc limit 1",
                         [message_id])

    @_locked
    def add_rewrite(self, message_id: str, text: str) -> int:
        self._require_assistant(message_id)
        _check(isinstance(text, str) and text.strip(), "a rewrite cannot be blank")
        return int(self._insert("rewrites", {"message_id": message_id, "text": text,
                                             "created_at": _now()}))

    @_locked
    def feedback_counts(self, include_eval: bool = True) -> dict[str, int]:
        """Rated and rewritten messages (a changed vote still counts once), decided comparisons."""
        only_chat = "" if include_eval else "and c.purpose != 'eval'"
        per_message = """select count(distinct f.message_id) as n from {} f
                         join messages m on m.id = f.message_id
                         join conversations c on c.id = m.conversation_id where 1 {}"""
        decided = f"""select count(*) as n from comparisons x join conversations c
                      on c.id = x.conversation_id where x.decided_at is not null {only_chat}"""
        return {key: int(self._one(sql)["n"]) for key, sql in (  # type: ignore[index]
            ("ratings", per_message.format("ratings", only_chat)),
            ("comparisons", decided),
            ("rewrites", per_message.format("rewrites", only_chat)),
        )}

    @_locked
    def feedback_since(self, since: str | None) -> int:
        """Feedback items (ratings, picks, rewrites) given in chat conversations from `since` (ISO UTC) on."""
        return int(self._one(f"select count(*) as n from ({CHAT_FEEDBACK}) where created_at >= ?",
                             [since or ""])["n"])

    # -- training data (read only; eval conversations, conversations of users who declined
    #    consent, and flagged messages with all their feedback are left out) --

    @_locked
    def training_histories(self) -> list[dict[str, Any]]:
        """The main line of every chat conversation, rewrites in place, in conversation order.

        One row per message: conversation_id, system_prompt, message_id, position, role, content.
        """
        return self._all(
            f"""select c.id as conversation_id, c.user, c.system_prompt, m.id as message_id,
                 m.position, m.role, coalesce((select r.text from rewrites r where r.message_id = m.id
                                   order by r.id desc limit 1), m.content) as content
               from conversations c join messages m on m.conversation_id = c.id
               where {TRAINABLE} and m.active = 1
               order by c.created_at, c.id, m.position""")

    @_locked
    def training_comparisons(self) -> list[dict[str, Any]]:
        """Decided comparisons with their pick and candidates (label order), oldest pick first."""
        rows = self._all(
            f"""select x.id as comparison_id, x.conversation_id, c.user, x.k, x.context,
                 p.id as pick_id, p.choice, p.ranking
               from comparisons x join conversations c on c.id = x.conversation_id
               join comparison_picks p on p.comparison_id = x.id
               where {TRAINABLE} and x.decided_at is not null and {NO_FLAGGED_CANDIDATE}
               order by p.id""")
        candidates: dict[str, list[dict[str, Any]]] = {}
        for row in self._all(
                f"""select cc.comparison_id, cc.label, cc.message_id, m.content
                   from comparison_candidates cc join messages m on m.id = cc.message_id
                   join comparisons x on x.id = cc.comparison_id
                   join conversations c on c.id = x.conversation_id
                   where {TRAINABLE} and x.decided_at is not null and {NO_FLAGGED_CANDIDATE}
                   order by cc.comparison_id, cc.label"""):
            candidates.setdefault(row.pop("comparison_id"), []).append(row)
        for row in rows:
            row["candidates"] = candidates.get(row["comparison_id"], [])
        return rows

    @_locked
    def training_ratings(self) -> list[dict[str, Any]]:
        """The latest rating of each rated assistant message, with the message and its context."""
        return self._all(
            f"""select r.id as rating_id, r.message_id, r.rating, r.reason, m.conversation_id, c.user,
                 m.position, m.content, m.context, m.comparison_id
               from ratings r join messages m on m.id = r.message_id
               join conversations c on c.id = m.conversation_id
               where {TRAINABLE} and m.flag is null
                 and r.id = (select max(id) from ratings where message_id = r.message_id)
               order by r.id""")

    @_locked
    def training_rewrites(self) -> list[dict[str, Any]]:
        """The latest rewrite of each rewritten assistant message, with the message it replaces."""
        return self._all(
            f"""select w.id as rewrite_id, w.message_id, w.text, m.conversation_id, c.user, m.position,
                 m.content, m.context, m.comparison_id
               from rewrites w join messages m on m.id = w.message_id
               join conversations c on c.id = m.conversation_id
               where {TRAINABLE} and m.flag is null
                 and w.id = (select max(id) from rewrites where message_id = w.message_id)
               order by w.id""")

    # -- models and training --

    @_locked
    def add_model_version(
        self, version: str, kind: str, path: str | os.PathLike[str], parent: str | None = None,
        metrics: dict[str, Any] | None = None, lineage: Any = None,
    ) -> None:
        _check(isinstance(version, str) and version.strip(), "version cannot be blank")
        _check(kind in MODEL_KINDS, f"kind must be one of {MODEL_KINDS}")
        _check(isinstance(path, (str, os.PathLike)), "path must be a path")
        _check(metrics is None or isinstance(metrics, dict), "metrics must be a dict")
        if parent is not None:
            self._require("model_versions", "version", parent)
        _check(self._one("select 1 from model_versions where version = ?", [version]) is None,
               f"model version {version!r} already exists")
        self._insert("model_versions", {
            "version": version, "kind": kind, "parent": parent, "path": os.fspath(path),
            "metrics": _dumps(metrics or {}), "lineage": _dumps({} if lineage is None else lineage),
            "created_at": _now(),
        })

    @_locked
    def update_lineage(self, version: str, changes: dict[str, Any]) -> None:
        """Adds or replaces keys of a version's lineage (a canary's start and end); unknown versions are
        skipped: one promoted just before a crash is recorded when the app next starts."""
        row = self._one("select lineage from model_versions where version = ?", [version])
        if row is not None:
            lineage = row["lineage"] if isinstance(row["lineage"], dict) else {}
            self._db.execute("update model_versions set lineage = ? where version = ?",
                             [_dumps({**lineage, **changes}), version])

    @_locked
    def model_versions(self, kind: str | None = None) -> list[dict[str, Any]]:
        _check(kind is None or kind in MODEL_KINDS, f"kind must be one of {MODEL_KINDS}")
        return self._all("select * from model_versions where ? is null or kind = ? "
                         "order by created_at, rowid", [kind, kind])

    @_locked
    def start_cycle(self) -> int:
        now = _now()
        with self._db.atomic():
            # One trainer runs at a time, so a cycle still 'running' was cut off by a crash.
            self._db.execute("""update training_cycles set status = 'interrupted', finished_at = ?,
                                reason = 'a later cycle started before it finished'
                                where status = 'running'""", [now])
            return int(self._insert("training_cycles", {
                "started_at": now, "finished_at": None, "status": "running",
                "policy_version": None, "reward_version": None, "reason": "", "metrics": "{}"}))

    @_locked
    def finish_cycle(
        self, cycle_id: int, status: str, reason: str = "", policy_version: str | None = None,
        reward_version: str | None = None, metrics: dict[str, Any] | None = None,
    ) -> None:
        cycle = self._require("training_cycles", "id", cycle_id)
        _check(cycle["finished_at"] is None, f"cycle {cycle_id} already finished")
        _check(status in CYCLE_END_STATUSES, f"status must be one of {CYCLE_END_STATUSES}")
        _check(isinstance(reason, str), "reason must be a string")
        _check(metrics is None or isinstance(metrics, dict), "metrics must be a dict")
        self._db.execute(
            """update training_cycles set finished_at = ?, status = ?, reason = ?,
               policy_version = ?, reward_version = ?, metrics = ? where id = ?""",
            [_now(), status, reason, policy_version, reward_version, _dumps(metrics or {}),
             cycle_id])

    @_locked
    def cycles(self) -> list[dict[str, Any]]:
        """Every training cycle, newest first, metrics decoded."""
        return self._all("select * from training_cycles order by id desc")

    @_locked
    def feedback_by_day(self) -> list[dict[str, Any]]:
        """{"day", "kind", "n"} for ratings, picks and rewrites in chat conversations, oldest day first."""
        return self._all(f"""select substr(created_at, 1, 10) as day, kind, count(*) as n from ({CHAT_FEEDBACK})
                             group by day, kind order by day, kind""")

    @_locked
    def feedback_by_day_and_user(self, users: list[str] | None = None) -> list[dict[str, Any]]:
        """{"day", "user", "n"}: feedback items of each of `users` (None: everyone's) per day, oldest first."""
        where = "" if users is None else f"where user in ({', '.join('?' * len(users))})"
        return self._all(f"""select substr(created_at, 1, 10) as day, user, count(*) as n from ({CHAT_FEEDBACK})
                             {where} group by day, user order by day, user""", list(users or []))

    # -- arena and canaries --

    @_locked
    def arena_votes(self, since: str | None = None) -> list[dict[str, Any]]:
        """Decided two-answer arena comparisons: {"comparison_id", "created_at", "choice", "candidates":
        [{"label", "model_version", "content"}]}; both_bad counts as a tie (as in Chatbot Arena)."""
        rows = self._all("""select x.id as comparison_id, p.created_at, p.choice from comparisons x
                            join comparison_picks p on p.comparison_id = x.id
                            where x.arena = 1 and x.k = 2 and (? is null or p.created_at >= ?)
                            order by p.created_at""", [since, since])
        for row in rows:
            row["candidates"] = self._all(
                """select c.label, m.model_version, m.content from comparison_candidates c
                   join messages m on m.id = c.message_id where c.comparison_id = ? order by c.label""",
                [row["comparison_id"]])
        return rows

    @_locked
    def start_canary(self, version: str, baseline: str, settings: dict[str, Any]) -> int:
        """A new canary; one that still runs is withdrawn in the same transaction (superseded)."""
        _check(isinstance(version, str) and version and isinstance(baseline, str) and baseline,
               "a canary needs a version and a baseline")
        _check(version != baseline, "a canary must differ from the version it is compared with")
        now = _now()
        with self._db.atomic():
            self._db.execute("""update canaries set status = 'withdrawn', ended_at = ?,
                                reason = 'superseded by a newer canary' where status = 'running'""", [now])
            return int(self._insert("canaries", {
                "version": version, "baseline": baseline, "settings": _dumps(settings), "started_at": now,
                "ended_at": None, "status": "running", "reason": None, "verdict": None}))

    @_locked
    def running_canary(self) -> dict[str, Any] | None:
        return self._one("select * from canaries where status = 'running' order by id desc limit 1")

    @_locked
    def end_canary(self, canary_id: int, status: str, reason: str, verdict: dict[str, Any] | None = None) -> bool:
        """Ends a running canary; False if it had already ended (another process decided first)."""
        _check(status in CANARY_END_STATUSES, f"status must be one of {CANARY_END_STATUSES}")
        cursor = self._db.execute("""update canaries set status = ?, ended_at = ?, reason = ?, verdict = ?
                                     where id = ? and status = 'running'""",
                                  [status, _now(), reason, _dumps(verdict), canary_id])
        return cursor.rowcount == 1

    @_locked
    def canaries(self) -> list[dict[str, Any]]:
        """Every canary, newest first."""
        return self._all("select * from canaries order by id desc")

    @_locked
    def last_cycle(self, statuses: tuple[str, ...] | None = None) -> dict[str, Any] | None:
        """The newest training cycle, optionally only among those that ended with one of `statuses`."""
        where = f"where status in ({', '.join('?' * len(statuses))})" if statuses else ""
        return _decode(self._one(f"select * from training_cycles {where} order by id desc limit 1",
                                 list(statuses or [])))

    # -- accounts and consent --

    @_locked
    def add_account(self, name: str, role: str, password_hash: str, teacher: str | None = None) -> None:
        _check(isinstance(name, str) and name.strip() == name and 0 < len(name) <= 64,
               "an account name is 1 to 64 characters, without spaces at either end")
        _check(role in ACCOUNT_ROLES, f"role must be one of {', '.join(ACCOUNT_ROLES)}")
        _check(isinstance(password_hash, str) and password_hash, "password_hash cannot be blank")
        _check(self._one("select 1 from accounts where name = ?", [name]) is None,
               f"account {name!r} already exists")
        if teacher is not None:
            row = self._require("accounts", "name", teacher)
            _check(row["role"] == "teacher", f"{teacher!r} is not a teacher")
        self._insert("accounts", {"name": name, "role": role, "password_hash": password_hash,
                                  "teacher": teacher, "disabled": 0, "created_at": _now()})

    @_locked
    def account(self, name: str) -> dict[str, Any] | None:
        row = self._one("select * from accounts where name = ?", [name])
        if row is not None:
            row["disabled"] = bool(row["disabled"])
        return row

    @_locked
    def accounts(self) -> list[dict[str, Any]]:
        """Every account without its password hash, in name order."""
        return [{**row, "disabled": bool(row["disabled"])} for row in self._all(
            "select name, role, teacher, disabled, created_at from accounts order by name")]

    @_locked
    def has_accounts(self) -> bool:
        return self._one("select 1 from accounts limit 1") is not None

    @_locked
    def update_account(self, name: str, *, password_hash: str | None = None,
                       disabled: bool | None = None) -> None:
        self._require("accounts", "name", name)
        with self._db.atomic():
            if password_hash is not None:
                _check(isinstance(password_hash, str) and password_hash, "password_hash cannot be blank")
                self._db.execute("update accounts set password_hash = ? where name = ?", [password_hash, name])
            if disabled is not None:
                self._db.execute("update accounts set disabled = ? where name = ?", [int(bool(disabled)), name])

    @_locked
    def learners_of(self, teacher: str) -> list[str]:
        return [r["name"] for r in self._all("select name from accounts where teacher = ? order by name",
                                             [teacher])]

    @_locked
    def set_consent(self, user: str, choice: str) -> None:
        _check(isinstance(user, str), "user must be a string")
        _check(choice in CONSENT_CHOICES, f"consent must be one of {', '.join(CONSENT_CHOICES)}")
        self._db.execute("insert or replace into consents (user, choice, created_at) values (?, ?, ?)",
                         [user, choice, _now()])

    @_locked
    def consent(self, user: str) -> str | None:
        row = self._one("select choice from consents where user = ?", [user])
        return None if row is None else row["choice"]

    # -- ownership and activity (for access checks and quotas) --

    @_locked
    def owner(self, kind: str, item_id: str) -> str | None:
        """The user whose conversation holds this conversation, message or comparison; None if unknown."""
        sql = {"conversation": "select user from conversations where id = ?",
               "message": "select c.user from messages m join conversations c on c.id = m.conversation_id "
                          "where m.id = ?",
               "comparison": "select c.user from comparisons x join conversations c "
                             "on c.id = x.conversation_id where x.id = ?"}
        _check(kind in sql, f"kind must be one of {', '.join(sql)}")
        row = self._one(sql[kind], [item_id])
        return None if row is None else row["user"]

    @_locked
    def conversations_of(self, users: list[str]) -> list[dict[str, Any]]:
        marks = ", ".join("?" * len(users))
        return self._all(f"""select c.id as conversation_id, c.user, c.purpose, c.created_at,
                              (select count(*) from messages m where m.conversation_id = c.id
                               and m.active = 1) as turns
                             from conversations c where c.user in ({marks}) order by c.created_at""",
                         list(users))

    @_locked
    def activity_since(self, user: str, since: str) -> dict[str, int]:
        """How many of each ACTIVITY_KINDS `user` did from `since` (ISO UTC) on."""
        mine = "join conversations c on c.id = {} where c.user = ? and {}.created_at >= ?"
        sql = {
            "conversation": "select count(*) from conversations c where c.user = ? and c.created_at >= ?",
            "chat": "select count(*) from messages m " + mine.format("m.conversation_id", "m")
                    + " and m.role = 'user' and m.comparison_id is null",
            "compare": "select count(*) from comparisons x " + mine.format("x.conversation_id", "x"),
            "pick": "select count(*) from comparison_picks p join comparisons x on x.id = p.comparison_id "
                    + mine.format("x.conversation_id", "p"),
            "rate": "select count(*) from ratings r join messages m on m.id = r.message_id "
                    + mine.format("m.conversation_id", "r"),
            "rewrite": "select count(*) from rewrites w join messages m on m.id = w.message_id "
                       + mine.format("m.conversation_id", "w"),
            "recheck": "select count(*) from repeat_checks k where k.user = ? and k.created_at >= ?",
        }
        return {kind: int(self._db.execute(q, [user, since]).fetchone()[0]) for kind, q in sql.items()}

    # -- teachers' exclusions and repeat checks (read by the trainer) --

    @_locked
    def add_exclusion(self, kind: str, target: str, reason: str, by: str) -> int:
        _check(kind in EXCLUSION_KINDS, f"kind must be one of {', '.join(EXCLUSION_KINDS)}")
        _check(all(isinstance(v, str) for v in (target, reason, by)), "target, reason and by are strings")
        _check(len(reason) <= MAX_REASON_CHARS, f"reason is longer than {MAX_REASON_CHARS} characters")
        return int(self._insert("exclusions", {"kind": kind, "target": target, "reason": reason, "by": by,
                                               "created_at": _now()}))

    @_locked
    def training_exclusions(self) -> list[dict[str, Any]]:
        return self._all("select kind, target, reason, by, created_at from exclusions order by id")

    @_locked
    def repeat_candidate(self, user: str, skip: str | None = None) -> dict[str, Any] | None:
        """A two-answer comparison `user` decided with a winner and was not asked again about (not `skip`,
        and none whose answer moderation replaced: that one is no training data to check)."""
        row = self._one(
            f"""select x.id from comparisons x join conversations c on c.id = x.conversation_id
               join comparison_picks p on p.comparison_id = x.id
               where c.user = ? and c.purpose != 'eval' and x.k = 2 and p.choice in ('A', 'B')
                 and x.id != ? and {NO_FLAGGED_CANDIDATE}
                 and not exists (select 1 from repeat_checks k where k.comparison_id = x.id)
               order by random() limit 1""", [user, skip or ""])
        return None if row is None else self.comparison(row["id"])

    @_locked
    def add_repeat_check(self, comparison_id: str, user: str, choice: str) -> bool:
        """Records the second pick (a label of the first showing); returns whether it agrees."""
        comparison = self._require("comparisons", "id", comparison_id)
        pick = self._one("select choice from comparison_picks where comparison_id = ?", [comparison_id])
        _check(pick is not None and pick["choice"] in ("A", "B") and comparison["k"] == 2,
               "only a decided two-answer comparison can be asked again")
        _check(choice in ("A", "B"), "choice must be 'A' or 'B'")
        _check(self._one("select 1 from repeat_checks where comparison_id = ?", [comparison_id]) is None,
               "this comparison was already asked again")
        agrees = choice == pick["choice"]
        self._insert("repeat_checks", {"comparison_id": comparison_id, "user": user, "choice": choice,
                                       "agrees": int(agrees), "created_at": _now()})
        return agrees

    @_locked
    def repeat_checks(self) -> list[dict[str, Any]]:
        return [{**r, "agrees": bool(r["agrees"])} for r in self._all(
            "select user, comparison_id, agrees, created_at from repeat_checks order by id")]

    # -- a user's data: export and delete --

    @_locked
    def user_data(self, user: str) -> list[dict[str, Any]]:
        """Every conversation of `user` with all its messages and the feedback on them."""
        out = []
        for c in self._all("select * from conversations where user = ? order by created_at", [user]):
            messages = self._all("""select id, role, content, position, active, model_version, flag,
                                    comparison_id, created_at from messages where conversation_id = ?
                                    order by position, created_at""", [c["id"]])
            ids = [m["id"] for m in messages]
            marks = ", ".join("?" * len(ids))
            out.append({
                "conversation_id": c["id"], "purpose": c["purpose"], "created_at": c["created_at"],
                "messages": messages,
                "ratings": self._all(f"select message_id, rating, reason, created_at from ratings "
                                     f"where message_id in ({marks}) order by id", ids),
                "rewrites": self._all(f"select message_id, text, created_at from rewrites "
                                      f"where message_id in ({marks}) order by id", ids),
                "picks": self._all("""select p.comparison_id, p.choice, p.ranking, p.created_at
                                      from comparison_picks p join comparisons x on x.id = p.comparison_id
                                      where x.conversation_id = ? order by p.id""", [c["id"]]),
            })
        return out

    @_locked
    def delete_conversations(self, conversation_ids: list[str], kind: str, target: str) -> dict[str, list[int]]:
        """Deletes these conversations and everything in them, then scrubs the file.

        The ids of the feedback rows that went are recorded (no text), and every model version
        trained on any of them gets `trained_on_deleted` in its lineage. Returns those row ids.
        """
        ids = list(conversation_ids)
        marks = ", ".join("?" * len(ids))
        in_messages = f"message_id in (select id from messages where conversation_id in ({marks}))"
        in_comparisons = f"comparison_id in (select id from comparisons where conversation_id in ({marks}))"
        gone = {
            "ratings": [r["id"] for r in self._all(f"select id from ratings where {in_messages}", ids)],
            "picks": [r["id"] for r in self._all(f"select id from comparison_picks where {in_comparisons}", ids)],
            "rewrites": [r["id"] for r in self._all(f"select id from rewrites where {in_messages}", ids)],
        }
        with self._db.atomic():
            for sql in (f"delete from ratings where {in_messages}", f"delete from rewrites where {in_messages}",
                        f"delete from comparison_picks where {in_comparisons}",
                        f"delete from repeat_checks where {in_comparisons}",
                        f"delete from comparison_candidates where {in_comparisons}",
                        f"delete from comparisons where conversation_id in ({marks})",
                        f"delete from messages where conversation_id in ({marks})",
                        f"delete from conversations where id in ({marks})"):
                self._db.execute(sql, ids)
            self._insert("deletions", {"kind": kind, "target": target, "feedback": _dumps(gone),
                                       "created_at": _now()})
            self._mark_trained_on_deleted(gone)
        self._scrub()
        return gone

    def _mark_trained_on_deleted(self, gone: dict[str, list[int]]) -> None:
        for version in self._all("select version, lineage from model_versions"):
            lineage = version["lineage"] if isinstance(version["lineage"], dict) else {}
            rows = lineage.get("feedback_rows") or {}
            hit = {kind: sorted(set(rows.get(kind, [])) & set(ids)) for kind, ids in gone.items()}
            hit = {kind: ids for kind, ids in hit.items() if ids}
            if hit:
                marked = lineage.setdefault("trained_on_deleted", {})
                for kind, ids in hit.items():
                    marked[kind] = sorted(set(marked.get(kind, [])) | set(ids))
                self._db.execute("update model_versions set lineage = ? where version = ?",
                                 [_dumps(lineage), version["version"]])

    def _scrub(self) -> None:
        # secure_delete zeroes the freed pages, but older copies of them may still sit in the
        # write-ahead log: checkpoint it, rebuild the file, and truncate the log again.
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as exc:  # another process holds the file; the rows are gone anyway
            log.warning("could not compact the database after a deletion: %s", exc)

    @_locked
    def deletions(self) -> list[dict[str, Any]]:
        return self._all("select * from deletions order by id")


    # -- the database as a whole --

    @_locked
    def backup(self, path: str | os.PathLike[str]) -> None:
        """A consistent copy of the whole database at `path` (replaced if it exists).

        SQLite's online backup copies pages as this connection sees them, so rows still in the
        write-ahead log are in the copy, which a plain file copy would miss, and no write lands
        halfway. Written under a temporary name beside `path`, then renamed, so `path` is never a
        partial copy.
        """
        path = os.fspath(path)
        partial = os.path.join(os.path.dirname(path) or ".",
                               f".{os.path.basename(path)}.{uuid.uuid4().hex}.partial")
        try:
            with closing(sqlite3.connect(partial)) as copy:
                self._db.conn.backup(copy)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    @_locked
    def forget_training_history(self) -> None:
        """Deletes every training cycle and model version, in one transaction.

        Conversations, messages and all feedback stay as they are: the database is as it was
        before any training, ready for a trainer to start again from the same feedback.
        """
        with self._db.atomic():
            for table in TRAINING_HISTORY_TABLES:
                self._db.execute(f"delete from [{table}]")

    @_locked
    def row_counts(self) -> dict[str, int]:
        return {table: int(self._db.execute(f"select count(*) from [{table}]").fetchone()[0])
                for table in TABLES}
