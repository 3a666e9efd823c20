"""The canary: arena votes promote a better version and withdraw a worse one, never touching a feedback row;
a crash mid-canary leaves the current version serving; and the whole loop through the API: a learner's
arena pairs are blind, the pick reveals the versions, and the votes decide the canary on a running app."""
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from gradio_client import Client

from app.canary import Arena
from app.embedded import ensure_base
from app.store import Store
from app.versions import ModelRegistry, record_versions
from core.chat_format import TUTOR_SYSTEM_PROMPT
from core.arena import CanaryConfig

ROOT = Path(__file__).resolve().parents[1]
FEEDBACK_TABLES = ("conversations", "messages", "ratings", "comparisons", "comparison_candidates",
                   "comparison_picks", "rewrites")
RULES = CanaryConfig(enabled=True, min_votes=20, max_votes=120, margin=0.1, conversation_share=1.0, arena_share=1.0)


class ServedVersion:
    """What Arena.review needs of the main engine: the version it serves."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    @property
    def version(self) -> str:
        return self.registry.current_version()


def two_versions(root: Path, tiny_model_dir: Path) -> ModelRegistry:
    """v0000 (the tiny base, current) and v0001, a second whole version whose parent is v0000."""
    registry = ModelRegistry(root / "models")
    ensure_base(registry, tiny_model_dir, say=lambda *_: None)
    shutil.copytree(registry.path("v0000"), registry.path("v0001"))
    (registry.path("v0001") / "meta.json").write_text(json.dumps({**registry.meta("v0000"), "parent": "v0000",
                                                                  "version": "v0001"}))
    return registry


def vote(store: Store, prefers_canary: bool, rng: random.Random, canary="v0001", baseline="v0000") -> None:
    """One decided arena pair, sides in random order, same-length answers (style plays no part)."""
    conversation = store.new_conversation("learner", "chat", TUTOR_SYSTEM_PROMPT)
    sides = [canary, baseline]
    rng.shuffle(sides)
    context = [{"role": "system", "content": TUTOR_SYSTEM_PROMPT}, {"role": "user", "content": "Why is the sky blue?"}]
    comparison, _ = store.add_comparison(conversation, "Why is the sky blue?", context,
                                         [{"text": f"An answer of {v}.", "model_version": v} for v in sides], arena=True)
    winner = canary if prefers_canary else baseline
    store.decide_comparison(comparison, "AB"[sides.index(winner)])


@pytest.fixture
def canary(tmp_path, tiny_model_dir):
    registry = two_versions(tmp_path, tiny_model_dir)
    store = Store(tmp_path / "c.db")
    record_versions(store, registry)
    store.start_canary("v0001", "v0000", asdict(RULES))
    arena = Arena(store, registry, ServedVersion(registry), make_engine=lambda v: None)
    yield store, registry, arena
    store.close()


def feedback(store: Store) -> dict:
    return {t: store.row_counts()[t] for t in FEEDBACK_TABLES}


def test_votes_for_a_better_version_promote_it_and_touch_no_feedback_row(canary):
    store, registry, arena = canary
    rng = random.Random(0)
    for i in range(RULES.min_votes - 1):  # clearly better, but too few votes to judge
        vote(store, True, rng)
    before = feedback(store)
    assert arena.review() is None and registry.current_version() == "v0000"
    for i in range(10):
        vote(store, i % 5 != 0, rng)  # 80% for the canary
    before = feedback(store)
    ended = arena.review()
    assert ended["status"] == "promoted" and registry.current_version() == "v0001", ended
    assert ended["verdict"]["low"] >= 0.5 - RULES.margin and ended["verdict"]["votes"] == RULES.min_votes + 9
    assert feedback(store) == before  # the votes were read, not written
    assert store.running_canary() is None and store.canaries()[0]["status"] == "promoted"
    lineage = {v["version"]: v["lineage"] for v in store.model_versions()}["v0001"]
    assert lineage["canary"]["status"] == "promoted" and lineage["canary"]["baseline"] == "v0000"
    assert arena.review() is None  # ended once


def test_votes_against_a_worse_version_withdraw_it_and_the_current_one_stays(canary):
    store, registry, arena = canary
    rng = random.Random(1)
    for i in range(30):
        vote(store, i % 4 == 0, rng)  # 25% for the canary
    before = feedback(store)
    ended = arena.review()
    assert ended["status"] == "withdrawn" and "worse" in ended["reason"] and ended["verdict"]["high"] < 0.5, ended
    assert registry.current_version() == "v0000" and feedback(store) == before
    assert store.canaries()[0]["status"] == "withdrawn"


def test_an_undecided_canary_ends_when_its_vote_budget_is_spent(canary):
    store, registry, arena = canary
    rng = random.Random(2)
    for i in range(RULES.max_votes):  # 45%: not clearly worse, not clearly within the margin
        vote(store, i % 20 < 9, rng)
    ended = arena.review()
    assert ended["status"] == "withdrawn" and "undecided" in ended["reason"], ended
    assert registry.current_version() == "v0000"


def test_an_undecided_canary_ends_when_its_time_is_up(canary):
    store, registry, arena = canary
    assert arena.review() is None
    later = time.time() + 3600 * (RULES.max_hours + 1)
    ended = Arena(store, registry, ServedVersion(registry), make_engine=lambda v: None, clock=lambda: later).review()
    assert ended["status"] == "withdrawn" and "undecided" in ended["reason"]


def test_a_rollback_during_a_canary_withdraws_it(canary):
    store, registry, arena = canary
    shutil.copytree(registry.path("v0000"), registry.path("v0002"))
    (registry.path("v0002") / "meta.json").write_text(json.dumps({**registry.meta("v0000"), "version": "v0002"}))
    registry.rollback("v0002")
    ended = arena.review()
    assert ended["status"] == "withdrawn" and "changed to v0002" in ended["reason"]


@pytest.mark.parametrize("point,served", [("switching", "v0000"), ("recording", "v0001")])
def test_a_crash_while_a_canary_is_promoted_leaves_one_version_serving_and_the_canary_decided_later(
        canary, tmp_path, point, served):
    store, registry, arena = canary
    rng = random.Random(3)
    for _ in range(RULES.min_votes + 5):
        vote(store, True, rng)
    before = feedback(store)
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; from app.canary import Arena; from app.store import Store;"
            "from app.versions import ModelRegistry; r = ModelRegistry(sys.argv[3]);"
            "Arena(Store(sys.argv[2]), r, None, make_engine=None).review()")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "c.db"), str(registry.root)],
                          env={**os.environ, "TUTOR_FAILPOINT": point}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed mid-promotion
    assert registry.current_version() == served  # the pointer names one whole version, old or new
    assert store.running_canary()["version"] == "v0001" and feedback(store) == before
    ended = arena.review()  # after the restart: decided on the same votes, recorded once
    assert ended["status"] == "promoted" and registry.current_version() == "v0001"
    assert feedback(store) == before


def test_a_learner_decides_a_canary_through_the_api_blind(tmp_path, tiny_model_dir, serve_tutor):
    """A running app with a canary: a new conversation is answered by it, a two-answer comparison pairs it
    with the current version without saying which is which, the pick says, and the votes promote it."""
    from app.canary import ArenaConfig

    registry = two_versions(tmp_path, tiny_model_dir)
    rules = {**asdict(RULES), "min_votes": 8}
    with Store(tmp_path / "c.db") as store:
        record_versions(store, registry)
        store.start_canary("v0001", "v0000", rules)
    from app.engine import SamplingConfig

    from core.moderation import ModerationConfig

    # moderation off: the tiny model writes random tokens, which now and then trip the word list
    with serve_tutor(tmp_path, tiny_model_dir, sampling=SamplingConfig(max_new_tokens=6),
                     arena=ArenaConfig(review_every_s=0.0), moderation=ModerationConfig(enabled=False)) as (tutor, url):
        client = Client(url, verbose=False)
        deadline = time.time() + 60
        while time.time() < deadline:  # the canary's engine loads in the background
            conversation = client.predict("", "chat", api_name="/new_conversation")["conversation_id"]
            reply = client.predict(conversation, "Hello?", api_name="/chat")
            if reply["model_version"] == "v0001":
                break
            time.sleep(0.5)
        assert reply["model_version"] == "v0001", "a conversation in the canary's share is answered by it"
        from app.accounts import LOCAL

        conversation = client.predict("", "chat", api_name="/new_conversation")["conversation_id"]
        offered = tutor.service.compare(LOCAL, conversation, "Offered?", 2, offered=True)  # the app's own offer
        with Store(tmp_path / "c.db") as peek:
            asked = peek.comparison(offered["comparison_id"])["asked"]
            assert peek.comparison(offered["comparison_id"])["arena"]
        assert asked["mode"] == "arena" and asked["offered"] is True
        tutor.service.abandon(LOCAL, offered["comparison_id"])
        picks = []
        with Store(tmp_path / "c.db") as peek:  # the test's learner likes the canary's answers
            for i in range(8):
                conversation = client.predict("", "chat", api_name="/new_conversation")["conversation_id"]
                shown = client.predict(conversation, f"Question {i}?", 2, api_name="/compare")
                assert [c["model_version"] for c in shown["candidates"]] == [None, None]  # blind
                versions = {c["message_id"]: peek.message(c["message_id"])["model_version"] for c in shown["candidates"]}
                assert sorted(versions.values()) == ["v0000", "v0001"]
                assert peek.comparison(shown["comparison_id"])["asked"]["offered"] is False
                label = "AB"[[versions[c["message_id"]] for c in shown["candidates"]].index("v0001")]
                picks.append(client.predict(shown["comparison_id"], label, api_name="/pick"))
        assert all(p["versions"][("AB"[0])] in ("v0000", "v0001") for p in picks)  # revealed after the pick
        assert [p["canary"] for p in picks[:-1]] == [None] * 7 and picks[-1]["canary"]["status"] == "promoted"
        assert registry.current_version() == "v0001"
        deadline = time.time() + 30
        while client.predict(api_name="/status")["model_version"] != "v0001" and time.time() < deadline:
            time.sleep(0.3)
        assert client.predict(api_name="/status")["model_version"] == "v0001"
