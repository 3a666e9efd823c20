"""The simulated learner, its rubrics, and a short learning run on a tiny model.

The learner drives a real app through gradio_client; the tests then read the SQLite file to check it
wrote exactly the feedback it claims. The learning run goes through `launch.py` (serve and --retrain)
as the benchmark does, with a trivial rubric a tiny model can learn.
"""
from __future__ import annotations

import json
import random
import re
import sqlite3
from pathlib import Path

import pytest

from app.engine import SamplingConfig
from app.store import Store
from bench.learner import LABELS, FeedbackCounts, LearnerConfig, TutoringPrompt, collect_answers, decide, give_feedback, load_prompt_set
from bench.learning_metrics import distinct_n, repeated_ending_flags, wilson, win_rate
from bench.rubrics import (RUBRICS, SHIPPED, Rubric, checks_understanding, plain_words, reading_ease, stays_short,
                           uses_example)
from rlhf.data import collect
from tiny import learnable_policy

SKY = [{"role": "user", "content": "Why is the sky blue during the day?"}]
EXPLANATION = ("The sky looks blue because air scatters blue light more than red light. Sunlight holds every colour, "
               "and the short blue waves bounce around the most.")
# Distinct sentences on the topic, for answers of any length (a sentence said twice is degenerate).
MORE = ["At sunset the light crosses much more air, so the blue is scattered away before it reaches us.",
        "That is why evening skies glow orange and red instead of blue.",
        "Violet light scatters even more, but our eyes are less sensitive to violet than to blue.",
        "On the Moon there is no air, so its sky stays black even during the day.",
        "Clouds look white because their droplets scatter every colour of light about equally.",
        "Pilots flying very high see a darker blue sky, since less air sits above them.",
        "Scientists call this effect Rayleigh scattering, after the physicist who explained it.",
        "Dust and smoke in the air can change how the blue sky looks on some days.",
        "You can test the idea with a torch shining through a glass of water with a little milk in it.",
        "From the side the water looks bluish, and looking straight at the torch it looks orange.",
        "The same physics explains why distant mountains look slightly blue and hazy.",
        "Bright blue skies are often clearest after rain has washed the dust out of the air."]


def long_answer(sentences: int) -> str:
    return " ".join([EXPLANATION, *MORE[:sentences]])


# -- the prompt set ------------------------------------------------------------------------------

def test_prompt_set_covers_subjects_with_a_fixed_heldout_part():
    prompts = load_prompt_set()
    assert len(prompts) >= 300 and len({p.opener for p in prompts}) == len(prompts)
    subjects = {p.subject for p in prompts}
    assert {"arithmetic", "algebra", "science", "languages", "programming", "history", "study_skills"} <= subjects
    heldout = [p for p in prompts if p.split == "heldout"]  # the dev part: settings are chosen on it
    test = [p for p in prompts if p.split == "test"]  # only final reported runs ask these
    assert len(heldout) >= 100 and len(test) >= 40 and all(p.split in ("train", "heldout", "test") for p in prompts)
    assert sum(p.follow_up is not None for p in prompts) >= 50
    for subject in subjects:  # every subject is in every part
        assert {p.split for p in prompts if p.subject == subject} == {"train", "heldout", "test"}
    assert len({p.id for p in prompts}) == len(prompts)


# -- rubrics judge content ------------------------------------------------------------------------

def test_checks_understanding_wants_a_question_about_the_topic():
    assert checks_understanding(SKY, EXPLANATION + " Can you say why sunsets look red instead of blue?") == 1.0
    assert checks_understanding(SKY, EXPLANATION + " Any questions?") < 0.5  # a stock phrase
    assert checks_understanding(SKY, EXPLANATION) == 0.0
    assert checks_understanding(SKY, "Why is the sky blue?") == 0.0  # no explanation, only an echo
    assert checks_understanding(SKY, "") == 0.0


