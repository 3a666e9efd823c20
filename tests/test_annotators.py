"""Feedback that no single account can steer (rlhf/annotators.py): exclusions, agreement, caps."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from app.store import Store
from rlhf.annotators import AnnotatorConfig, _cap_scales, pseudonym, weigh_annotators
from rlhf.data import collect
from rlhf.reward import RewardConfig, train_reward_model
from test_reward import FILLER, MARK, planted_groups

SYSTEM = "You are a patient tutor."
BAG = RewardConfig(form="bag_of_tokens", max_length=256)


def answer_pair(rng: random.Random) -> tuple[str, str]:
    """(the answer with MARK, one without), of equal length."""
    n = rng.randint(1, 3)
    plain = [rng.choice(FILLER) for _ in range(n)]
    marked = [rng.choice(FILLER) for _ in range(n)]
    marked[rng.randrange(n)] = MARK
    return " ".join(marked), " ".join(plain)


def pick(store: Store, user: str, n: int, honest: bool, rng: random.Random, rechecks: int = 0) -> None:
    """`n` two-answer comparisons by `user`, each in a conversation of its own; an honest user picks
    the answer with MARK, a dishonest one the other. `rechecks` of them are asked again (order
    flipped) and answered consistently, as a careful (or a careful hostile) user would."""
    for i in range(n):
        conversation = store.new_conversation(user, "chat", SYSTEM)
        message = f"Question {rng.randrange(10**6)} from {user}: can you help me?"
        context = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}]
        good, bad = answer_pair(rng)
        order = [good, bad] if rng.random() < 0.5 else [bad, good]
        comparison, _ = store.add_comparison(conversation, message, context, [{"text": t} for t in order])
        choice = "AB"[order.index(good if honest else bad)]
        store.decide_comparison(comparison, choice)
        if i < rechecks:
            assert store.add_repeat_check(comparison, user, choice)


@pytest.fixture()
def poisoned(tmp_path: Path) -> Store:
    """Four honest learners with 12 picks each and one account with 48, every one inverted."""
    rng = random.Random(7)
    store = Store(tmp_path / "poisoned.db")
    for user in ("ada", "ben", "cai", "dev"):
        pick(store, user, 12, honest=True, rng=rng, rechecks=6)
    pick(store, "mallory", 48, honest=False, rng=rng, rechecks=8)
    yield store
    store.close()


def test_one_account_inverting_half_the_comparisons_is_left_out_and_the_reward_model_holds(
        poisoned, tiny_model_dir):
    data = collect(poisoned)
    assert sum(len(g.pairs) for g in data.preference_groups if g.user == "mallory") == data.n_pairs / 2
    weighted, report = weigh_annotators(data, poisoned.training_exclusions(), poisoned.repeat_checks(),
                                        AnnotatorConfig())
    mallory = report["users"][pseudonym("mallory")]
    # Her repeat checks agree with herself, so it is her peers who catch her.
    assert mallory["repeat_agreement"] == "8/8" and "left_out" in mallory and "peers" in mallory["left_out"]
    assert any(e["target"] == pseudonym("mallory") for e in report["left_out"])
    assert not any(g.user == "mallory" for g in weighted.preference_groups)
    for honest in ("ada", "ben", "cai", "dev"):
        assert report["users"][pseudonym(honest)]["weight"] > 0.5, report["users"]
    assert "mallory" not in str(report), "the report names an account"

    heldout = planted_groups(24, seed=3)  # ranked the honest way
    defended = train_reward_model(tiny_model_dir, weighted.preference_groups, heldout, BAG)
    undefended = train_reward_model(tiny_model_dir, data.preference_groups, heldout, BAG)
    assert defended.metrics["heldout_accuracy"] >= 0.85, defended.metrics
    assert defended.metrics["heldout_loss"] < 0.25, defended.metrics
    # Without the defence the same data is half cancelled: a near-flat reward whose Bradley-Terry
    # loss on the honest held-out ranking stays near chance's ln 2 = 0.69.
    assert undefended.metrics["heldout_loss"] > 0.45, undefended.metrics


def test_a_random_clicker_fails_their_repeat_checks_and_is_left_out(tmp_path):
    rng = random.Random(3)
    with Store(tmp_path / "t.db") as store:
        for user in ("ada", "ben", "cai"):
            pick(store, user, 10, honest=True, rng=rng, rechecks=6)
        for i in range(10):  # a clicker: picks at random, and answers the recheck the other way
            pick(store, "rex", 1, honest=rng.random() < 0.5, rng=rng)
        for row in store.training_comparisons():
            if row["user"] == "rex" and len(store.repeat_checks()) < 18 + 8:
                store.add_repeat_check(row["comparison_id"], "rex", "B" if row["choice"] == "A" else "A")
        _, report = weigh_annotators(collect(store), [], store.repeat_checks(), AnnotatorConfig())
    rex = report["users"][pseudonym("rex")]
    assert rex["repeat_agreement"] == "0/8" and "repeat" in rex["left_out"], rex
    assert "left_out" not in report["users"][pseudonym("ada")]


def test_honest_learners_with_a_taste_words_cannot_show_are_not_left_out_by_their_peers(tmp_path):
    """Learners who prefer answers whose words are in alphabetical order (a taste about order, like one
    about length or substance, that a bag of words cannot read): the peer model predicts nobody, so
    it must not call all of them random clickers. Their own repeat checks still count."""
    rng = random.Random(11)
    words = [f"w{i:02d}" for i in range(40)]
    with Store(tmp_path / "t.db") as store:
        for user in ("ada", "ben", "cai", "dev"):
            for _ in range(30):
                conversation = store.new_conversation(user, "chat", SYSTEM)
                message = f"Question {rng.randrange(10**6)}?"
                context = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}]
                drawn = [rng.sample(words, 5) for _ in range(2)]
                ordered, shuffled = " ".join(sorted(drawn[0])), " ".join(drawn[1])
                texts = [ordered, shuffled] if rng.random() < 0.5 else [shuffled, ordered]
                comparison, _ = store.add_comparison(conversation, message, context, [{"text": t} for t in texts])
                right = texts.index(ordered) if rng.random() > 0.2 else 1 - texts.index(ordered)
                store.decide_comparison(comparison, "AB"[right])
        weighted, report = weigh_annotators(collect(store), [], store.repeat_checks(), AnnotatorConfig())
    assert report["peer_check"]["counted"] is False and report["peer_check"]["median_agreement"] < 0.6, report
    assert not report["left_out"] and len(weighted.preference_groups) == 120, report["users"]


def test_with_the_peer_check_off_an_honest_learner_below_half_by_chance_stays_in():
    """13 of 37 pairs predicted (a final run's honest learner, with a peer model that reads the taste no better
    than chance): below one half, but not beyond chance; 2 of 48 (an inverter) is."""
    from rlhf.annotators import _peers_against

    assert _peers_against({"honest": (13, 37), "mallory": (2, 48), "few": (0, 5)}, AnnotatorConfig()) == {"mallory": (2, 48)}


def test_random_clickers_who_switch_the_peer_check_off_do_not_shelter_an_inverter(tmp_path):
    """Four honest learners, a consistent inverter who passes her own repeat checks, and eight accounts that
    click at random: the peers' median falls below the line, yet the inverter is still left out."""
    rng = random.Random(7)
    with Store(tmp_path / "t.db") as store:
        for user in ("ada", "ben", "cai", "dev"):
            pick(store, user, 12, honest=True, rng=rng, rechecks=6)
        pick(store, "mallory", 48, honest=False, rng=rng, rechecks=8)
        for n in range(8):
            for _ in range(12):
                pick(store, f"rex{n}", 1, honest=rng.random() < 0.5, rng=rng)
        _, report = weigh_annotators(collect(store), [], store.repeat_checks(), AnnotatorConfig())
    assert report["peer_check"]["counted"] is False, report["peer_check"]
    mallory = report["users"][pseudonym("mallory")]
    assert mallory["repeat_agreement"] == "8/8" and "peers" in mallory.get("left_out", ""), mallory
    assert all("left_out" not in report["users"][pseudonym(u)] for u in ("ada", "ben", "cai", "dev"))


