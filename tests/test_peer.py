"""bench/bench_peer.py on a tiny model: both trainers run on the same plan and report comparable figures, so
the side-by-side keeps working as TRL moves (its RLOO trainer is called exactly as the benchmark calls it)."""
import argparse

from app.store import Store
from bench.bench_peer import DEFAULT_PPO_EPOCHS, TRAINERS, judge, prepare, train_ours, train_rloo, trainer_name
from rlhf.ppo import PPOConfig
from test_cycle import give_feedback, prefers_examples
from test_ppo import fresh_accelerate_state  # noqa: F401  (a fixture)
from tiny import learnable_policy


def test_both_trainers_train_on_the_same_plan_and_are_judged_alike(tmp_path, fresh_accelerate_state):
    with Store(tmp_path / "feedback.db") as store:
        give_feedback(store, 60, prefers_examples)
    args = argparse.Namespace(db=tmp_path / "feedback.db", models_dir=tmp_path / "models",
                              model=learnable_policy(tmp_path / "tiny"), reward_form="bag_of_tokens", episodes=16,
                              learning_rate=1e-3, gate_prompts=4, gate_samples=1, seed=0,
                              ppo_epochs=None, rloo_iterations=1)
    work = tmp_path / "work"
    work.mkdir()
    plan = prepare(args, work)
    assert plan["prompts"] and len(plan["eval_prompts"]) == 4 and (work / "rm").exists()
    for trainer, train in zip(TRAINERS, (train_ours, train_rloo)):
        args.run = trainer
        assert trainer_name(args) == trainer  # each with its default passes over a batch
        figures = train(args, work, plan)
        assert figures["episodes"] == 16 and figures["seconds"] > 0, (trainer, figures)
        # the sampling time is measured, not copied: part of the wall time, never all of it
        assert 0 < figures["generation_seconds"] < figures["seconds"], (trainer, figures)
        assert (figures["max_new_tokens"], figures["temperature"]) == (128, 0.7)  # the served answer, both
        verdict = judge(args, work, plan, trainer)
        assert verdict["gate_prompts"] == 4 and len(verdict["gain_ci95"]) == 2, (trainer, verdict)


def test_the_benchmark_names_each_trainers_passes_over_a_batch_and_knows_our_default():
    assert DEFAULT_PPO_EPOCHS == PPOConfig().ppo_epochs
    name = lambda run, epochs=None, iterations=1: trainer_name(  # noqa: E731
        argparse.Namespace(run=run, ppo_epochs=epochs, rloo_iterations=iterations))
    assert [name("ours"), name("ours", DEFAULT_PPO_EPOCHS), name("ours", 1), name("rloo"), name("rloo", iterations=2)] \
        == ["ours", "ours", "ours-e1", "rloo", "rloo-i2"]