def test_uses_example_wants_detail_not_just_a_marker():
    detailed = EXPLANATION + " For example, at noon the sunlight crosses about 10 km of air, so blue light scatters everywhere."
    assert uses_example(SKY, detailed) == 1.0
    assert uses_example(SKY, EXPLANATION + " For example, yes.") < 0.5
    assert uses_example(SKY, EXPLANATION) == 0.0 and uses_example(SKY, "") == 0.0
    # numbers are not an example: without one, every answer scores the same (a learner's tie)
    numbers = EXPLANATION + " Blue light has a wavelength near 450 nm, red light near 700 nm."
    assert uses_example(SKY, numbers) == uses_example(SKY, EXPLANATION) == 0.0
    assert 0 < uses_example(SKY, EXPLANATION + " For example, yes.") < 0.5
    off_topic = "For example, I have 3 cats and 2 dogs at home in the garden."
    assert uses_example(SKY, off_topic) < 0.5


def test_stays_short_wants_a_short_finished_answer_on_the_topic():
    assert stays_short(SKY, EXPLANATION) == 1.0
    assert stays_short(SKY, "I like cats a lot, they are great pets.") == 0.0  # short but off the topic
    assert stays_short(SKY, "") == 0.0
    assert stays_short(SKY, EXPLANATION + " And the sky") < 0.5  # cut off mid-sentence
    assert 0 < stays_short(SKY, long_answer(12)) < stays_short(SKY, long_answer(6)) < 0.5
    assert stays_short(SKY, long_answer(6)) > stays_short(SKY, "The sky is blue because of light.")  # a one-liner


def test_plain_words_wants_easy_reading_with_substance():
    plain = ("The sky is blue because air bends blue light the most. Light from the sun has all the colours in it. "
             "Blue light bumps into bits of air and goes all over the sky, so we see blue from every side.")
    hard = ("Atmospheric molecules preferentially scatter shorter electromagnetic wavelengths, a phenomenon "
            "characterised by an inverse fourth-power dependence on wavelength. Consequently, diffuse "
            "illumination originating from the daytime atmosphere appears predominantly blue to human observers.")
    assert reading_ease(plain) > 70 > reading_ease(hard)
    assert plain_words(SKY, plain) == 1.0
    assert 0 <= plain_words(SKY, hard) < 0.5
    assert plain_words(SKY, "") == 0.0


# Answers that say nothing of their own. Each must fail every rubric: a rubric that a template passes
# teaches the policy the template (38 of one run's successes once rested on "such as" alone).
FRACTIONS = [{"role": "user", "content": "How do I add fractions with different denominators?"}]
DEGENERATE = {
    "stock phrase with a marker word": [(FRACTIONS, "For example, 1 fraction."), (FRACTIONS, "Fractions, such as 5."),
                                        (SKY, "For example, the sky. For instance, blue light. Imagine the sky.")],
    "stock question after an echo": [(SKY, "Why is the sky blue during the day? Can you tell me what you think about "
                                           "the blue sky and the day?")],
    "on-topic refusal": [(FRACTIONS, "I will not talk about fractions today."),
                         (SKY, "I can't explain why the sky is blue during the day. The blue sky is a topic for "
                               "another lesson, so let us pick something else, maybe maths or reading or history.")],
    "one-line answer": [(SKY, "The sky is blue because air scatters the short blue waves of sunlight the most.")],
    "repeated sentence": [(SKY, "The sky is blue because air scatters blue light, for example 3 times more. " * 3),
                          (FRACTIONS, "Fractions need a common denominator, for example 4 for halves and quarters. " * 4)],
    "a topic word in generic encouragement": [(FRACTIONS, "Fractions are a great thing to learn. Keep trying hard every "
                                                          "single day. Practice makes perfect, and you will get there!")],
}


def test_no_degenerate_answer_passes_any_rubric():
    for rubric in RUBRICS.values():
        if rubric.name == "random":
            continue
        for kind, cases in DEGENERATE.items():
            for dialogue, answer in cases:
                assert not rubric.success(dialogue, answer), (rubric.name, kind, answer)


