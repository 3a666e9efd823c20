"""Feedback -> training data, on temporary databases filled through the Store's write methods."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.store import Store
from rlhf.data import (
    NotEnoughData, PreferenceGroup, TrainingData, check_enough, collect, export_jsonl,
    split_by_conversation, split_data, to_trl_records,
)

SYSTEM = "You are a patient tutor."


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "tutor.db") as s:
        yield s


def new_chat(store: Store, purpose: str = "chat") -> str:
    return store.new_conversation("ada", purpose, SYSTEM)


def context_for(store: Store, conversation_id: str, question: str) -> list[dict]:
    """What the service sends the model: system prompt, main line, the new user message."""
    turns = [{"role": m["role"], "content": m["content"]} for m in store.history(conversation_id)]
    return [{"role": "system", "content": SYSTEM}, *turns, {"role": "user", "content": question}]


def turn(store: Store, conversation_id: str, question: str, answer: str) -> str:
    return store.add_turn(conversation_id, question, answer, model_version="policy-0",
                          context=context_for(store, conversation_id, question))


def compare(store: Store, conversation_id: str, texts: list[str],
            question: str = "And 3 + 3?") -> tuple[str, list[str]]:
    return store.add_comparison(conversation_id, question,
                                context_for(store, conversation_id, question),
                                [{"text": t, "model_version": "policy-0"} for t in texts])


def text_pairs(group: PreferenceGroup) -> set[tuple[str, str]]:
    return {(group.completions[c], group.completions[r]) for c, r in group.pairs}


def test_ranking_of_three_gives_three_pairs_in_one_group(store: Store) -> None:
    conversation_id = new_chat(store)
    turn(store, conversation_id, "What is 2 + 2?", "4")
    comparison_id, _ = compare(store, conversation_id, ["a", "b", "c"])
    store.decide_comparison(comparison_id, "C,A,B")

    data = collect(store)
    assert data.n_pairs == 3 and len(data.preference_groups) == 1
    group = data.preference_groups[0]
    assert group.source == "ranking" and group.conversation_id == conversation_id
    assert text_pairs(group) == {("c", "a"), ("c", "b"), ("a", "b")}
    assert sorted(group.completions) == ["a", "b", "c"]  # each completion once
    assert group.prompt == store.comparison(comparison_id)["context"]
    assert group.prompt[-1] == {"role": "user", "content": "And 3 + 3?"}
    assert len(data.lineage()["picks"]) == 1
    assert data.demonstrations == []


def test_ranking_of_four_gives_six_pairs(store: Store) -> None:
    comparison_id, _ = compare(store, new_chat(store), ["a", "b", "c", "d"])
    store.decide_comparison(comparison_id, "D,B,A,C")
    (group,) = collect(store).preference_groups
    assert text_pairs(group) == {("d", "b"), ("d", "a"), ("d", "c"), ("b", "a"), ("b", "c"),
                                 ("a", "c")}


@pytest.mark.parametrize("choice,pairs", [
    ("D,B=A,C", {("d", "b"), ("d", "a"), ("d", "c"), ("b", "c"), ("a", "c")}),  # B and A share a place
    ("d=b, a=c", {("d", "a"), ("d", "c"), ("b", "a"), ("b", "c")}),
    ("C,A,B,D", {("c", "a"), ("c", "b"), ("c", "d"), ("a", "b"), ("a", "d"), ("b", "d")}),
])
def test_answers_that_share_a_place_in_a_ranking_make_no_pair(store: Store, choice: str, pairs) -> None:
    comparison_id, _ = compare(store, new_chat(store), ["a", "b", "c", "d"])
    store.decide_comparison(comparison_id, choice)
    (group,) = collect(store).preference_groups
    assert text_pairs(group) == pairs


def test_a_ranking_with_every_answer_in_one_place_is_a_tie_and_a_malformed_one_is_refused(store: Store) -> None:
    comparison_id, _ = compare(store, new_chat(store), ["a", "b", "c"])
    for bad in ("A=B", "A=A,B,C", "A,B=C=D", "A,,B=C", "=A,B,C", "A,B,C,"):
        with pytest.raises(ValueError, match="equally good"):
            store.decide_comparison(comparison_id, bad)
    store.decide_comparison(comparison_id, "A=B=C")
    assert store.comparison(comparison_id)["pick"]["choice"] == "tie" and collect(store).preference_groups == []


def test_winner_only_beats_each_other_candidate(store: Store) -> None:
    comparison_id, _ = compare(store, new_chat(store), ["a", "b", "c"])
    store.decide_comparison(comparison_id, "B")
    (group,) = collect(store).preference_groups
    assert text_pairs(group) == {("b", "a"), ("b", "c")}


@pytest.mark.parametrize("choice", ["tie", "both_bad"])
def test_tie_and_both_bad_alone_give_nothing(store: Store, choice: str) -> None:
    comparison_id, _ = compare(store, new_chat(store), ["a", "b"])
    store.decide_comparison(comparison_id, choice)
    data = collect(store)
    assert data.preference_groups == [] and data.demonstrations == []
    assert data.lineage() == {"ratings": [], "picks": [], "rewrites": []}


@pytest.mark.parametrize("rewritten", [0, 1])  # the active candidate A, or the inactive B
def test_both_bad_then_rewrite_beats_both(store: Store, rewritten: int) -> None:
    conversation_id = new_chat(store)
    comparison_id, ids = compare(store, conversation_id, ["a", "b"])
    store.decide_comparison(comparison_id, "both_bad")
    rewrite_id = store.add_rewrite(ids[rewritten], "better")

    data = collect(store)
    (group,) = data.preference_groups
    assert group.source == "rewrite"
    assert text_pairs(group) == {("better", "a"), ("better", "b")}
    assert group.prompt == store.comparison(comparison_id)["context"]
    (demo,) = data.demonstrations
    assert demo.completion == [{"role": "assistant", "content": "better"}]
    lineage = data.lineage()
    assert lineage["rewrites"] == [rewrite_id] and len(lineage["picks"]) == 1


def test_up_and_down_on_the_same_context_make_a_pair(store: Store) -> None:
    # Two conversations opening with the same question share the exact context.
    good = turn(store, new_chat(store), "What is 2 + 2?", "4, because 2 and 2 make 4.")
    bad = turn(store, new_chat(store), "What is 2 + 2?", "5")
    elsewhere = turn(store, new_chat(store), "What is 3 + 3?", "7")
    up, down = store.add_rating(good, "up"), store.add_rating(bad, "down", "wrong")
    store.add_rating(elsewhere, "down")  # another context: no partner

    data = collect(store)
    (group,) = data.preference_groups
    assert group.source == "rating"
    assert text_pairs(group) == {("4, because 2 and 2 make 4.", "5")}
    assert group.prompt == store.message(good)["context"] == store.message(bad)["context"]
    assert data.lineage()["ratings"] == [up, down]


def test_changed_vote_counts_only_the_latest(store: Store) -> None:
    first = turn(store, new_chat(store), "What is 2 + 2?", "4")
    second = turn(store, new_chat(store), "What is 2 + 2?", "four")
    store.add_rating(first, "up")
    store.add_rating(second, "down")
    latest = store.add_rating(second, "up")  # changed its mind: now both are good

    data = collect(store)
    assert data.preference_groups == []
    assert {d.message_id for d in data.demonstrations} == {first, second}
    assert latest in data.lineage()["ratings"]

    store.add_rating(first, "down")  # and back the other way for the first answer
    (group,) = collect(store).preference_groups
    assert text_pairs(group) == {("four", "4")}


def test_rewrite_beats_original_and_is_a_demonstration(store: Store) -> None:
    conversation_id = new_chat(store)
    reply = turn(store, conversation_id, "What is 2 + 2?", "4")
    store.add_rewrite(reply, "2 + 2 = 4.")
    latest = store.add_rewrite(reply, "Count two, then two more: 4.")

    data = collect(store)
    (group,) = data.preference_groups
    assert group.source == "rewrite"
    assert text_pairs(group) == {("Count two, then two more: 4.", "4")}
    (demo,) = data.demonstrations
    assert demo.source == "rewrite" and demo.message_id == reply
    assert demo.prompt == store.message(reply)["context"]
    assert demo.completion == [{"role": "assistant", "content": "Count two, then two more: 4."}]
    assert data.lineage()["rewrites"] == [latest]


def test_up_rated_answer_is_a_demonstration_on_its_exact_context(store: Store) -> None:
    conversation_id = new_chat(store)
    first = turn(store, conversation_id, "What is 2 + 2?", "4")
    second = turn(store, conversation_id, "Why?", "Two pairs make four.")
    store.add_rewrite(first, "It is 4.")  # after the second answer was written
    store.add_rating(second, "up")

    demos = [d for d in collect(store).demonstrations if d.source == "upvote"]
    (demo,) = demos
    assert demo.prompt == store.message(second)["context"]
    assert demo.prompt == [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": "What is 2 + 2?"},
                           {"role": "assistant", "content": "4"},  # what the model saw
                           {"role": "user", "content": "Why?"}]
    assert demo.completion == [{"role": "assistant", "content": "Two pairs make four."}]


def test_eval_conversations_contribute_nothing(store: Store) -> None:
    conversation_id = new_chat(store, "eval")
    reply = turn(store, conversation_id, "What is 2 + 2?", "4")
    store.add_rating(reply, "up")
    store.add_rewrite(reply, "Four.")
    comparison_id, _ = compare(store, conversation_id, ["a", "b", "c"])
    store.decide_comparison(comparison_id, "A,B,C")
    other = turn(store, new_chat(store, "eval"), "What is 2 + 2?", "5")
    store.add_rating(other, "down")

    data = collect(store)
    assert data.counts() == {"demonstrations": 0, "preference_groups": 0, "preference_pairs": 0,
                             "ppo_prompts": 0}
    assert data.lineage() == {"ratings": [], "picks": [], "rewrites": []}


def test_ppo_prompts_end_with_a_user_turn_and_include_earlier_turns(store: Store) -> None:
    conversation_id = new_chat(store)
    first = turn(store, conversation_id, "What is 2 + 2?", "4")
    store.add_rewrite(first, "It is 4.")
    comparison_id, _ = compare(store, conversation_id, ["x", "y"], question="And 3 + 3?")
    store.decide_comparison(comparison_id, "B")
    store.add_message(conversation_id, "user", "Thanks!")

    prompts = [p.prompt for p in collect(store).ppo_prompts]
    assert all(p[-1]["role"] == "user" and p[0]["role"] == "system" for p in prompts)
    assert prompts[-1] == [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": "What is 2 + 2?"},
                           {"role": "assistant", "content": "It is 4."},  # the rewrite
                           {"role": "user", "content": "And 3 + 3?"},
                           {"role": "assistant", "content": "y"},  # the winner
                           {"role": "user", "content": "Thanks!"}]
    assert [len(p) for p in prompts] == [2, 4, 6]


def ranked_conversations(store: Store, n: int) -> None:
    for i in range(n):
        conversation_id = new_chat(store)
        reply = turn(store, conversation_id, f"What is {i} + {i}?", str(2 * i))
        store.add_rating(reply, "up")
        comparison_id, _ = compare(store, conversation_id, [f"a{i}", f"b{i}", f"c{i}"])
        store.decide_comparison(comparison_id, "C,B,A")


def test_split_is_stable_and_keeps_conversations_and_groups_whole(store: Store) -> None:
    ranked_conversations(store, 40)
    data = collect(store)
    train, heldout = split_data(data, heldout_fraction=0.3)
    again = split_data(collect(store), heldout_fraction=0.3)
    assert (train, heldout) == again
    assert train.preference_groups and heldout.preference_groups
    assert train.n_pairs + heldout.n_pairs == data.n_pairs == 120

    def conversations(part: TrainingData) -> set[str]:
        return {item.conversation_id for item in
                [*part.demonstrations, *part.preference_groups, *part.ppo_prompts]}
    assert not conversations(train) & conversations(heldout)

    train_groups = {r["group_id"] for r in to_trl_records(train)["preference"]}
    heldout_groups = {r["group_id"] for r in to_trl_records(heldout)["preference"]}
    assert train_groups and heldout_groups and not train_groups & heldout_groups

    # The side depends on the conversation alone, so more feedback never moves one.
    ranked_conversations(store, 10)
    _, later_heldout = split_by_conversation(collect(store).preference_groups, 0.3)
    assert {g.group_id for g in heldout.preference_groups} <= {g.group_id for g in later_heldout}
    assert split_by_conversation(data.ppo_prompts, 0.0)[1] == []
    assert split_by_conversation(data.ppo_prompts, 1.0)[0] == []


def test_export_writes_jsonl_that_datasets_loads(store: Store, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ranked_conversations(store, 20)
    paths = export_jsonl(collect(store), tmp_path / "export", heldout_fraction=0.3)
    assert {"sft", "preference", "prompts", "sft_heldout", "preference_heldout",
            "prompts_heldout", "manifest"} <= set(paths)

    def load(name: str):
        return datasets.load_dataset("json", data_files=str(paths[name]), split="train",
                                     cache_dir=str(tmp_path / "cache"))
    sft, preference, prompts = load("sft"), load("preference"), load("prompts")
    assert set(sft.column_names) == {"prompt", "completion"}
    assert {"prompt", "chosen", "rejected", "group_id"} <= set(preference.column_names)
    assert prompts.column_names == ["prompt"]
    row = preference[0]
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["role"] == "user"
    assert load("preference_heldout").num_rows > 0

    manifest = json.loads(paths["manifest"].read_text())
    counts = manifest["train"]["counts"]
    assert counts["preference_pairs"] == preference.num_rows
    assert counts["ppo_prompts"] == len(prompts)
    assert len(manifest["train"]["lineage"]["picks"]) == counts["preference_groups"]


def test_not_enough_data_names_the_numbers(store: Store) -> None:
    comparison_id, _ = compare(store, new_chat(store), ["a", "b", "c"])
    store.decide_comparison(comparison_id, "A,B,C")
    data = collect(store)
    with pytest.raises(NotEnoughData) as error:
        check_enough(data)
    message = str(error.value)
    assert "need at least 20 preference pairs, have 3" in message
    assert "need at least 8 PPO prompts, have 1" in message and "\n" not in message
    check_enough(data, min_pairs=3, min_prompts=1)


def test_gate_prompts_never_reuse_a_trained_question_nor_the_test_part() -> None:
    import json as _json

    from core.chat_format import TUTOR_SYSTEM_PROMPT
    from rlhf.data import TUTORING_PROMPTS, PpoPrompt, TrainingData, gate_prompts, shipped_heldout_prompts

    shipped = shipped_heldout_prompts(TUTOR_SYSTEM_PROMPT)
    rows = [_json.loads(line) for line in TUTORING_PROMPTS.read_text().splitlines()]
    dev = {r["opener"] for r in rows if r["split"] == "heldout"}
    assert {p[-1]["content"] for p in shipped} == dev  # the dev part only: never "test", never "train"
    assert shipped == shipped_heldout_prompts(TUTOR_SYSTEM_PROMPT)  # a fixed order, cycle after cycle

    def prompt(text: str) -> list[dict]:
        return [{"role": "system", "content": TUTOR_SYSTEM_PROMPT}, {"role": "user", "content": text}]

    asked = shipped[0][-1]["content"]  # a class that happened to ask a shipped question trains on it
    train = TrainingData(ppo_prompts=[PpoPrompt(prompt(q), "c") for q in ["Q1?", "Q2?", asked.upper()]])
    heldout = TrainingData(ppo_prompts=[PpoPrompt(prompt(q), "h") for q in ["Q1?", "Q3?", "Q3?", "Q4?"]])
    chosen, own = gate_prompts(train, heldout, shipped, limit=10)
    texts = [p[-1]["content"] for p in chosen]
    assert texts[:2] == ["Q3?", "Q4?"] and own == 2  # the class's unseen ones first, each once
    assert len(chosen) == 10 and len(set(texts)) == 10 and asked not in texts and "Q1?" not in texts
    assert gate_prompts(train, heldout, [], limit=10) == ([prompt("Q3?"), prompt("Q4?")], 2)


def test_a_two_answer_order_is_stored_as_its_winner_so_rechecks_and_arena_votes_read_it(store: Store) -> None:
    comparison_id, _ = compare(store, new_chat(store), ["a", "b"])
    store.decide_comparison(comparison_id, "B,A")
    assert store.comparison(comparison_id)["pick"]["choice"] == "B"
    (group,) = collect(store).preference_groups
    assert text_pairs(group) == {("b", "a")}
