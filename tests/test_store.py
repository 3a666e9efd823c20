"""Tests of the SQLite store on temporary databases."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlite_utils import Database

from app.store import MIGRATIONS, TABLES, Store

CONTEXT = [{"role": "system", "content": "You are a patient tutor."},
           {"role": "user", "content": "What is 2 + 2?"}]
GENERATION = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "tutor.db") as s:
        yield s


def chat(store: Store, purpose: str = "chat") -> tuple[str, str]:
    """A conversation with one user turn and one assistant reply; returns (conversation, reply)."""
    conversation_id = store.new_conversation("ada", purpose, "You are a patient tutor.")
    store.add_message(conversation_id, "user", "What is 2 + 2?")
    reply = store.add_message(conversation_id, "assistant", "4", model_version="policy-0",
                              generation=GENERATION, context=CONTEXT)
    return conversation_id, reply


def candidates(k: int) -> list[dict]:
    return [{"text": f"answer {i}", "model_version": "policy-0", "generation": GENERATION}
            for i in range(k)]


def every_kind_of_row(store: Store) -> None:
    """At least one row in every table."""
    conversation_id, reply = chat(store)
    store.add_rating(reply, "up", "clear")
    store.add_rewrite(reply, "2 + 2 = 4: two and two more.")
    comparison_id, _ = store.add_comparison(conversation_id, "And 3 + 3?", CONTEXT, candidates(2))
    store.decide_comparison(comparison_id, "B")
    store.add_account("ada", "learner", "argon2-hash")
    store.set_consent("ada", "given")
    store.add_exclusion("user", "ada", "left out by a teacher", "tess")
    store.add_repeat_check(comparison_id, "ada", "A")
    gone, _ = chat(store)
    store.delete_conversations([gone], "conversation", gone)
    store.add_model_version("policy-0", "policy", "models/policy-0")
    store.add_model_version("policy-1", "policy", "models/policy-1", parent="policy-0")
    store.add_model_version("reward-1", "reward", "models/reward-1")
    store.finish_cycle(store.start_cycle(), "promoted", policy_version="policy-1",
                       reward_version="reward-1")
    store.start_cycle()
    store.start_canary("policy-1", "policy-0", {"min_votes": 20})


def rows_of(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, read through a connection of its own (which sees the WAL too)."""
    with closing(sqlite3.connect(path)) as db:
        return {table: db.execute(f"select * from [{table}] order by rowid").fetchall()
                for table in TABLES}


def test_schema_tables_exist(tmp_path: Path) -> None:
    # The file's own catalogue, not row_counts(): that walks TABLES, so it cannot see a table
    # that TABLES leaves out, and it reports a missing one only by crashing.
    path = tmp_path / "tutor.db"
    Store(path).close()
    with closing(sqlite3.connect(path)) as db:
        tables = {name for (name,) in db.execute("select name from sqlite_master where type = 'table'")
                  if not name.startswith("sqlite_") and name != MIGRATIONS.migrations_table}
        assert tables == set(TABLES)
        assert {t: db.execute(f"select count(*) from [{t}]").fetchone()[0] for t in tables} == {
            t: 0 for t in TABLES}


def test_backup_holds_every_row_even_those_still_in_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "tutor.db"
    with Store(path) as store:
        every_kind_of_row(store)
        with closing(sqlite3.connect(path)) as other:  # the rows so far into the main file...
            other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        late, _ = chat(store)  # ...and these only in the write-ahead log
        shutil.copyfile(path, tmp_path / "plain.db")
        assert late not in {row[0] for row in rows_of(tmp_path / "plain.db")["conversations"]}
        store.backup(tmp_path / "backup.db")
        expected = rows_of(path)
    assert late in {row[0] for row in expected["conversations"]}
    assert all(expected.values())
    assert rows_of(tmp_path / "backup.db") == expected
    assert not list(tmp_path.glob("*partial*"))  # the temporary name was renamed away


HISTORY = ("model_versions", "training_cycles", "canaries")