def test_every_shipped_rubric_can_be_passed():
    """The degenerate test above must not pass by a rubric that nothing passes."""
    good = {"stays_short": EXPLANATION, "plain_words": ("The sky is blue because air bends blue light the most. Light "
                                                        "from the sun has all the colours in it. Blue light bumps into "
                                                        "bits of air and goes all over, so we see blue on every side."),
            "uses_example": EXPLANATION + " For example, at noon the sunlight crosses about 10 km of air, so blue "
                                          "light scatters everywhere."}
    assert set(good) == set(SHIPPED)
    for name, answer in good.items():
        assert RUBRICS[name].success(SKY, answer), name


def test_rewrites_turn_failing_answers_into_passing_ones():
    rng = random.Random(0)
    long = long_answer(8)
    # plain sentences between two hard ones: the rewrite drops the hard ones
    mixed = ("Atmospheric molecules preferentially scatter shorter electromagnetic wavelengths, a phenomenon "
             "characterised by an inverse dependence on wavelength. The sky is blue because air bends blue light "
             "the most. Light from the sun has all the colours in it. Consequently, diffuse illumination originating "
             "from the daytime atmosphere appears predominantly blue. Blue light bumps into bits of air and goes all "
             "over the sky, so we see blue from every side.")
    for name, failing in (("checks_understanding", long), ("uses_example", long), ("stays_short", long),
                          ("plain_words", mixed)):
        rubric = RUBRICS[name]
        assert not rubric.success(SKY, failing), name  # the rewrite has something to fix
        better = rubric.rewrite(SKY, failing, ["sky", "light", "scatter"], rng)
        assert better and rubric.success(SKY, better), (name, better)
        assert not re.search(r"[.!?,;:]\.|\s\.", better), (name, better)  # no "blue.." or "the ." endings


def test_decide_orders_by_score_with_ties_and_mistakes():
    rng = random.Random(0)
    assert decide([0.0, 0.0, 0.0, 0.0], 0.0, rng) == "tie"
    assert decide([0.0, 1.0], 0.0, rng) == "B"
    assert decide([0.0, 1.0, 0.0, 0.0], 0.0, rng) == "B"  # the winner beats each of the others
    assert decide([0.2, 1.0, 0.0, 0.1], 0.0, rng) == "B,A,D,C"
    # answers equally good share a place: no coin-flip pair between them
    assert decide([1.0, 0.45, 0.0, 0.45], 0.0, rng) in ("A,B=D,C", "A,D=B,C")
    assert decide([0.5, 0.5, 0.0, 0.0], 0.0, rng) in ("A=B,C=D", "B=A,C=D", "A=B,D=C", "B=A,D=C")
    # ... even when a mistake puts another answer before or after them: never split by one
    picks = [decide([1.0, 0.45, 0.0, 0.45], 0.2, rng) for _ in range(500)]
    assert all("B=D" in p or "D=B" in p for p in picks if len(p) > 1), picks
    assert any(p.startswith(("B=D", "D=B")) for p in picks) and any(p.endswith(("B=D", "D=B")) for p in picks)
    assert decide([0.0, 1.0], 1.0, rng) == "A"  # a mistake reverses the comparison
    mistakes = sum(decide([0.0, 1.0], 0.25, rng) == "A" for _ in range(2000))
    assert 400 < mistakes < 600
    # in rankings of 4, mistakes are spread over the pairs: about error_rate of the pairs reversed,
    # seldom a whole ranking upside down
    scores = [0.9, 0.6, 0.3, 0.0]
    orders = [decide(scores, 0.2, rng).split(",") for _ in range(3000)]
    reversed_pairs = [sum(o.index(LABELS[a]) > o.index(LABELS[b]) for a in range(4) for b in range(a + 1, 4))
                      for o in orders]
    assert 0.18 < sum(reversed_pairs) / (6 * len(orders)) < 0.27
    assert sum(r == 6 for r in reversed_pairs) / len(orders) < 0.01


