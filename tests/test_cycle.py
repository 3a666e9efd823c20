"""The training cycle end to end on a tiny model: data -> reward model -> PPO -> gate -> promote -> served.

Also: too little data and random feedback are refused honestly, a second retrain is refused while one
runs, and SIGKILL at any point of a cycle leaves the current version and the feedback rows as they were.
"""
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from app.embedded import ensure_base
from app.engine import EngineConfig, GenerationEngine, SamplingConfig
from app.store import Store
from app.versions import ModelRegistry
from core.active import Committee
from core.chat_format import TUTOR_SYSTEM_PROMPT, fit_context
from rlhf.cycle import CycleConfig, CycleError, retrain_lock, rollback, run_cycle
from rlhf.evaluate import GateConfig
from rlhf.ppo import PPOConfig
from rlhf.reward import RewardConfig, load_reward_model
from rlhf.sft import SFTSettings
from app.loop_view import learner_feedback_frame
from core.privacy import pseudonym
from core.arena import CanaryConfig
from tiny import learnable_policy

ROOT = Path(__file__).resolve().parents[1]
FEEDBACK_TABLES = ("conversations", "messages", "ratings", "comparisons", "comparison_candidates",
                   "comparison_picks", "rewrites")
TOPICS = ["fractions", "plants", "the moon", "verbs", "atoms", "rain", "magnets", "loops", "Paris", "water",
          "gravity", "ratios", "volcanoes", "circuits", "seasons", "history"]

TINY_CYCLE = CycleConfig(
    min_pairs=20, min_prompts=8, min_heldout_prompts=2, heldout_fraction=0.3, max_eval_prompts=32,
    shipped_eval_prompts=False,  # the tiny model's own topics only (the test below adds the shipped prompts)
    sft=SFTSettings(min_demonstrations=1000),
    reward=RewardConfig(form="score_head", learning_rate=2e-3, epochs=3, min_heldout_accuracy=0.6),
    ppo=PPOConfig(total_episodes=160, rollout_batch_size=16, minibatch_size=8, max_new_tokens=8, learning_rate=1e-2,
                  temperature=1.0, init_kl_coef=0.02, stop_kl=20.0),  # lr 1e-2 moves fast: KL up to ~6 here, keep the run whole
    gate=GateConfig(max_new_tokens=8, bootstrap_samples=300, max_kl_reference=50.0, max_kl_base=50.0,
                    max_length_ratio=3.0),
)


def give_feedback(store: Store, n: int, prefer, seed: int = 0) -> None:
    """n conversations, each a k=2 comparison picked by `prefer(a, b) -> 'A' | 'B'`."""
    rng = random.Random(seed)
    for i in range(n):
        compare_in(store, store.new_conversation("learner", "chat", TUTOR_SYSTEM_PROMPT), i, prefer, rng)


def compare_in(store: Store, conversation: str, i: int, prefer, rng: random.Random) -> None:
    """Question i in `conversation`, a k=2 comparison of an answer with an example and one without."""
    topic = TOPICS[i % len(TOPICS)]
    question = f"Question {i}: tell me about {topic}?"
    context = [{"role": "system", "content": TUTOR_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    with_example = f"Here is an example about {topic}. " + "Water boils at one hundred degrees. " * rng.randint(0, 2)
    without = f"Let me say something about {topic}. " + "The capital of France is Paris. " * rng.randint(0, 2)
    candidates = [with_example, without]
    rng.shuffle(candidates)
    comparison, _ = store.add_comparison(conversation, question, context,
                                         [{"text": t, "model_version": "v0000"} for t in candidates])
    store.decide_comparison(comparison, prefer(*candidates))


def prefers_examples(a: str, b: str) -> str:
    return "A" if "example" in a else "B"


@pytest.fixture
def setup(tmp_path, monkeypatch):
    # Conversation ids decide the held-out split (rlhf/data.py is_heldout); random ids made each run's
    # split, and so its gate's verdict, a new draw. Seeded ids make every run of a test the same.
    ids = random.Random(0)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=ids.getrandbits(128), version=4))
    registry = ModelRegistry(tmp_path / "models")
    ensure_base(registry, learnable_policy(tmp_path / "tiny"), say=lambda *_: None)
    store = Store(tmp_path / "c.db")
    yield registry, store, tmp_path
    store.close()