def test_forget_training_history_keeps_conversations_and_feedback(tmp_path: Path) -> None:
    path = tmp_path / "tutor.db"
    with Store(path) as store:
        every_kind_of_row(store)
        before = rows_of(path)
        store.forget_training_history()
        after = rows_of(path)
        assert all(before.values())  # there was something to keep and something to forget
        assert {t: after[t] for t in HISTORY} == {t: [] for t in HISTORY}
        assert {t: rows for t, rows in after.items() if t not in HISTORY} == {
            t: rows for t, rows in before.items() if t not in HISTORY}
        # a trainer starts again from nothing
        assert store.last_cycle() is None and store.model_versions() == []
        store.add_model_version("policy-0", "policy", "models/policy-0")
        assert store.start_cycle() >= 1


def test_forget_training_history_is_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "tutor.db"
    with Store(path) as store:
        every_kind_of_row(store)
        before = rows_of(path)
        # Each table refuses to be emptied once the other one is: whichever goes first goes, the
        # second delete fails, and the first must be undone with it.
        with closing(sqlite3.connect(path)) as db:
            for table, other in (HISTORY[:2], HISTORY[1::-1]):
                db.execute(f"""create trigger keep_{table} before delete on [{table}]
                               when not exists (select 1 from [{other}])
                               begin select raise(abort, 'the other table is already empty'); end""")
            db.commit()
        with pytest.raises(sqlite3.IntegrityError):
            store.forget_training_history()
        assert rows_of(path) == before


def test_memory_database_works() -> None:
    with Store(":memory:") as s:
        conversation_id, reply = chat(s)
        assert [m["message_id"] for m in s.history(conversation_id)][-1] == reply


def test_file_database_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "tutor.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_upgrade_from_older_schema_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = Database(path)
    MIGRATIONS.apply(old, stop_before="m002_feedback")
    assert set(old.table_names()) >= {"conversations", "messages"}
    assert "ratings" not in old.table_names()
    old["conversations"].insert({"id": "c1", "user": "ada", "purpose": "chat",
                                 "system_prompt": "Be kind.", "created_at": "2024-01-01T00:00:00+00:00"})
    old["messages"].insert({"id": "m1", "conversation_id": "c1", "role": "assistant",
                            "content": "Hello!", "position": 0, "active": 1,
                            "created_at": "2024-01-01T00:00:01+00:00"})
    old.close()

    with Store(path) as s:
        assert set(s.row_counts()) == set(TABLES)
        assert s.row_counts()["messages"] == 1
        assert s.conversation("c1")["system_prompt"] == "Be kind."
        assert s.history("c1") == [{"message_id": "m1", "role": "assistant", "content": "Hello!"}]
        s.add_rating("m1", "up")  # the new tables work against the old rows
        assert s.latest_rating("m1")["rating"] == "up"


def test_messages_round_trip_with_positions(store: Store) -> None:
    conversation_id, reply = chat(store)
    message = store.message(reply)
    assert message["position"] == 1 and message["active"] is True
    assert message["generation"] == GENERATION and message["context"] == CONTEXT
    assert [m["role"] for m in store.history(conversation_id)] == ["user", "assistant"]
    assert store.conversation(conversation_id)["purpose"] == "chat"
    assert store.conversation("nope") is None and store.message("nope") is None


def test_rating_with_reason_and_changed_vote(store: Store) -> None:
    _, reply = chat(store)
    assert store.latest_rating(reply) is None
    store.add_rating(reply, "up", "clear and correct")
    assert store.latest_rating(reply)["reason"] == "clear and correct"
    store.add_rating(reply, "down", "too short")
    assert store.row_counts()["ratings"] == 2
    assert store.latest_rating(reply)["rating"] == "down"
    assert store.feedback_counts()["ratings"] == 1  # one rated message, however many votes


def test_rewrite_replaces_content_in_history(store: Store) -> None:
    conversation_id, reply = chat(store)
    store.add_rewrite(reply, "2 + 2 = 4, because two pairs make four.")
    store.add_rewrite(reply, "Four: count two, then two more.")
    assert store.history(conversation_id)[-1]["content"] == "Four: count two, then two more."
    assert store.message(reply)["content"] == "4"  # what the model said is kept