def test_one_users_share_of_pairs_and_demonstrations_is_capped(tmp_path):
    rng = random.Random(5)
    with Store(tmp_path / "t.db") as store:
        for user in ("ada", "ben", "cai"):
            pick(store, user, 4, honest=True, rng=rng)
        pick(store, "zoe", 40, honest=True, rng=rng)  # honest, but far more than anyone else
        for user, n in (("ada", 2), ("ben", 2), ("cai", 2), ("zoe", 30)):
            for _ in range(n):
                conversation = store.new_conversation(user, "chat", SYSTEM)
                question = f"Question {rng.random()}?"
                store.add_message(conversation, "user", question)
                reply = store.add_message(conversation, "assistant", rng.choice(FILLER),
                                          context=[{"role": "system", "content": SYSTEM},
                                                   {"role": "user", "content": question}])
                store.add_rewrite(reply, MARK + " " + rng.choice(FILLER))
        data = collect(store)
    config = AnnotatorConfig(max_user_share=0.25)
    weighted, report = weigh_annotators(data, [], [], config)
    mass = {}
    for g in weighted.preference_groups:
        mass[g.user] = mass.get(g.user, 0.0) + g.weight
    assert mass["zoe"] / sum(mass.values()) == pytest.approx(0.25, abs=0.02), mass
    assert all(mass[u] == pytest.approx(mass["ada"]) for u in ("ben", "cai")), "the others keep theirs"
    demos = [d.user for d in weighted.demonstrations]
    assert demos.count("zoe") / len(demos) <= 0.26 and demos.count("ada") == 2, demos
    assert demos.count("zoe") >= 1, "the cap trims a user's share; it does not silence them"
    assert report["users"][pseudonym("zoe")]["demonstrations_dropped_by_cap"] > 0