def test_too_little_data_changes_nothing(setup):
    registry, store, _ = setup
    give_feedback(store, 3, prefers_examples)
    before = store.row_counts()
    with pytest.raises(CycleError, match=r"need at least 20 preference pairs, have \d"):
        run_cycle(store, registry, TINY_CYCLE, say=lambda *_: None)
    assert store.row_counts() == before and registry.current_version() == "v0000"


def test_consistent_feedback_is_learned_promoted_and_served(setup):
    registry, store, _ = setup
    give_feedback(store, 80, prefers_examples)
    feedback_before = {t: store.row_counts()[t] for t in FEEDBACK_TABLES}
    engine = GenerationEngine(registry, fit_context, SamplingConfig(max_new_tokens=4), EngineConfig(poll_interval_s=0.05))
    try:
        lines = []
        outcome = run_cycle(store, registry, TINY_CYCLE, say=lines.append)
        cycle = store.last_cycle()
        assert cycle["metrics"]["reward"]["heldout_accuracy"] >= 0.8, cycle["metrics"]["reward"]
        history = [json.loads(x) for x in (registry.root / "cycles" / "0001" / "ppo_history.jsonl").read_text().splitlines()]
        assert len(history) == 160 // 16
        assert {"score", "kl", "entropy", "answer_length", "clipfrac", "value_loss", "gen_seconds", "train_seconds"} <= set(history[0])
        assert outcome.status == "promoted", (outcome.message, cycle["metrics"].get("gate"))
        scores = [h["score"] for h in history]  # the policy moved towards what the reward model likes:
        assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3, scores  # (means of 3 updates: one update is 16 samples)
        assert cycle["metrics"]["ppo_score_gain"] == pytest.approx(scores[-1] - scores[0])  # PPO's own view of its gain
        assert registry.current_version() == outcome.version == "v0001" == cycle["policy_version"]
        meta = registry.meta("v0001")
        assert meta["parent"] == "v0000" and meta["lineage"]["feedback_rows"]["picks"]
        assert meta["config"]["ppo"]["total_episodes"] == 160 and (registry.path("v0001") / "reward_model").is_dir()
        assert (registry.root / "cycles" / "0001" / "report.md").read_text().count("**Prompt:**") >= 2
        page = (registry.root / "cycles" / "0001" / "report.html").read_text()  # the dashboard's figures, as a file
        assert page.count("data:image/png;base64,") == 3 and "Training cycle 1" in page and "v0001" in page
        assert "<td>learner</td>" not in page  # learners by pseudonym only, in its tables and in its charts:
        assert set(learner_feedback_frame(store, None, pseudonym)["learner"]) == {pseudonym("learner")}
        assert {t: store.row_counts()[t] for t in FEEDBACK_TABLES} == feedback_before  # feedback untouched
        deadline = time.time() + 10
        while engine.version != "v0001" and time.time() < deadline:  # the running server switches by itself
            time.sleep(0.05)
        request = engine.submit([{"role": "user", "content": "hi"}])
        list(request.tokens(timeout=30))
        assert request.model_version == "v0001"
        # nothing new since: the next cycle says so and changes nothing
        again = run_cycle(store, registry, TINY_CYCLE, say=lambda *_: None)
        assert again.status == "nothing_new" and registry.current_version() == "v0001"
        assert rollback(registry, "v0000") and registry.current_version() == "v0000"
    finally:
        engine.close()


def test_a_db_that_recorded_versions_the_models_folder_lacks_gets_the_next_free_number(setup):
    """A DB kept while its models folder was replaced (a fresh start of the models, the DB of a learning
    run) already names v0001: the cycle's version takes the next number, instead of failing at the end."""
    registry, store, _ = setup
    give_feedback(store, 80, prefers_examples)
    store.add_model_version("v0001", "policy", "/elsewhere/v0001")
    store.add_model_version("v0001/reward_model", "reward", "/elsewhere/v0001/reward_model")
    config = dataclasses.replace(TINY_CYCLE, canary=CanaryConfig(enabled=True, conversation_share=0.3))
    outcome = run_cycle(store, registry, config, say=lambda *_: None)
    assert outcome.status == "canary" and outcome.version == "v0002", outcome.message
    assert registry.versions() == ["v0000", "v0002"] and store.running_canary()["version"] == "v0002"


