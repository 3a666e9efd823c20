"""Active comparisons (core/active.py): the committee's information, which answers it shows, the random
share that keeps the feedback unbiased, the committee file the server reads, and the service showing
and storing what was chosen."""
from __future__ import annotations

import random

import pytest
import torch

from core.active import (AskingConfig, Committee, CommitteeFile, choose_shown, most_informative,
                         offers_comparison, pair_information)

VOCAB = 12


def committee(*rows: list[float], length: float = 0.0) -> Committee:
    weights = torch.tensor([list(r) + [0.0] * (VOCAB - len(r)) for r in rows])
    return Committee(weights, torch.full((len(rows),), length), {"cycle": 1})


# Member 0 likes token 1, member 1 dislikes it; both like token 2 and dislike token 3.
SPLIT = committee([0.0, 3.0, 3.0, -3.0], [0.0, -3.0, 3.0, -3.0])


def test_members_that_agree_give_no_information_and_members_that_disagree_do():
    scores = SPLIT.scores([[2], [3], [1], [0]])  # answers: liked by both, disliked by both, split, neutral
    info = pair_information(scores)
    assert info[0, 1] < 0.01  # both members are sure the first answer wins: asking teaches nothing
    assert info[2, 3] > 0.4 and info[2, 3] == pytest.approx(info[3, 2])  # each sure, and they disagree
    assert info[2, 3] > 20 * info[0, 1] and torch.all(info.diagonal() == 0)
    assert set(most_informative(info, 2)) == {2, 3}


def test_answers_the_members_agree_on_are_never_shown_twice():
    same = committee([1.0, 1.0], [1.0, 1.0])
    for pool in ([[1], [1], [1], [1]], [[0], [1], [0, 1], [1, 1]]):
        for k in (2, 3, 4):
            chosen = most_informative(pair_information(same.scores(pool)), k)
            assert len(set(chosen)) == k, (pool, k, chosen)


def test_answers_moderation_stopped_are_shown_only_when_too_few_others_are_left():
    from types import SimpleNamespace

    from app.service import TutorService

    for random_share in (0.0, 1.0):
        ask = SimpleNamespace(asking=AskingConfig(mode="active", random_share=random_share), rng=random.Random(0))
        pool = [[1], [0], [2], [3]]
        for _ in range(20):
            shown = TutorService._ask(ask, SPLIT, pool, [None, "unsafe", None, "unsafe"], 2)["shown"]
            assert sorted(shown) == [0, 2]
            shown = TutorService._ask(ask, SPLIT, pool, ["unsafe", "unsafe", None, "unsafe"], 2)["shown"]
            assert 2 in shown and len(set(shown)) == 2


def test_scores_add_token_weights_and_length_and_ignore_ids_past_the_vocabulary(tmp_path):
    c = committee([1.0, 2.0], [0.5, 0.0], length=0.25)
    assert c.scores([[0, 1, 1], [VOCAB + 5]]).tolist() == [[5.75, 0.25], [1.25, 0.25]]
    binary = Committee(c.weights, c.length, c.meta, binary=True)  # the repeated token 1 counts once
    assert binary.scores([[0, 1, 1], [VOCAB + 5]]).tolist() == [[3.5, 0.25], [1.0, 0.25]]
    assert Committee.load(binary.save(tmp_path / "c.safetensors")).binary and not Committee.load(c.save(tmp_path / "d")).binary


def test_active_mode_shows_the_most_informative_answers_and_says_why():
    pool = [[2], [3], [1], [0], [2, 2], [3, 3]]
    config = AskingConfig(mode="active", random_share=0.0)
    shown, asked = choose_shown(SPLIT, pool, 2, config, random.Random(0))
    assert set(shown) == {2, 3}
    assert asked.mode == "active" and asked.pool == 6 and asked.information > 0.4 and asked.committee == {"cycle": 1}
    _, random_pick = choose_shown(SPLIT, pool, 2, AskingConfig(mode="active", random_share=1.0), random.Random(0))
    assert random_pick.mode == "random" and "random share" in random_pick.why


def test_a_share_of_active_asks_stays_random_so_the_feedback_is_an_unbiased_sample():
    pool = [[2], [3], [1], [0], [2, 2], [3, 3]]
    rng = random.Random(1)
    modes = [choose_shown(SPLIT, pool, 2, AskingConfig(mode="active", random_share=0.25), rng)
             for _ in range(800)]
    random_asks = [shown for shown, asked in modes if asked.mode == "random"]
    assert 0.20 < len(random_asks) / len(modes) < 0.30
    # the random ones are uniform over the pool: every answer shown about as often
    counts = [sum(i in shown for shown in random_asks) for i in range(len(pool))]
    assert min(counts) > 0.6 * max(counts), counts