def test_cap_scales_water_fill():
    scales = _cap_scales({"m": 50.0, "a": 12.5, "b": 12.5, "c": 12.5, "d": 12.5}, 0.25)
    assert scales["m"] == pytest.approx(1 / 3) and scales["a"] == 1.0
    assert _cap_scales({"m": 50.0, "a": 50.0}, 0.25) == {"m": 1.0, "a": 1.0}  # two users: equal is all
    assert _cap_scales({"": 80.0}, 0.25) == {"": 1.0}  # one (local) user: nothing to cap against


def test_a_teachers_exclusions_leave_out_a_user_and_a_conversation_with_the_reason(tmp_path):
    rng = random.Random(9)
    with Store(tmp_path / "t.db") as store:
        for user in ("ada", "ben", "cai"):
            pick(store, user, 3, honest=True, rng=rng)
        one_of_ben = next(r["conversation_id"] for r in store.training_comparisons() if r["user"] == "ben")
        store.add_exclusion("user", "ada", "copied answers", "tess")
        store.add_exclusion("conversation", one_of_ben, "", "tess")
        weighted, report = weigh_annotators(collect(store), store.training_exclusions(), [],
                                            AnnotatorConfig())
    users = [g.user for g in weighted.preference_groups]
    assert "ada" not in users and users.count("ben") == 2 and users.count("cai") == 3
    assert one_of_ben not in {g.conversation_id for g in weighted.preference_groups}
    reasons = {e["target"]: e for e in report["left_out"]}
    assert "copied answers" in reasons[pseudonym("ada")]["reason"] and reasons[pseudonym("ada")]["items"] == 3
    assert reasons[one_of_ben]["items"] == 1


def test_without_accounts_the_local_users_data_is_untouched(tmp_path):
    rng = random.Random(2)
    with Store(tmp_path / "t.db") as store:
        pick(store, "", 10, honest=True, rng=rng)
        data = collect(store)
    weighted, report = weigh_annotators(data, [], [], AnnotatorConfig())
    assert [g.weight for g in weighted.preference_groups] == [g.weight for g in data.preference_groups]
    assert report["left_out"] == []