def test_with_a_canary_a_version_that_passes_the_gate_waits_for_votes(setup):
    registry, store, _ = setup
    give_feedback(store, 80, prefers_examples)
    config = dataclasses.replace(TINY_CYCLE, canary=CanaryConfig(enabled=True, conversation_share=0.3))
    outcome = run_cycle(store, registry, config, say=lambda *_: None)
    assert outcome.status == "canary" and outcome.version == "v0001", outcome.message
    assert registry.current_version() == "v0000" and "v0001" in registry.versions()  # written, not served
    canary = store.running_canary()
    assert (canary["version"], canary["baseline"], canary["settings"]["conversation_share"]) == ("v0001", "v0000", 0.3)
    assert store.last_cycle()["status"] == "canary"
    assert run_cycle(store, registry, config, say=lambda *_: None).status == "nothing_new"


@pytest.mark.parametrize("form", ["implicit", "bag_of_tokens"])
def test_other_reward_forms_drive_ppo_and_are_kept_with_the_version(setup, form):
    """RewardConfig.form "implicit" (DPO's reward) and "bag_of_tokens": the reward model trains, passes the
    check, PPO raises it, and the promoted version keeps it, loadable (the implicit one onto its reference,
    the parent version)."""
    registry, store, _ = setup
    give_feedback(store, 80, prefers_examples)
    reward = dataclasses.replace(TINY_CYCLE.reward, form=form, learning_rate=None if form == "bag_of_tokens" else 2e-3)
    config = dataclasses.replace(TINY_CYCLE, reward=reward)
    outcome = run_cycle(store, registry, config, say=lambda *_: None)
    cycle = store.last_cycle()
    assert cycle["metrics"]["reward"]["heldout_accuracy"] >= 0.8, cycle["metrics"]["reward"]
    # PPO raised the reward: measured by the gate on the held-out prompts (32 x 4 answers per policy). The
    # per-update score (16 answers at temperature 1) is too noisy for the bag of tokens, which scores only
    # the few tokens it saw: 3 of 8 draws of the split showed no rise there while the gate measured
    # +0.3 to +0.7 with the interval above 0.
    gate = cycle["metrics"]["gate"]
    assert gate["reward_new"] > gate["reward_current"] and gate["reward_gain_ci95"][0] > 0, gate
    assert outcome.status == "promoted", (outcome.message, gate)
    # a form set by hand gets a bag of tokens as the gate's second opinion, unless it is one
    assert gate.get("judge") == (None if form == "bag_of_tokens" else "bag_of_tokens"), gate
    saved = load_reward_model(registry.path(outcome.version) / "reward_model")
    assert saved.config.form == form
    if form == "implicit":
        assert saved.metrics["reference"] == str(registry.path("v0000"))


def test_the_default_reward_form_is_chosen_by_the_cycle_and_kept_with_the_version(setup):
    """Form "auto" (the default): the candidates train on most of the training groups, the cycle keeps the
    one that ranks the rest best, records every candidate's figure, and the version keeps what it chose."""
    from rlhf.ensemble import load_any

    registry, store, _ = setup
    give_feedback(store, 120, prefers_examples)
    reward = dataclasses.replace(TINY_CYCLE.reward, form=RewardConfig().form, learning_rate=None)
    # 120 one-pair conversations leave about 17 validation pairs
    outcome = run_cycle(store, registry, dataclasses.replace(TINY_CYCLE, reward=reward), say=lambda *_: None)
    metrics = store.last_cycle()["metrics"]["reward"]
    choice = metrics["choice"]
    assert RewardConfig().form == "auto" and choice["mode"] == "auto"
    assert set(choice["validation_accuracy"]) == {*TINY_CYCLE.ensemble.candidates, "ensemble"}
    assert choice["validation_pairs"] >= TINY_CYCLE.ensemble.min_validation_pairs
    assert metrics["heldout_accuracy"] >= 0.8 and outcome.status == "promoted", (metrics, outcome.message)
    saved = load_any(registry.path(outcome.version) / "reward_model")
    assert saved.metrics["choice"]["chosen"] == choice["chosen"]
    assert saved.config.form == ("ensemble" if choice["chosen"] == "ensemble" else choice["chosen"])
    # the gate asked a second opinion of the candidate it did not keep, which PPO never optimised
    gate = store.last_cycle()["metrics"]["gate"]
    others = set(TINY_CYCLE.ensemble.candidates) - {choice["chosen"]}
    assert (gate.get("judge") in others) if choice["chosen"] != "ensemble" else "judge" not in gate, gate