def test_random_mode_and_no_committee_show_the_answers_as_sampled():
    pool = [[1], [0]]  # the members disagree on these: the record says so, but random mode shows them as they are
    shown, asked = choose_shown(SPLIT, pool, 2, AskingConfig(), random.Random(0))
    assert shown == [0, 1] and asked.mode == "random" and asked.why == "random mode" and asked.information > 0.4
    shown, asked = choose_shown(None, [[2], [3], [1], [0]], 2, AskingConfig(mode="active"), random.Random(0))
    assert len(shown) == 2 and asked.mode == "random" and asked.why == "no committee yet" and asked.information is None


def test_a_committee_at_chance_on_pairs_it_did_not_fit_is_not_asked():
    """Asking where a committee that knows nothing disagrees asks about its noise: random until it is credible."""
    pool = [[2], [3], [1], [0], [2, 2], [3, 3]]
    config = AskingConfig(mode="active", random_share=0.0)
    at_chance = Committee(SPLIT.weights, SPLIT.length, {**SPLIT.meta, "credible": False})
    for committee, mode in ((at_chance, "random"), (Committee(SPLIT.weights, SPLIT.length, {"credible": True}), "active"),
                            (SPLIT, "active")):  # a file from before the check: asked as before
        shown, asked = choose_shown(committee, pool, 2, config, random.Random(0))
        assert asked.mode == mode, (committee.meta, asked)
    assert "not yet above chance" in choose_shown(at_chance, pool, 2, config, random.Random(0))[1].why


@pytest.mark.parametrize("bad", [{"mode": "clever"}, {"pool_factor": 0}, {"pool_factor": 9}, {"pool_factor": 1.5},
                                 {"random_share": -0.1}, {"random_share": 2}, {"offer_share": 1.5},
                                 {"offer_gap": 0}, {"offer_gap": 2.5}])
def test_impossible_asking_settings_are_refused(bad):
    with pytest.raises(ValueError):
        AskingConfig(**bad)


def test_the_committee_file_is_read_again_when_a_cycle_replaces_it_and_a_damaged_one_means_random(tmp_path):
    path = tmp_path / "committee.safetensors"
    watched = CommitteeFile(path)
    assert watched.get() is None  # no cycle yet
    SPLIT.save(path)
    first = watched.get()
    assert torch.equal(first.weights, SPLIT.weights) and first.meta == {"cycle": 1}
    assert watched.get() is first  # unchanged: not read again
    newer = committee([1.0], [2.0], [3.0])
    newer = Committee(newer.weights, newer.length, {"cycle": 2})
    newer.save(path)
    assert watched.get().meta == {"cycle": 2} and watched.get().weights.shape[0] == 3
    assert not list(tmp_path.glob("*.tmp"))  # written whole, then renamed
    path.write_bytes(b"not a safetensors file at all")
    assert watched.get() is None and watched.error
    one = Committee(torch.zeros(1, VOCAB), torch.zeros(1), {})
    one.save(path)
    assert watched.get() is None and "two or more members" in watched.error


def test_an_active_comparison_shows_the_committees_most_informative_answers_and_stores_why(
        serve_tutor, tiny_model_dir, tmp_path, monkeypatch):
    import app.service as service_module
    from app.accounts import LOCAL
    from app.engine import SamplingConfig
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    weights = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    split = Committee(weights, torch.zeros(3), {"cycle": 7})
    seen = []

    def spy(committee, pool, k, config, rng):
        shown, asked = choose_shown(committee, pool, k, config, rng)
        seen.append((pool, shown, asked))
        return shown, asked

    monkeypatch.setattr(service_module, "choose_shown", spy)
    active = AskingConfig(mode="active", pool_factor=2, random_share=0.0)
    with serve_tutor(tmp_path, tiny_model_dir, asking=active, sampling=SamplingConfig(max_new_tokens=12)) as (tutor, _):
        service = tutor.service
        conversation = service.new_conversation(LOCAL, "", "chat")["conversation_id"]
        first = list(service.compare_stream(LOCAL, conversation, "What is a fraction?", 2))
        assert seen[-1][2].mode == "random" and seen[-1][2].why == "no committee yet"  # before any cycle
        assert len(seen[-1][0]) == 2 and len([c for c in first if not c["done"]]) > 0  # streamed as usual
        service.pick(LOCAL, first[-1]["comparison_id"], "A")

        split.save(tutor.registry.committee_path())  # a cycle has fitted a committee
        chunks = list(service.compare_stream(LOCAL, conversation, "And a decimal?", 2))
        pool, shown, asked = seen[-1]
        assert len(pool) == 4 and asked.mode == "active" and asked.pool == 4 and asked.committee == {"cycle": 7}
        information = pair_information(split.scores(pool))
        assert set(shown) == set(divmod(int(information.argmax()), 4))  # the most informative pair
        *waiting, last = chunks  # chosen once all four are complete: until then, empty answers
        assert last["done"] and all(not c["done"] and {x["text"] for x in c["candidates"]} == {""} for c in waiting)
        assert [x["message_id"] for c in waiting for x in c["candidates"]][:2] == [x["message_id"] for x in last["candidates"]]
        stored = tutor.store.comparison(chunks[-1]["comparison_id"])
        texts = {c["content"] for c in stored["candidates"]}
        decode = AutoTokenizer.from_pretrained(tiny_model_dir).decode  # as the service shows a reply
        assert texts == {service_module._CONTROL.sub("", decode(pool[i], skip_special_tokens=True)).strip()
                         for i in shown}
        assert stored["asked"]["mode"] == "active" and stored["asked"]["information"] == pytest.approx(
            float(information.max()), abs=1e-5)
        assert {c["text"] for c in chunks[-1]["candidates"]} == texts