def test_metrics():
    rate, low, high = wilson(30, 100)
    assert rate == 0.3 and 0.21 < low < 0.22 and 0.39 < high < 0.40
    # All or nothing: rounding once put the upper bound of 5/5 below 1.0, a negative error bar
    # that made the report's plot fail.
    assert all(0.0 <= wilson(s, n)[1] <= wilson(s, n)[0] <= wilson(s, n)[2] <= 1.0 for n in range(1, 60) for s in (0, n))
    assert win_rate([1, 1, 0, 0.5], [0, 1, 1, 0.5]) == {"win_rate": 0.5, "ci": pytest.approx(wilson(1, 2)[1:]),
                                                      "wins": 1, "losses": 1, "ties": 2}
    assert distinct_n(["a b a b a b"]) < distinct_n(["a b c d e f"]) == 1.0
    assert repeated_ending_flags(["One. Hope this helps!", "Two. Hope this helps!", "Three. Bye."]) == [1.0, 1.0, 0.0]


# -- the learner through the API -----------------------------------------------------------------

PROMPTS = [TutoringPrompt(f"t-{i}", "science", "primary", f"Tell me about topic {i}, please?",
                          "And another one?" if i % 2 else None, ("topic",), "train") for i in range(6)]


def longer(dialogue, answer: str) -> float:
    return min(len(answer), 100) / 100


def test_learner_writes_exactly_the_feedback_it_claims(serve_tutor, tiny_model_dir, tmp_path):
    rubric = Rubric("longer", longer, rewrite=lambda dialogue, answer, keywords, rng: answer + " and a longer ending")
    config = LearnerConfig(k=3, error_rate=0.2, rate_share=0.5, rewrite_share=0.5, follow_up_share=1.0)
    with serve_tutor(tmp_path, tiny_model_dir, sampling=SamplingConfig(max_new_tokens=12)) as (tutor, url):
        counts = give_feedback(url, PROMPTS, rubric, items=24, config=config, learners=2, seed=3, say=lambda *_: None)
        samples = collect_answers(url, PROMPTS[:4], rubric, clients=2)
    assert isinstance(counts, FeedbackCounts) and counts.items == 24 and counts.rewrites and counts.follow_ups
    db = sqlite3.connect(tmp_path / "c.db")
    one = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
    assert one("select count(*) from comparison_picks") == counts.picks
    assert one("select count(*) from comparison_picks where choice = 'tie'") == counts.ties
    assert one("select count(*) from ratings") == counts.ratings
    assert one("select count(*) from rewrites") == counts.rewrites
    assert one("select count(*) from comparisons") == counts.picks
    assert one("select count(distinct k) from comparisons") == 1 and one("select min(k) from comparisons") == 3
    # evaluation answers: their own conversations, purpose eval, with no feedback and no training data
    assert len(samples) == 4 and all(s["answer"] and s["model_version"] == "v0000" for s in samples)
    assert all(s["score"] == longer(None, s["answer"]) for s in samples)
    assert one("select count(*) from conversations where purpose = 'eval'") == 4
    with Store(tmp_path / "c.db") as store:
        data = collect(store)
    eval_ids = {row[0] for row in db.execute("select id from conversations where purpose = 'eval'")}
    used = {item.conversation_id for item in [*data.preference_groups, *data.ppo_prompts, *data.demonstrations]}
    assert used and not used & eval_ids


# -- a short learning run ------------------------------------------------------------------------

# The bag of tokens at its own step size: a taste that sits in tokens. With "auto" the score head often won
# on validation and, on this tiny policy's 12-token answers, was over-optimised in some splits: the gate
# promoted on its reward while the rubric rate fell below the base. Its binary features (the default) matter
# here too: with counts, one split's policy repeated a token that only rides along with an "a"
# (docs/learning.md, "The short learning run of the tests").
TINY_RUN = """
[serve.sampling]
max_new_tokens = 12
seed = 0
[retrain]
min_pairs = 20
min_prompts = 8
min_heldout_prompts = 2
heldout_fraction = 0.3
[retrain.sft]
min_demonstrations = 1000
[retrain.reward]
form = "bag_of_tokens"
epochs = 3
[retrain.ppo]
total_episodes = 576
max_new_tokens = 12
learning_rate = 3e-3
init_kl_coef = 0.02
[retrain.gate]
max_new_tokens = 12
temperature = 0.7
bootstrap_samples = 300
max_kl_reference = 50.0
max_kl_base = 50.0
max_length_ratio = 3.0
"""