def test_sft_only_cycle_imitates_ranking_winners_without_ppo(setup):
    """PPO switched off (the learning benchmark's baseline): the new policy is SFT on the winners."""
    import dataclasses

    from rlhf.cycle import ranking_winners
    from rlhf.data import collect, split_data

    registry, store, _ = setup
    give_feedback(store, 40, prefers_examples)
    train, _ = split_data(collect(store), TINY_CYCLE.heldout_fraction)
    winners = ranking_winners(train.preference_groups)
    assert len(winners) == len(train.preference_groups)  # k = 2: one winner per comparison
    assert all("example" in w["completion"][0]["content"] for w in winners)
    config = dataclasses.replace(TINY_CYCLE, run_ppo=False,
                                 sft=dataclasses.replace(TINY_CYCLE.sft, min_demonstrations=1, ranking_winners=True))
    lines = []
    run_cycle(store, registry, config, say=lines.append)
    metrics = store.last_cycle()["metrics"]
    assert metrics["sft_examples"] == len(winners) and metrics["sft_loss_last"] < metrics["sft_loss_first"]
    assert "data" in metrics["stages"] and "sft" in metrics["stages"] and "ppo" not in metrics["stages"]
    assert not (registry.root / "cycles" / "0001" / "ppo_history.jsonl").exists()
    assert any("PPO switched off" in line for line in lines)


def test_random_feedback_is_rejected_before_ppo(setup):
    registry, store, _ = setup
    rng = random.Random(1)
    give_feedback(store, 80, lambda a, b: rng.choice("AB"))
    outcome = run_cycle(store, registry, TINY_CYCLE, say=lambda *_: None)
    assert outcome.status == "rejected" and "the cycle stops before PPO and the gate" in outcome.message
    assert registry.current_version() == "v0000" and registry.versions() == ["v0000"]
    assert store.last_cycle()["status"] == "rejected"
    # The committee that active comparisons ask by is written all the same, with its own verdict on the
    # groups its members left out: random feedback teaches it nothing, so comparisons stay random.
    committee = Committee.load(registry.committee_path())
    assert committee.weights.shape[0] == TINY_CYCLE.committee.members == 4
    assert committee.meta == store.last_cycle()["metrics"]["committee"]
    assert {k: committee.meta[k] for k in ("cycle", "members", "groups", "credible")} == {
        "cycle": 1, "members": 4, "groups": 80, "credible": False}
    assert committee.meta["out_of_bag"]["pairs"] > 40
    assert not torch.equal(committee.weights[0], committee.weights[1])  # each fitted on its own bootstrap sample


def test_second_retrain_is_refused_while_one_runs(setup):
    registry, store, _ = setup
    with retrain_lock(registry.root):
        with pytest.raises(CycleError, match="another retrain is running"):
            run_cycle(store, registry, TINY_CYCLE, say=lambda *_: None)


# Every write of a cycle, in order: the training itself, the version's files, the version's rename, the
# CURRENT pointer's rename, the DB records after the switch, and the prune of an old version.
CYCLE_POINTS = ("training", "saving", "before_switch", "switching", "recording", "removing")
CRASHES = [(point, "kill") for point in CYCLE_POINTS] + [
    (point, kind) for point in ("saving", "switching", "recording", "removing") for kind in ("enospc", "eio")]


