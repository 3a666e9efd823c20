"""Bradley-Terry ratings of versions: a hand-computed fit, ties, bootstrap intervals, and style control."""
import math
import random

import pytest

from core.arena import ELO_SCALE, Vote, fit, ratings, style_of


def test_the_fit_recovers_a_hand_computed_example():
    """A beats B 3:1, B beats C 3:1, A beats C 9:1: exactly Bradley-Terry with theta = 2 ln 3, ln 3, 0."""
    votes = ([Vote("A", "B", "a")] * 3 + [Vote("A", "B", "b")] + [Vote("B", "C", "a")] * 3 + [Vote("B", "C", "b")]
             + [Vote("A", "C", "a")] * 9 + [Vote("A", "C", "b")])
    thetas, style = fit(votes, anchor="C")
    assert thetas["C"] == 0 and style == {}
    assert thetas["B"] == pytest.approx(math.log(3), abs=1e-3)
    assert thetas["A"] == pytest.approx(2 * math.log(3), abs=1e-3)
    # the same votes seen from the other side are the same evidence
    flipped = [Vote(v.b, v.a, {"a": "b", "b": "a"}[v.winner]) for v in votes]
    assert fit(flipped, anchor="C")[0]["A"] == pytest.approx(thetas["A"], abs=1e-3)


def test_a_tie_counts_half_a_win_each_way():
    thetas, _ = fit([Vote("A", "B", "a"), Vote("A", "B", "tie"), Vote("A", "B", "tie"), Vote("A", "B", "b")])
    assert thetas["B"] == pytest.approx(0.0, abs=1e-6)
    # 1 win + 2 half wins of 4: a rate of 1/2; 3 wins and a tie: 3.5 / 4
    thetas, _ = fit([Vote("A", "B", "a")] * 3 + [Vote("A", "B", "tie")], anchor="B")
    assert thetas["A"] == pytest.approx(math.log(3.5 / 0.5), abs=1e-3)


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_votes():
    rng = random.Random(0)

    def votes(n):  # B is better: wins 70% of its pairs with A
        return [Vote("A", "B", "b" if rng.random() < 0.7 else "a") for _ in range(n)]

    few, many = ratings(votes(40), bootstrap_samples=300), ratings(votes(640), bootstrap_samples=300)
    for r in (few, many):
        low, high = r.interval["B"]
        assert low <= r.elo["B"] <= high
    assert many.interval["B"][0] > 1000, "640 votes at 70% leave no doubt that B is better"
    width = lambda r: r.interval["B"][1] - r.interval["B"][0]  # noqa: E731
    assert width(many) < width(few) / 2.5  # ~ 1 / sqrt(16) of the width
    assert many.elo["B"] == pytest.approx(1000 + ELO_SCALE * math.log(0.7 / 0.3), abs=40)


def planted_length_votes(n: int, seed: int = 0) -> list[Vote]:
    """X and Y answer equally well, but X writes twice as long and voters favour the longer answer;
    Z is really better (at equal length it wins 75%)."""
    rng = random.Random(seed)
    votes = []
    quality = {"X": 0.0, "Y": 0.0, "Z": math.log(3)}
    length = {"X": 600, "Y": 300, "Z": 300}
    for _ in range(n):
        a, b = rng.sample(sorted(quality), 2)
        la, lb = (int(length[v] * rng.uniform(0.7, 1.3)) for v in (a, b))
        logit = quality[a] - quality[b] + 4.0 * (la - lb) / (la + lb)
        winner = "a" if rng.random() < 1 / (1 + math.exp(-logit)) else "b"
        votes.append(Vote(a, b, winner, {"length": la}, {"length": lb}))
    return votes


def test_style_control_removes_a_planted_length_preference():
    votes = planted_length_votes(3000)
    raw = ratings(votes, anchor="Y", bootstrap_samples=200)
    controlled = ratings(votes, anchor="Y", style_control=True, bootstrap_samples=200)
    assert raw.interval["X"][0] > 1000, "without control, the longer answers look better"
    low, high = controlled.interval["X"]
    assert low < 1000 < high, f"with control, X and Y are equal: {controlled.leaderboard()}"
    assert controlled.style["length"] == pytest.approx(4.0, abs=0.6)
    # a real difference survives the control
    assert controlled.interval["Z"][0] > 1000
    assert controlled.elo["Z"] == pytest.approx(1000 + ELO_SCALE * math.log(3), abs=50)


def test_style_features_of_an_answer():
    text = "# Fractions\n\nA fraction is a part.\n\n- one half\n- one third\n1. cut\n2) share\n"
    assert style_of(text) == {"length": len(text), "list_items": 4, "headers": 1}


def test_a_vote_needs_two_versions_and_a_known_winner():
    with pytest.raises(ValueError):
        Vote("A", "A", "a")
    with pytest.raises(ValueError):
        Vote("A", "B", "left")
    with pytest.raises(ValueError, match="two versions"):
        fit([])