def says_a(dialogue, answer: str) -> float:
    """A trivial taste a tiny model can learn: the letter 'a' in the answer (about 1 in 4 at first)."""
    return 1.0 if "a" in answer else 0.0


TINY_PROMPTS = [TutoringPrompt(f"p-{i}", "science", "primary", f"Question {i}: tell me about {topic}?", None, (topic,),
                               "heldout" if i % 4 == 0 else "train")
                for i, topic in enumerate(["fractions", "plants", "the moon", "verbs", "atoms", "rain", "magnets",
                                           "loops", "Paris", "water", "gravity", "ratios"] * 16)]


def tiny_learning_run(tmp_path: Path, config_text: str = TINY_RUN, **settings) -> dict:
    from bench.bench_learning import LearningRun, run

    config = tmp_path / f"{settings['out'].name}.toml"
    config.write_text(config_text)
    train = [p for p in TINY_PROMPTS if p.split == "train"]
    heldout = [p for p in TINY_PROMPTS if p.split == "heldout"]
    # One learner and a sampling seed: the same answers and feedback every time (the train/held-out split
    # still follows the random conversation ids). Many distinct openers, so that the gate has enough
    # held-out prompts that no training conversation used.
    defaults = dict(rubric="says_a", cycles=1, items=160, k=4, error_rate=0.0, learners=1, eval_clients=1,
                    samples_per_prompt=2, config=config, model=learnable_policy(tmp_path / f"tiny-{settings['out'].name}"))
    return run(LearningRun(**{**defaults, **settings}), rubric=Rubric("says_a", says_a), prompts=(train, heldout),
               say=lambda *_: None)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, dict]:
    tmp_path = tmp_path_factory.mktemp("learning")
    return tmp_path, tiny_learning_run(tmp_path, workdir=tmp_path / "run", out=tmp_path / "report")