def with_old_versions(registry: ModelRegistry) -> None:
    """v0001 and v0002 (current), copies of the base, so that the cycle's promotion prunes v0001."""
    import shutil

    for version in ("v0001", "v0002"):
        shutil.copytree(registry.path("v0000"), registry.path(version))
        (registry.path(version) / "meta.json").write_text(json.dumps({**registry.meta("v0000"), "parent": "v0000"}))
    registry.set_current("v0002")


def run_cycle_in_a_process(tmp: Path, registry: ModelRegistry, config: CycleConfig, failpoint: str):
    path = tmp / "cycle.json"
    path.write_text(json.dumps(_asdict(config)))
    code = ("import json, sys; sys.path[:0] = [sys.argv[1]];"
            "from core.settings import merge; from app.store import Store; from app.versions import ModelRegistry;"
            "from rlhf.cycle import CycleConfig, run_cycle;"
            "cfg = merge(CycleConfig(), json.load(open(sys.argv[2])));"
            "run_cycle(Store(sys.argv[3]), ModelRegistry(sys.argv[4]), cfg)")
    return subprocess.run([sys.executable, "-c", code, str(ROOT), str(path), str(tmp / "c.db"), str(registry.root)],
                          env={**os.environ, "TUTOR_FAILPOINT": failpoint}, capture_output=True, text=True, timeout=600)


def assert_recovers(registry: ModelRegistry, db: Path, feedback_before: dict) -> str:
    """What a restart finds: a loadable CURRENT, only whole versions, an intact DB with every feedback row,
    leftovers cleaned, the served version recorded, and an engine that answers."""
    import sqlite3
    from app.versions import record_versions

    current = registry.current_version()
    assert current in registry.versions()
    for version in registry.versions():  # listed means whole
        files = {p.name for p in registry.path(version).iterdir()}
        assert {"meta.json", "model.safetensors", "tokenizer.json"} <= files, (version, files)
    with sqlite3.connect(db) as con:
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    registry.clean_leftovers()
    assert not [p.name for p in registry.root.iterdir() if p.name.startswith(".") and p.name != ".retrain.lock"]
    with Store(db) as store:
        assert {t: store.row_counts()[t] for t in FEEDBACK_TABLES} == feedback_before
        record_versions(store, registry)
        assert current in {v["version"] for v in store.model_versions()}
    engine = GenerationEngine(registry, fit_context, SamplingConfig(max_new_tokens=4), EngineConfig())
    try:
        assert engine.version == current
        assert list(engine.submit([{"role": "user", "content": "Hello?"}]).tokens(timeout=60))
    finally:
        engine.close()
    return current


@pytest.mark.parametrize("point,kind", CRASHES)
def test_a_crash_or_a_disk_error_at_any_write_of_a_cycle_loses_nothing(setup, point, kind):
    registry, store, tmp = setup
    with_old_versions(registry)
    give_feedback(store, 80, prefers_examples)
    before = {t: store.row_counts()[t] for t in FEEDBACK_TABLES}
    config = dataclasses.replace(TINY_CYCLE, keep_versions=1)
    if kind == "kill":
        proc = run_cycle_in_a_process(tmp, registry, config, point)
        assert proc.returncode == -9, proc.stderr[-2000:]  # killed at the failpoint, not finished
    else:
        os.environ["TUTOR_FAILPOINT"] = f"{point}={kind}"
        try:
            with pytest.raises(CycleError) as raised:
                run_cycle(store, registry, config, say=lambda *_: None)
        finally:
            del os.environ["TUTOR_FAILPOINT"]
        message = str(raised.value)
        error = "No space left on device" if kind == "enospc" else "Input/output error"
        assert "\n" not in message and error in message and "feedback" in message and "unchanged" in message, message
        assert store.last_cycle()["status"] == "failed" and error in store.last_cycle()["reason"]
        assert not [p.name for p in registry.root.iterdir() if p.name.endswith(".partial")]  # cleaned at once
        switched = point in ("recording", "removing")
        assert (f"promoted v0003" in message) == switched, message
    current = assert_recovers(registry, tmp / "c.db", before)
    # Before the pointer's rename the old version is served; after it, the new one, whole.
    assert current == ("v0003" if point in ("recording", "removing") else "v0002"), current


