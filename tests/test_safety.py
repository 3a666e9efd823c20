"""Safe for young learners: moderation of inputs and replies, redaction, consent, export and delete.

Moderation is checked on the `dev` split of core/assets/unsafe_requests.jsonl only: the `final` split is
for bench/bench_moderation.py's report, and no test or setting reads it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.accounts import Accounts
from app.engine import SamplingConfig
from app.quotas import QuotaConfig
from app.service import UserError
from app.store import Store
from core.moderation import OUTPUT_REPLACEMENT, Moderator, Verdict, refusal
from core.privacy import personal_details, redact
from rlhf.data import collect, export_jsonl

ROOT = Path(__file__).resolve().parents[1]
UNSAFE = [json.loads(line) for line in open(ROOT / "core/assets/unsafe_requests.jsonl")]
DEV = [row for row in UNSAFE if row["split"] == "dev"]


def lessons() -> list[str]:
    prompts = [json.loads(line) for line in open(ROOT / "rlhf/assets/tutoring_prompts.jsonl")]
    return [p["opener"] for p in prompts] + [p["follow_up"] for p in prompts if p.get("follow_up")]


# -- moderation ------------------------------------------------------------------------------------
def test_the_shipped_unsafe_requests_are_flagged_and_no_lesson_is():
    moderator = Moderator()
    missed = [row["text"] for row in DEV if not moderator.check(row["text"]).flagged]
    assert not missed, missed
    assert {row["category"] for row in DEV} == {"profanity", "sexual", "self_harm", "violence", "drugs", "hate"}
    flagged = [text for text in lessons() if moderator.check(text).flagged]
    assert not flagged, flagged


def test_words_a_lesson_needs_and_disguised_swearing():
    moderator = Moderator()
    for text in ("Why did one murder start a whole war?", "How did Hitler come to power?",
                 "Which organ pumps blood?", "Count from 1 to 10 in Python", "These tones are killing me",
                 "My name is Zorblax. Can you explain what a fraction is?"):
        assert not moderator.check(text).flagged, text
    for text in ("this is sh1t", "f*ck fractions", "you are a stupid idiot"):
        assert moderator.check(text).flagged, text


def test_the_fast_word_set_finds_exactly_what_better_profanity_finds():
    """Moderation swaps the library's slow list for a compiled pattern; on lessons, the dev requests,
    every listed word in a random spelling and random noise, both must flag the same texts."""
    import random

    from better_profanity import Profanity

    from core.moderation import LESSON_WORDS

    library = Profanity()
    library.load_censor_words(whitelist_words=list(LESSON_WORDS))
    fast = Moderator()._words
    rng = random.Random(0)
    spelled = []
    for entry in rng.sample(library.CENSOR_WORDSET, 120):
        word = "".join(rng.choice(spellings) for spellings in entry._char_combos)
        spelled.append(f"well {word}, said the {rng.choice(['cat', 'teacher', 'robot'])}")
    noise = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz@$*1340 .,") for _ in range(40)) for _ in range(150)]
    texts = lessons()[:120] + [row["text"] for row in DEV] + spelled + noise
    disagree = [t for t in texts if fast.contains_profanity(t) != library.contains_profanity(t)]
    assert not disagree, disagree[:5]
    assert sum(library.contains_profanity(t) for t in spelled) >= 100  # the spellings really are caught


def test_a_refusal_is_kind_names_no_rule_and_points_a_child_at_risk_to_an_adult():
    self_harm = refusal(Verdict(True, "self_harm", "topics"))
    assert "trusted adult" in self_harm
    other = refusal(Verdict(True, "violence", "topics"))
    for text in (self_harm, other):
        assert not any(word in text.lower() for word in ("violence", "pattern", "rule", "filter", "topics"))
    assert not Moderator().check(OUTPUT_REPLACEMENT).flagged and not Moderator().check(self_harm).flagged


@pytest.fixture()
def tutor(serve_tutor, tiny_model_dir, tmp_path):
    with serve_tutor(tmp_path, tiny_model_dir, sampling=SamplingConfig(max_new_tokens=8),
                     quotas=QuotaConfig(enabled=False)) as (tutor, _):
        with Store(tmp_path / "c.db") as store:
            Accounts(store).add("ada", "learner", "correct horse battery")
        yield tutor


def actor(tutor, name="ada"):
    return tutor.service.accounts.get(name)


def test_an_unsafe_input_never_reaches_the_model_nor_training_data(tutor, monkeypatch):
    service, ada = tutor.service, actor(tutor)
    conversation = service.new_conversation(ada, "", "chat")["conversation_id"]
    submitted = []
    original = service._submit
    monkeypatch.setattr(service, "_submit", lambda actor_, kind, messages, *a, **kw:
                        submitted.append(messages) or original(actor_, kind, messages, *a, **kw))
    unsafe = "how do I make a bomb"
    reply = list(service.chat(ada, conversation, unsafe))[-1]
    assert reply["text"] == refusal(Moderator().check(unsafe)) and not submitted
    with pytest.raises(UserError, match="can't help"):
        service.compare(ada, conversation, unsafe, 2)
    assert not submitted
    # The next turn's context does not carry the unsafe message either.
    list(service.chat(ada, conversation, "What is a fraction?"))
    assert all(unsafe not in m["content"] for m in submitted[-1])
    flagged = [m for m in service.store.user_data("ada")[0]["messages"] if m["flag"]]
    assert flagged and all(not m["active"] for m in flagged) and unsafe in {m["content"] for m in flagged}
    service.rate(ada, reply["message_id"], "up", "")  # even an up-vote of the refusal teaches nothing
    data = collect(service.store)
    assert unsafe not in json.dumps([*data.demonstrations, *data.preference_groups, *data.ppo_prompts],
                                    default=lambda o: o.__dict__)


def test_an_unsafe_reply_is_replaced_stored_flagged_and_never_trained_on(tutor, monkeypatch):
    service, ada = tutor.service, actor(tutor)
    conversation = service.new_conversation(ada, "", "chat")["conversation_id"]
    # Every reply of the tiny model is "unsafe": whatever the model writes, moderation stops it.
    asked, better, then = "What is gravity?", "Gravity pulls things towards each other.", "And why not float?"
    monkeypatch.setattr(service.moderator, "check", lambda text: Verdict(False) if text in (asked, better, then)
                        else Verdict(True, "violence", "topics"))
    chunks = list(service.chat(ada, conversation, asked))
    assert all(c["text"] == OUTPUT_REPLACEMENT for c in chunks if c["done"])
    assert not any(c["text"] not in ("", OUTPUT_REPLACEMENT) for c in chunks), "an unsafe chunk was shown"
    reply = chunks[-1]["message_id"]
    stored = service.store.message(reply)
    assert stored["content"] == OUTPUT_REPLACEMENT and stored["flag"].startswith("unsafe_reply")
    service.rate(ada, reply, "up", "")
    service.rewrite(ada, reply, better)
    result = service.compare(ada, conversation, then, 2)
    assert all(c["text"] == OUTPUT_REPLACEMENT for c in result["candidates"])
    service.pick(ada, result["comparison_id"], "A")
    data = collect(service.store)
    assert not data.demonstrations and not data.preference_groups, data
    assert service.recheck(ada) is None, "a comparison of replaced answers was asked again"


# -- privacy ---------------------------------------------------------------------------------------
PERSONAL = {
    "email me at ada.l@example.com please": "email",
    "or write to ada at example dot com": "email",
    "my phone is 07700 900123": "phone",
    "call +1 212 555 0188 after school": "phone",
    "I live at 12 Baker Street": "address",
    "my postcode is NW1 6XE": "postalcode",
    "Hi, my name is Ada Lovelace": "name",
    "see https://example.com/ada": "url",
}


@pytest.mark.parametrize("text", PERSONAL)
def test_personal_details_are_redacted(text):
    kind = PERSONAL[text]
    assert kind in personal_details(text)
    out = redact(text)
    assert "{{" + kind.upper() in out, out
    for secret in ("ada.l@", "900123", "555 0188", "Baker", "NW1", "Lovelace", "example.com/ada"):
        assert secret not in out


def test_lessons_pass_through_redaction_unchanged():
    changed = [text for text in lessons() if redact(text) != text]
    assert not changed, changed


def test_training_data_and_exports_hold_no_personal_details(tutor, tmp_path):
    service, ada = tutor.service, actor(tutor)
    conversation = service.new_conversation(ada, "", "chat")["conversation_id"]
    reply = list(service.chat(ada, conversation, "My email is ada.l@example.com, what is a noun?"))[-1]
    service.rewrite(ada, reply["message_id"], "Thanks! I wrote to ada.l@example.com. A noun names a thing.")
    data = collect(service.store)
    assert data.demonstrations and "ada.l@example.com" not in json.dumps(
        [*data.demonstrations, *data.preference_groups, *data.ppo_prompts], default=lambda o: o.__dict__)
    paths = export_jsonl(data, tmp_path / "export")
    assert all("ada.l@" not in p.read_text() for p in paths.values())
    assert "ada.l@" not in json.dumps(service.export_data(ada))
    # The learner's own chat still shows what they wrote: the tutor may use it in the conversation.
    assert "ada.l@example.com" in service.history(ada, conversation)[0]["content"]


# -- consent ---------------------------------------------------------------------------------------
def test_a_learner_who_declines_can_chat_and_nothing_of_theirs_is_trained_on(tutor):
    service, ada = tutor.service, actor(tutor)
    assert service.consent(ada) is None  # the notice is shown on first use
    service.set_consent(ada, "declined")
    conversation = service.new_conversation(ada, "", "chat")["conversation_id"]
    reply = list(service.chat(ada, conversation, "What is a verb?"))[-1]
    assert reply["text"]
    service.rewrite(ada, reply["message_id"], "A verb is a doing word.")
    service.rate(ada, reply["message_id"], "up", "")
    data = collect(service.store)
    assert not data.demonstrations and not data.preference_groups and not data.ppo_prompts
    service.set_consent(ada, "given")
    assert collect(service.store).demonstrations


# -- delete ----------------------------------------------------------------------------------------
def file_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))  # the DB, its WAL and SHM


def test_deleted_text_is_gone_from_the_file_the_exports_and_the_next_cycle(tutor, tmp_path):
    service, ada = tutor.service, actor(tutor)
    db = Path(tutor.config.db)
    secret = "Zyxwvut-marker-42"
    kept = service.new_conversation(ada, "", "chat")["conversation_id"]
    list(service.chat(ada, kept, "What is a noun?"))
    gone = service.new_conversation(ada, "", "chat")["conversation_id"]
    reply = list(service.chat(ada, gone, f"My secret word is {secret}."))[-1]
    service.rewrite(ada, reply["message_id"], f"Your word {secret} is safe with me.")
    service.rate(ada, reply["message_id"], "down", f"it repeated {secret}")
    service.store.add_model_version("v0001", "policy", "models/v0001",
                                    lineage={"feedback_rows": collect(service.store).lineage()})
    assert secret.encode() in file_bytes(db)

    result = service.delete_conversation(ada, gone)
    assert result["deleted_feedback"] == 2
    assert secret.encode() not in file_bytes(db), "the text survives in the file's free pages or WAL"
    assert secret not in json.dumps(service.export_data(ada))
    assert secret not in json.dumps(collect(service.store), default=lambda o: o.__dict__)
    with pytest.raises(UserError, match="no conversation"):
        service.history(ada, gone)
    assert service.history(ada, kept)  # the other conversation stays
    version = next(v for v in service.store.model_versions("policy") if v["version"] == "v0001")
    assert version["lineage"].get("trained_on_deleted"), version["lineage"]


def test_deleting_all_of_a_learners_data(tutor):
    service, ada = tutor.service, actor(tutor)
    for text in ("What is a noun?", "What is a verb?"):
        conversation = service.new_conversation(ada, "", "chat")["conversation_id"]
        list(service.chat(ada, conversation, text))
    result = service.delete_user_data(ada)
    assert result["deleted_conversations"] == 2
    assert service.export_data(ada) == [] and service.conversations(ada) == []


def test_a_reply_never_carries_control_characters():
    """A model that samples a NUL or a bell still writes only text a learner can read and send back."""
    from types import SimpleNamespace

    from app.service import _decode

    request = SimpleNamespace(tokenizer=SimpleNamespace(decode=lambda tokens, skip_special_tokens: " a\x00b\x07c\nd\te "))
    assert _decode(request, [1, 2]) == "abc\nd\te"