def test_a_short_learning_run_moves_the_rubric_rate_up(short_run):
    tmp_path, results = short_run
    cycle = results["cycles"][0]
    assert cycle["status"] == "promoted", cycle
    base, after = results["rows"][0], results["rows"][-1]
    assert after["version"] == "v0001" and after["samples"] == base["samples"] == 96
    assert after["success"][0] > base["success"][0] + 0.1, (base["success"], after["success"])
    assert after["vs_base"]["wins"] > after["vs_base"]["losses"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| 1 | v0001 | " in report and "KL to base" in report and (tmp_path / "report" / "curves.png").stat().st_size > 10_000
    assert f"score gain over its updates {cycle['ppo_score_gain']:.2f}" in report  # PPO's own view, beside the gate's


def test_the_same_feedback_replayed_with_ppo_off(short_run):
    """`--feedback-from` retrains on exactly the learners' rows of an earlier run (kept gzipped beside its
    report), without that run's training history; with PPO off the candidate is the SFT step."""
    tmp_path, earlier = short_run
    sft_on = TINY_RUN.replace("min_demonstrations = 1000", "min_demonstrations = 8")
    # measured on 8 held-out openers: this test asks what was trained on, not how well it answers
    replayed = tiny_learning_run(tmp_path, sft_on, no_ppo=True, feedback_from=tmp_path / "report", cycles=3,
                                 max_heldout=8, workdir=tmp_path / "replay", out=tmp_path / "replay-report")
    assert len(replayed["cycles"]) == 1  # one cycle, however many were asked: the feedback is fixed
    cycle = replayed["cycles"][0]
    assert cycle["feedback"]["items"] == earlier["cycles"][0]["feedback"]["items"] == 160
    assert "sft" in cycle["stages"] and "ppo" not in cycle["stages"], cycle["stages"]
    assert cycle["reward"]["heldout_pairs"] == earlier["cycles"][0]["reward"]["heldout_pairs"]  # same split
    with Store(tmp_path / "run" / "conversations.db") as before, Store(tmp_path / "replay" / "conversations.db") as after:
        assert after.training_comparisons() == before.training_comparisons()
        assert after.training_ratings() == before.training_ratings()
        assert after.training_rewrites() == before.training_rewrites()
    with sqlite3.connect(tmp_path / "replay" / "conversations.db") as db:
        assert db.execute("select id from training_cycles").fetchall() == [(1,)]  # only the replayed cycle
    assert "replayed from its database" in (tmp_path / "replay-report" / "report.md").read_text()
    with pytest.raises(FileExistsError):  # a workdir that already holds a database is never overwritten
        tiny_learning_run(tmp_path, feedback_from=tmp_path / "report", workdir=tmp_path / "replay",
                          out=tmp_path / "again")


def test_the_benchmark_turns_active_asking_on_through_the_settings_file(tmp_path):
    """`--asking active` reaches the app the way a school would set it: [serve.asking] in the settings file."""
    import argparse

    from bench.bench_learning import LearningRun, settings_file
    from launch import serve_config

    config = tmp_path / "base.toml"
    config.write_text("[serve.sampling]\nmax_new_tokens = 96\n")
    assert settings_file(LearningRun(config=config), tmp_path) == config  # random: the file as it is
    written = settings_file(LearningRun(config=config, asking="active"), tmp_path)
    served = serve_config(argparse.Namespace(config=written, host=None, port=None, db=None, models_dir=None, model=None))
    assert served.asking.mode == "active" and served.sampling.max_new_tokens == 96
    with pytest.raises(ValueError, match="asking mode"):
        settings_file(LearningRun(config=config, asking="clever"), tmp_path)


def test_the_benchmark_sets_ppo_ptx_through_the_settings_file_and_zero_means_off(tmp_path):
    from bench.bench_learning import LearningRun, settings_file
    from rlhf.cli import retrain_config

    config = tmp_path / "base.toml"
    config.write_text("[retrain.ppo]\nptx_coef = 0.5\ntotal_episodes = 64\n")
    assert settings_file(LearningRun(config=config), tmp_path) == config  # not given: the file's own 0.5
    for coef in (1.0, 0.0):  # 0 turns a file's ptx off, for the run without it
        written = settings_file(LearningRun(config=config, ptx_coef=coef), tmp_path)
        retrain = retrain_config(written)  # as `launch.py --retrain` reads it
        assert retrain.ppo.ptx_coef == coef and retrain.ppo.total_episodes == 64


def test_two_arms_plot_in_one_figure_and_runs_of_different_rubrics_are_refused(tmp_path, monkeypatch, capsys):
    import sys

    from bench import learning_report

    def run_folder(name: str, rubric: str, rates: list[float]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"feedback_items": 90 * i, "success": (r, r - 0.05, r + 0.05)} for i, r in enumerate(rates)]
        (folder / "results.json").write_text(json.dumps({"rubric": rubric, "rows": rows}))
        return folder

    random_arm, active_arm = run_folder("r", "stays_short", [0.1, 0.2, 0.4]), run_folder("a", "stays_short", [0.1, 0.45, 0.5])
    out = tmp_path / "arms.png"
    monkeypatch.setattr(sys, "argv", ["learning_report.py", f"random={random_arm}", f"active={active_arm}", "--out", str(out)])
    learning_report.main()
    assert out.stat().st_size > 10_000
    printed = capsys.readouterr().out  # the curve in numbers, and where each arm reached random's last rate
    assert "| active | 90 | 45.0% [40.0%, 50.0%]" in printed
    assert "random's last success rate (40.0%): random 180, active 90" in printed
    other = run_folder("o", "plain_words", [0.1, 0.2])
    monkeypatch.setattr(sys, "argv", ["learning_report.py", f"random={random_arm}", f"other={other}", "--out", str(out)])
    with pytest.raises(SystemExit):
        learning_report.main()