@pytest.mark.parametrize("kind", ["kill", "enospc"])
def test_a_rollback_cut_short_leaves_one_whole_version_current(setup, kind):
    registry, store, tmp = setup
    with_old_versions(registry)
    before = {t: store.row_counts()[t] for t in FEEDBACK_TABLES}
    if kind == "kill":
        code = ("import sys; sys.path[:0] = [sys.argv[1]]; from app.versions import ModelRegistry;"
                "from rlhf.cycle import rollback; rollback(ModelRegistry(sys.argv[2]), 'v0001')")
        proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(registry.root)], capture_output=True,
                              env={**os.environ, "TUTOR_FAILPOINT": "switching"}, timeout=120)
        assert proc.returncode == -9, proc.stderr[-2000:]
    else:
        os.environ["TUTOR_FAILPOINT"] = "switching=enospc"
        try:
            with pytest.raises(CycleError, match="v0002 is still served"):
                rollback(registry, "v0001")
        finally:
            del os.environ["TUTOR_FAILPOINT"]
    assert assert_recovers(registry, tmp / "c.db", before) == "v0002"
    assert "v0001 is current again" in rollback(registry, "v0001")


def _asdict(config):
    from dataclasses import asdict

    return asdict(config)


def test_a_settings_file_turns_bf16_on_and_off(tmp_path):
    """TOML booleans reach the "auto"-or-bool precision settings as booleans: `false` means off."""
    from rlhf.cli import retrain_config

    path = tmp_path / "settings.toml"
    path.write_text("[retrain.ppo]\nbf16 = false\n[retrain.reward]\nbf16 = true\n")
    config = retrain_config(path)
    assert config.ppo.use_bf16() is False and config.reward.use_bf16() is True
    assert retrain_config(None).ppo.bf16 == "auto" and retrain_config(None).reward.bf16 == "auto"
    path.write_text('[retrain.reward]\nbf16 = "auto"\n')
    assert retrain_config(path).reward.bf16 == "auto"




def test_a_class_that_repeats_its_questions_still_gets_a_gate_verdict(setup):
    """Eighty conversations over six questions: every held-out prompt was also trained on. Without the
    shipped prompts the cycle stops before training and says why (not a rejection); with the defaults the
    gate judges on the shipped held-out prompts, at least min_heldout_prompts (24) of them."""
    registry, store, _ = setup
    rng = random.Random(0)
    for i in range(80):
        compare_in(store, store.new_conversation("learner", "chat", TUTOR_SYSTEM_PROMPT), i % 6, prefers_examples, rng)
    defaults = CycleConfig()
    before = store.row_counts()
    starved = dataclasses.replace(TINY_CYCLE, min_heldout_prompts=defaults.min_heldout_prompts)
    with pytest.raises(CycleError, match=r"too few prompts to judge .* have 0 \(0 from the class"):
        run_cycle(store, registry, starved, say=lambda *_: None)
    assert store.row_counts() == before and store.last_cycle() is None  # no cycle recorded, none rejected
    config = dataclasses.replace(TINY_CYCLE, min_heldout_prompts=defaults.min_heldout_prompts,
                     max_eval_prompts=defaults.max_eval_prompts, shipped_eval_prompts=defaults.shipped_eval_prompts)
    outcome = run_cycle(store, registry, config, say=lambda *_: None)
    metrics = store.last_cycle()["metrics"]
    assert metrics["gate_prompts"] == {"class": 0, "shipped": defaults.max_eval_prompts}, metrics["gate_prompts"]
    assert metrics["gate"]["heldout_prompts"] >= 24 and outcome.status in ("promoted", "rejected")
    low, high = metrics["gate"]["reward_gain_ci95"]
    assert low < high  # a real interval, from prompts the gate could judge on