def test_comparison_of_two_pick_b(store: Store) -> None:
    conversation_id, _ = chat(store)
    comparison_id, (a, b) = store.add_comparison(conversation_id, "And 3 + 3?", CONTEXT,
                                                 candidates(2))
    assert store.undecided_comparison(conversation_id) == comparison_id
    comparison = store.comparison(comparison_id)
    assert [c["label"] for c in comparison["candidates"]] == ["A", "B"]
    assert comparison["decided_at"] is None and comparison["context"] == CONTEXT
    assert store.message(a)["position"] == store.message(b)["position"] == 3
    assert not store.message(a)["active"] and not store.message(b)["active"]

    result = store.decide_comparison(comparison_id, "B")
    assert result == {"ranking": [b, a], "winner": b, "versions": {}}
    assert store.message(b)["active"] and not store.message(a)["active"]
    assert store.history(conversation_id)[-1]["message_id"] == b
    assert store.comparison(comparison_id)["decided_at"] is not None
    assert store.comparison(comparison_id)["pick"]["ranking"] == [b, a]
    assert store.undecided_comparison(conversation_id) is None
    assert store.feedback_counts()["comparisons"] == 1


def test_comparison_of_three_full_order(store: Store) -> None:
    conversation_id, _ = chat(store)
    comparison_id, (a, b, c) = store.add_comparison(conversation_id, "And 3 + 3?", CONTEXT,
                                                    candidates(3))
    assert store.decide_comparison(comparison_id, " c, A ,b") == {"ranking": [c, a, b],
                                                                  "winner": c, "versions": {}}
    assert store.comparison(comparison_id)["pick"]["choice"] == "C,A,B"
    assert store.message(c)["active"] and not store.message(a)["active"]


def test_comparison_of_three_single_best(store: Store) -> None:
    conversation_id, _ = chat(store)
    comparison_id, (_, b, _) = store.add_comparison(conversation_id, "And 3 + 3?", CONTEXT,
                                                    candidates(3))
    assert store.decide_comparison(comparison_id, "B") == {"ranking": [b], "winner": b, "versions": {}}


@pytest.mark.parametrize("choice", ["tie", "both_bad"])
def test_comparison_without_preference_continues_from_a(store: Store, choice: str) -> None:
    conversation_id, _ = chat(store)
    comparison_id, (a, _) = store.add_comparison(conversation_id, "And 3 + 3?", CONTEXT,
                                                 candidates(2))
    assert store.decide_comparison(comparison_id, choice) == {"ranking": [], "winner": a, "versions": {}}
    assert store.history(conversation_id)[-1]["message_id"] == a


def test_feedback_counts_can_leave_out_eval(store: Store) -> None:
    _, chat_reply = chat(store, "chat")
    _, eval_reply = chat(store, "eval")
    for reply in (chat_reply, eval_reply):
        store.add_rating(reply, "up")
        store.add_rewrite(reply, "better")
    assert store.feedback_counts() == {"ratings": 2, "comparisons": 0, "rewrites": 2}
    assert store.feedback_counts(include_eval=False) == {"ratings": 1, "comparisons": 0,
                                                         "rewrites": 1}


def test_model_versions_and_cycles(store: Store) -> None:
    store.add_model_version("policy-0", "policy", "models/policy-0", metrics={"kl": 0.0})
    store.add_model_version("policy-1", "policy", "models/policy-1", parent="policy-0",
                            lineage={"data": ["ratings"]})
    store.add_model_version("reward-1", "reward", "models/reward-1")
    assert [v["version"] for v in store.model_versions("policy")] == ["policy-0", "policy-1"]
    assert store.model_versions()[0]["metrics"] == {"kl": 0.0}
    assert store.model_versions("policy")[1]["lineage"] == {"data": ["ratings"]}

    crashed = store.start_cycle()
    cycle = store.start_cycle()
    assert store.last_cycle()["id"] == cycle and store.last_cycle()["status"] == "running"
    store.finish_cycle(cycle, "promoted", "win rate 0.6", policy_version="policy-1",
                       reward_version="reward-1", metrics={"win_rate": 0.6})
    last = store.last_cycle()
    assert last["status"] == "promoted" and last["metrics"] == {"win_rate": 0.6}
    assert last["finished_at"] is not None
    with pytest.raises(ValueError):
        store.finish_cycle(crashed, "failed")  # already marked interrupted by the later start