def test_the_app_offers_a_comparison_on_its_share_of_turns_and_never_two_close_together():
    config, rng = AskingConfig(offer_share=0.25, offer_gap=3), random.Random(0)
    assert not any(offers_comparison(turns, config, rng) for turns in (0, 1, 2) for _ in range(300))
    share = sum(offers_comparison(3, config, rng) for _ in range(4000)) / 4000
    assert 0.22 < share < 0.28, share
    assert not any(offers_comparison(50, AskingConfig(offer_share=0.0), rng) for _ in range(300))


def test_the_service_offers_comparisons_only_to_learners_whose_feedback_is_used_and_stores_that_it_did(
        serve_tutor, tiny_model_dir, tmp_path):
    from app.accounts import LOCAL
    from app.engine import SamplingConfig
    from app.service import UserError

    always = AskingConfig(offer_share=1.0, offer_gap=2)
    with serve_tutor(tmp_path, tiny_model_dir, asking=always, sampling=SamplingConfig(max_new_tokens=6)) as (tutor, _):
        service = tutor.service
        ada = service.accounts.add("ada", "learner", "passw0rd-ada")
        ben = service.accounts.add("ben", "learner", "passw0rd-ben")
        conversation = service.new_conversation(ada, "", "chat")["conversation_id"]
        for question in ("What is a fraction?", "And a half?"):
            list(service.chat(ada, conversation, question))
        assert not service.offers_comparison(ada, conversation)  # she has not said her feedback may be used
        service.set_consent(ada, "declined")
        assert not service.offers_comparison(ada, conversation)
        service.set_consent(ada, "given")
        assert service.offers_comparison(ada, conversation)  # two turns since the start
        with pytest.raises(UserError):  # another learner's conversation is not his to ask about
            service.offers_comparison(ben, conversation)

        result = service.compare(ada, conversation, "And a third?", 2, offered=True)
        assert tutor.store.comparison(result["comparison_id"])["asked"]["offered"] is True
        service.pick(ada, result["comparison_id"], "A")
        assert not service.offers_comparison(ada, conversation)  # just compared: not again at once
        list(service.chat(ada, conversation, "And a quarter?"))
        assert not service.offers_comparison(ada, conversation)
        list(service.chat(ada, conversation, "And a fifth?"))
        assert service.offers_comparison(ada, conversation)

        asked = service.compare(ada, conversation, "And a sixth?", 2)  # the learner's own "Compare answers"
        assert tutor.store.comparison(asked["comparison_id"])["asked"]["offered"] is False
        service.abandon(ada, asked["comparison_id"])
        assert not service.offers_comparison(ada, conversation)  # a skipped one counts: not asked again at once

        for question in ("And a seventh?", "And an eighth?"):
            list(service.chat(ada, conversation, question))
        assert service.offers_comparison(ada, conversation)
        spent = service.quotas.config.per_minute["compare"] = 2  # she has compared twice this minute
        assert not service.offers_comparison(ada, conversation)  # her quota is spent: one answer, as asked
        assert service.quotas.allows(ada.name, "chat") and not service.quotas.allows(ada.name, "compare")
        service.quotas.config.per_minute["compare"] = spent + 1
        assert service.offers_comparison(ada, conversation)  # asking counted nothing


def test_the_offline_count_of_asking_rules_sees_which_pairs_the_rubric_tells_apart():
    from bench.asking_rules import tally

    # Both members rank answer 0 first and answer 3 last; the rubric passes answer 0 alone.
    sure = committee([3.0, 1.0, 0.5, -2.0], [2.5, 0.0, 1.0, -1.0])
    pools = [([1.0, 0.0, 0.0, 0.0], [[0], [1], [2], [3]])] * 3  # the first third only fits committees
    counts = tally(pools, [sure, sure])
    assert counts["best vs worst"] == (2, 2)  # 0 against 3: told apart, in both judged pools
    assert counts["random"] == (6, 12)  # 3 of each pool's 6 pairs hold answer 0
    assert counts["any"] == (2, 2)
    alike = [([0.0, 0.0, 0.0, 0.0], [[0], [1], [2], [3]])] * 3
    assert all(apart == 0 for apart, _ in tally(alike, [sure, sure]).values())