def test_a_cycle_without_heldout_pairs_is_rejected_with_the_reason(setup):
    """Held-out conversations that hold only ratings of single answers give the reward model no held-out
    pair to be measured on: the cycle ends at the reward-model check and says why (it used to fail on
    printing an accuracy that was not there)."""
    from rlhf.data import is_heldout

    registry, store, _ = setup
    rng = random.Random(0)
    for i in range(80):
        conversation = store.new_conversation("learner", "chat", TUTOR_SYSTEM_PROMPT)
        if not is_heldout(conversation, TINY_CYCLE.heldout_fraction):
            compare_in(store, conversation, i, prefers_examples, rng)
            continue
        question = f"Question {i}: tell me about {TOPICS[i % len(TOPICS)]}?"
        context = [{"role": "system", "content": TUTOR_SYSTEM_PROMPT}, {"role": "user", "content": question}]
        reply = store.add_turn(conversation, question, "Here is an example.", model_version="v0000", context=context)
        store.add_rating(reply, "up", "")
    outcome = run_cycle(store, registry, TINY_CYCLE, say=lambda *_: None)
    assert outcome.status == "rejected" and "no held-out pairs" in outcome.message, outcome.message
    assert registry.current_version() == "v0000" and store.last_cycle()["status"] == "rejected"


def test_a_removal_cut_short_never_leaves_a_version_that_looks_whole(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    for version in ("v0000", "v0001"):
        (registry.path(version)).mkdir(parents=True)
        (registry.path(version) / "meta.json").write_text("{}")
        (registry.path(version) / "model.safetensors").write_bytes(b"x" * 1000)
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; from app.versions import ModelRegistry;"
            "ModelRegistry(sys.argv[2]).remove('v0001')")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(registry.root)],
                          env={**os.environ, "TUTOR_FAILPOINT": "removing"}, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert registry.versions() == ["v0000"]  # unlisted before any file went
    assert registry.clean_leftovers() == [".v0001.removing"]
    assert sorted(p.name for p in registry.root.iterdir()) == ["v0000"]


def test_rollback_waits_for_no_cycle(setup):
    registry, _, _ = setup
    with retrain_lock(registry.root):
        with pytest.raises(CycleError, match="another retrain is running"):
            rollback(registry, "v0000")
    assert "v0000 is current again" in rollback(registry, "v0000")


def test_a_retrain_gives_way_to_serving(setup, monkeypatch):
    """`launch.py --retrain` lowers its own CPU priority (the load benchmark: first tokens 15x sooner while
    a cycle runs on the serving machine); `niceness = 0` leaves it as it is."""
    import argparse

    from rlhf.cli import run_offline

    registry, store, tmp = setup
    asked = []
    monkeypatch.setattr(os, "nice", lambda n: asked.append(n) or n)
    args = argparse.Namespace(db=tmp / "c.db", models_dir=registry.root, rollback=None, export=None, config=None,
                              model=None, cycles=1)
    assert run_offline(args) == 2  # too little feedback: refused in one line, after the priority was set
    settings = tmp / "settings.toml"
    settings.write_text("[retrain]\nniceness = 0\n")
    assert run_offline(argparse.Namespace(**{**vars(args), "config": settings})) == 2
    assert asked == [10]


def test_watch_mode_starts_exactly_one_cycle_when_the_threshold_is_crossed(setup, monkeypatch):
    from rlhf import watch as watching
    from rlhf.cycle import WatchConfig

    registry, store, _ = setup
    config = dataclasses.replace(TINY_CYCLE, watch=WatchConfig(min_new_feedback=80, min_interval_s=0, poll_s=0))
    give_feedback(store, 79, prefers_examples)
    quiet = lambda *_: None  # noqa: E731
    assert watching.watch(store, registry, config, say=quiet, polls=2) == 0 and store.last_cycle() is None
    give_feedback(store, 1, prefers_examples, seed=1)
    assert watching.watch(store, registry, config, say=quiet, polls=3) == 1
    assert store.last_cycle()["status"] in ("promoted", "rejected")  # a real cycle ran once, then none
    assert len(store.model_versions()) >= 1

    # New feedback again, but the last attempt is recent: nothing until min_interval_s has passed.
    config = dataclasses.replace(config, watch=WatchConfig(min_new_feedback=10, min_interval_s=3600, poll_s=0))
    runs = []

    def stand_in_cycle(*args, **kwargs):
        from rlhf.cycle import CycleOutcome

        runs.append(store.start_cycle())
        return CycleOutcome("rejected", "a stand-in cycle")

    monkeypatch.setattr(watching, "run_cycle", stand_in_cycle)
    give_feedback(store, 10, prefers_examples, seed=2)
    now = time.time()
    assert watching.watch(store, registry, config, say=quiet, polls=2, clock=lambda: now + 60) == 0
    assert watching.watch(store, registry, config, say=quiet, polls=2, clock=lambda: now + 3700) == 1
    assert len(runs) == 1