def test_bad_inputs_raise_and_write_nothing(store: Store) -> None:
    conversation_id, reply = chat(store)
    user_message = store.history(conversation_id)[0]["message_id"]
    decided, _ = store.add_comparison(conversation_id, "And 3 + 3?", CONTEXT, candidates(2))
    store.decide_comparison(decided, "A")
    pending, _ = store.add_comparison(conversation_id, "And 4 + 4?", CONTEXT, candidates(3))
    store.add_model_version("policy-0", "policy", "models/policy-0")
    before = store.row_counts()

    bad: list[tuple[type[Exception], Callable[[], object]]] = [
        (LookupError, lambda: store.history("nope")),
        (LookupError, lambda: store.add_message("nope", "user", "hi")),
        (LookupError, lambda: store.add_rating("nope", "up")),
        (LookupError, lambda: store.add_rewrite("nope", "better")),
        (LookupError, lambda: store.latest_rating("nope")),
        (LookupError, lambda: store.decide_comparison("nope", "A")),
        (LookupError, lambda: store.undecided_comparison("nope")),
        (LookupError, lambda: store.add_comparison("nope", "hi", CONTEXT, candidates(2))),
        (LookupError, lambda: store.add_model_version("p", "policy", "x", parent="nope")),
        (LookupError, lambda: store.finish_cycle(12345, "failed")),
        (ValueError, lambda: store.new_conversation("ada", "other", "")),
        (ValueError, lambda: store.add_rating(reply, "meh")),
        (ValueError, lambda: store.add_rating(reply, "up", "x" * 501)),
        (ValueError, lambda: store.add_rating(user_message, "up")),
        (ValueError, lambda: store.add_rewrite(reply, "   ")),
        (ValueError, lambda: store.decide_comparison(decided, "B")),
        (ValueError, lambda: store.decide_comparison(pending, "Z")),
        (ValueError, lambda: store.decide_comparison(pending, "C,A")),
        (ValueError, lambda: store.decide_comparison(pending, "A,A,B")),
        (ValueError, lambda: store.decide_comparison(pending, "")),
        (ValueError, lambda: store.add_message(conversation_id, "user", "skip the pick")),
        (ValueError, lambda: store.add_model_version("policy-0", "policy", "again")),
        (ValueError, lambda: store.add_model_version("p", "critic", "x")),
    ]
    for error, call in bad:
        with pytest.raises(error):
            call()
    store.decide_comparison(pending, "A")
    after_pick = store.row_counts()

    fresh = store.new_conversation("ada", "chat", "")
    before_fresh = store.row_counts()
    for k in (0, 1, 5):
        with pytest.raises(ValueError):
            store.add_comparison(fresh, "hi", CONTEXT, candidates(k))
    with pytest.raises(ValueError):  # a bad candidate fails the whole comparison
        store.add_comparison(fresh, "hi", CONTEXT, [{"text": "a"}, {"text": "b", "generation": 1}])
    with pytest.raises(ValueError):
        store.add_comparison(fresh, "   ", CONTEXT, candidates(2))
    with pytest.raises(ValueError):
        store.add_message(fresh, "system", "hi")
    assert store.row_counts() == before_fresh
    assert after_pick["comparison_picks"] == before["comparison_picks"] + 1
    assert {t: n for t, n in after_pick.items() if t != "comparison_picks"} == {
        t: n for t, n in before.items() if t != "comparison_picks"}


def test_concurrent_writes_from_threads_all_land(store: Store) -> None:
    n_threads, n_turns = 8, 20
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            conversation_id = store.new_conversation("ada", "chat", "")
            for i in range(n_turns):
                store.add_message(conversation_id, "user", f"question {i}")
                reply = store.add_message(conversation_id, "assistant", f"answer {i}")
                store.add_rating(reply, "up")
            positions = [store.message(m["message_id"])["position"]
                         for m in store.history(conversation_id)]
            assert positions == list(range(2 * n_turns))
        except BaseException as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    counts = store.row_counts()
    assert counts["conversations"] == n_threads
    assert counts["messages"] == n_threads * n_turns * 2
    assert counts["ratings"] == n_threads * n_turns