def test_the_arms_report_counts_decided_comparisons_by_why_they_were_asked(tmp_path):
    import gzip

    from bench.learning_report import asks_by_reason
    from core.chat_format import TUTOR_SYSTEM_PROMPT

    assert asks_by_reason(tmp_path) is None  # no saved database: nothing to count
    with Store(tmp_path / "c.db") as store:
        for why, decided in (("no committee yet", True), ("most informative", True), ("most informative", True),
                             ("random share", False)):  # an undecided ask trains nothing and is not counted
            conversation = store.new_conversation("learner", "chat", TUTOR_SYSTEM_PROMPT)
            context = [{"role": "system", "content": TUTOR_SYSTEM_PROMPT}, *SKY]
            comparison, _ = store.add_comparison(conversation, SKY[-1]["content"], context, [{"text": "a"}, {"text": "b"}],
                                                 asked={"mode": "active", "why": why})
            if decided:
                store.decide_comparison(comparison, "A")
    (tmp_path / "conversations.db.gz").write_bytes(gzip.compress((tmp_path / "c.db").read_bytes()))
    assert asks_by_reason(tmp_path) == {"no committee yet": 1, "most informative": 2}


def test_the_feedback_audit_counts_pairs_against_the_rubric_and_says_why_answers_lack_substance(tmp_path):
    from bench.feedback_audit import audit
    from bench.rubrics import why_not_substantive
    from core.chat_format import TUTOR_SYSTEM_PROMPT

    one_liner, other_one_liner = "The sky is blue.", "Blue is a colour of light."
    assert why_not_substantive(SKY, one_liner) == "fewer than 2 sentences" and why_not_substantive(SKY, EXPLANATION) is None
    with Store(tmp_path / "c.db") as store:
        for i, (texts, choice) in enumerate([([EXPLANATION, one_liner], "A"), ([one_liner, EXPLANATION], "A"),
                                             ([one_liner, other_one_liner], "B")] * 4):
            conversation = store.new_conversation(f"learner-{i % 3}", "chat", TUTOR_SYSTEM_PROMPT)
            context = [{"role": "system", "content": TUTOR_SYSTEM_PROMPT}, *SKY]
            comparison, _ = store.add_comparison(conversation, SKY[-1]["content"], context, [{"text": t} for t in texts])
            store.decide_comparison(comparison, choice)
    found = audit(tmp_path / "c.db", "stays_short")
    assert found["pairs"] == {"as the rubric orders": 4, "against the rubric": 4, "equal": 4}
    assert found["ceiling"] == pytest.approx((4 + 2) / 12) and found["equal_share"] == pytest.approx(0.333, abs=1e-3)
    assert found["substance"]["fewer than 2 sentences"] == 16 and found["substance"]["has substance"] == 8


def test_the_learnability_audit_judges_each_label_set_by_the_rubrics_order(tmp_path):
    """`--fit`: a form trained on learners who always prefer the one-liner ranks held-out pairs against
    the rubric; trained on the rubric's own pairs of the same answers, with it."""
    from bench.feedback_audit import learnability
    from core.chat_format import TUTOR_SYSTEM_PROMPT
    from tiny import save_tiny

    one_liner = "The sky is blue."
    with Store(tmp_path / "c.db") as store:
        for i in range(40):
            conversation = store.new_conversation(f"learner-{i % 4}", "chat", TUTOR_SYSTEM_PROMPT)
            context = [{"role": "system", "content": TUTOR_SYSTEM_PROMPT}, *SKY]
            texts = [EXPLANATION, one_liner] if i % 2 else [one_liner, EXPLANATION]
            comparison, _ = store.add_comparison(conversation, SKY[-1]["content"], context, [{"text": t} for t in texts])
            store.decide_comparison(comparison, "B" if i % 2 else "A")  # the one-liner, every time
    rows = {row["labels"]: row for row in learnability(tmp_path / "c.db", "stays_short", save_tiny(tmp_path / "p"),
                                                      ["bag_of_tokens"])}
    assert rows["learners"]["heldout_pairs"] == rows["rubric"]["heldout_pairs"] > 0
    assert rows["learners"]["train_groups"] == rows["rubric"]["train_groups"] > 0
    assert rows["rubric"]["heldout_vs_rubric"] == 1.0 and rows["learners"]["heldout_vs_rubric"] == 0.0