def test_served_answers_rollouts_and_gate_samples_share_one_length_and_temperature(tmp_path):
    """PPO trains on, and the gate judges, answers as long and as random as those learners see: by default,
    and when a settings file changes [serve.sampling] (unless a retrain table sets its own)."""
    from rlhf.cli import retrain_config

    served, config = SamplingConfig(), retrain_config(None)
    for answers in (config.ppo, config.gate):
        assert (answers.max_new_tokens, answers.temperature) == (served.max_new_tokens, served.temperature)
    settings = tmp_path / "s.toml"
    settings.write_text("[serve.sampling]\nmax_new_tokens = 80\ntemperature = 0.9\n[retrain.gate]\ntemperature = 1.0\n")
    config = retrain_config(settings)
    assert (config.ppo.max_new_tokens, config.ppo.temperature) == (80, 0.9)
    assert (config.gate.max_new_tokens, config.gate.temperature) == (80, 1.0)


def test_the_readmes_settings_file_is_valid_and_every_setting_in_it_is_known(tmp_path):
    """The README's settings example, as a user would copy it: it parses, and both the server and a retrain
    accept every key (unknown keys are errors)."""
    import argparse
    import re

    from launch import serve_config
    from rlhf.cli import retrain_config

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Settings file \(all optional.*?```toml\n(.*?)```", readme, re.S).group(1)
    path = tmp_path / "settings.toml"
    path.write_text(block)
    served = serve_config(argparse.Namespace(config=path, host=None, port=None, db=None, models_dir=None, model=None))
    config = retrain_config(path)
    assert served.asking.mode == "random" and config.committee.members == 4 and config.reward.form == "auto"


def test_a_fraction_for_a_whole_number_setting_is_an_error_not_rounded(tmp_path):
    """`pool_factor = 2.5` must not quietly become 2; an int for a float setting and 3.0 for an int still read."""
    from app.config import ServeConfig
    from core.settings import merge

    with pytest.raises(ValueError, match="serve.asking.pool_factor must be a whole number, not 2.5"):
        merge(ServeConfig(), {"asking": {"pool_factor": 2.5}}, "serve")
    served = merge(ServeConfig(), {"asking": {"pool_factor": 3.0, "random_share": 1}}, "serve")
    assert served.asking.pool_factor == 3 and isinstance(served.asking.pool_factor, int)
    assert served.asking.random_share == 1.0


def test_a_setting_of_the_wrong_type_is_named_in_a_clear_error(tmp_path):
    from app.config import ServeConfig
    from core.settings import merge

    with pytest.raises(ValueError, match="serve.db must be a path, not 5"):
        merge(ServeConfig(), {"db": 5}, "serve")
    with pytest.raises(ValueError, match="serve.port must be a whole number, not 'abc'"):
        merge(ServeConfig(), {"port": "abc"}, "serve")
    settings = tmp_path / "s.toml"
    settings.write_text("[serve]\nport = [7860]\n")
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", str(settings), "--list-users"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: serve.port must be a whole number, not [7860]"


def test_a_switch_takes_true_or_false_and_nothing_that_merely_looks_like_it():
    """`judge = "false"` kept as a string would read as on; 0 or 1 are not switches either. A setting that
    also takes "auto" (bf16) keeps it."""
    from core.settings import merge

    for bad in ({"gate": {"judge": "false"}}, {"reward": {"binary": 0}}, {"reward": {"length_apart": "no"}}):
        with pytest.raises(ValueError, match="must be true or false"):
            merge(CycleConfig(), bad, "retrain")
    config = merge(CycleConfig(), {"gate": {"judge": False}, "reward": {"binary": False, "bf16": "auto"}}, "retrain")
    assert config.gate.judge is False and config.reward.binary is False and config.reward.bf16 == "auto"
