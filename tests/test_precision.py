"""What "auto" precision means on the machine found: the plan's detection, and every auto setting
following it (the rest of the suite runs with TUTOR_PRECISION=fp32)."""
import pytest
import torch

import core.precision as precision
from core.precision import PrecisionPlan, cpu_flags, plan_for

BF16_CPU = PrecisionPlan("cpu", True, torch.bfloat16, "the CPU has avx512_bf16")
FP32_CPU = PrecisionPlan("cpu", False, torch.float32, "no bf16 instructions")


def no_measurement():
    raise AssertionError("measured although the flags were known")


def test_the_plan_follows_the_hardware():
    assert plan_for(True, set(), no_measurement).sampling_dtype == torch.bfloat16
    for flags in ({"avx512f", "avx512_bf16"}, {"amx_tile", "amx_bf16"}):
        plan = plan_for(False, flags, no_measurement)
        assert plan.train_bf16 and plan.sampling_dtype == torch.bfloat16 and "bf16" in plan.reason
    plan = plan_for(False, {"avx2", "avx512f", "fma"}, no_measurement)
    assert not plan.train_bf16 and plan.sampling_dtype == torch.float32
    assert "emulated" in plan.describe()
    # Flags unknown: one measurement decides, with a margin.
    assert plan_for(False, None, lambda: 2.0).train_bf16
    assert not plan_for(False, None, lambda: 1.1).train_bf16
    assert "1.10x" in plan_for(False, None, lambda: 1.1).reason


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") is None
    assert precision.bf16_matmul_speedup(size=64, repeats=1) > 0


def test_the_environment_can_force_a_plan(monkeypatch):
    precision.precision_plan.cache_clear()
    try:
        monkeypatch.setenv("TUTOR_PRECISION", "bf16")
        assert precision.precision_plan().sampling_dtype == torch.bfloat16
        precision.precision_plan.cache_clear()
        monkeypatch.setenv("TUTOR_PRECISION", "fp32")
        assert not precision.precision_plan().train_bf16
        precision.precision_plan.cache_clear()
        monkeypatch.setenv("TUTOR_PRECISION", "half")
        with pytest.raises(ValueError, match="TUTOR_PRECISION"):
            precision.precision_plan()
    finally:
        precision.precision_plan.cache_clear()


@pytest.mark.parametrize("plan", [BF16_CPU, FP32_CPU], ids=["bf16-cpu", "plain-cpu"])
def test_every_auto_setting_follows_the_plan_and_explicit_settings_win(monkeypatch, plan):
    from app.engine import EngineConfig, GenerationEngine, SamplingConfig
    from app.versions import LoadedPolicy
    from core.chat_format import fit_context
    from rlhf.cycle import CycleConfig, precision_choices
    from rlhf.evaluate import GateConfig
    from rlhf.ppo import PPOConfig
    from rlhf.reward import RewardConfig
    from tiny import tiny_model, tiny_tokenizer

    monkeypatch.setattr(precision, "precision_plan", lambda: plan)
    bf16 = plan.train_bf16
    assert PPOConfig().use_bf16() is bf16 and RewardConfig().use_bf16() is bf16
    assert precision.training_device()["bf16"] is bf16 and precision.training_device(False)["bf16"] is False
    assert precision.inference_dtype("auto") == plan.sampling_dtype
    assert precision.inference_dtype("fp32") == torch.float32 and PPOConfig(bf16=False).use_bf16() is False

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    sampler = precision.for_sampling(model, GateConfig().precision)
    assert next(sampler.parameters()).dtype == plan.sampling_dtype
    assert (sampler is model) is (plan.sampling_dtype == torch.float32)  # fp32 already: no copy

    class Source:
        def current_version(self):
            return "v0000"

        def load(self, version):
            return LoadedPolicy(model=tiny_model(tok), tokenizer=tok, version=version)

    engine = GenerationEngine(Source(), fit_context, SamplingConfig(max_new_tokens=2), EngineConfig())
    try:
        assert {p.dtype for p in engine.policy.model.parameters()} == {plan.sampling_dtype}
    finally:
        engine.close()

    choices = precision_choices(CycleConfig())
    assert choices["ppo_bf16"] is bf16 and choices["sft_bf16"] is bf16 and choices["reward_bf16"] is bf16
    assert choices["rollouts"] == f"merged {'bf16' if bf16 else 'fp32'} copy"
    assert plan.reason in choices["summary"] and ("PPO" in choices["summary"]) is bf16


def test_the_cycle_benchmark_compares_against_the_settings_of_before(monkeypatch):
    """bench/bench_cycle.py's "before" column: nothing in bf16 on a CPU, rollouts and gate samples from the
    unmerged model without the shared prefix; on a GPU bf16 autocast for SFT and PPO as it was."""
    import bench.bench_cycle as bench
    from core.settings import merge
    from rlhf.cycle import CycleConfig, precision_choices

    decide = precision.precision_plan.__wrapped__  # the plan without its per-process cache
    for cuda in (False, True):
        overrides, env = bench.before_settings(cuda)
        monkeypatch.setattr(precision, "precision_plan", lambda: plan_for(cuda, {"avx512_bf16"}, no_measurement))
        config = merge(CycleConfig(), overrides, "retrain")
        choices = precision_choices(config)
        assert env == ("bf16" if cuda else "fp32")
        assert choices["sft_bf16"] is cuda and choices["ppo_bf16"] is cuda and choices["reward_bf16"] is False
        assert choices["rollouts"].startswith("trained model") and not choices["rollout_prefix_cache"]
        assert choices["gate_sampling"] == ("bf16" if cuda else "fp32") and not choices["gate_prefix_cache"]
        assert choices["gate_bf16"] is cuda and config.gate.batch_size == 16
        assert choices["rollout_token_draw"] == choices["gate_token_draw"] == "multinomial"
        assert "tokens drawn by multinomial" in choices["summary"]
        now = precision_choices(CycleConfig())
        assert now["ppo_bf16"] and now["rollouts"] == "merged bf16 copy" and now["gate_prefix_cache"]
        assert now["gate_bf16"] and CycleConfig().gate.batch_size == 64
        assert now["rollout_token_draw"] == now["gate_token_draw"] == "inverse_cdf"
        assert bench.column_precision("now", cuda) is None  # the machine's own plan
    # "now-fp32": the defaults as a CPU without bf16 runs them; merged rollouts and the shared prefix stay
    assert bench.column_precision("now-fp32", False) == "fp32"
    monkeypatch.setenv("TUTOR_PRECISION", "fp32")
    monkeypatch.setattr(precision, "precision_plan", decide)
    fp32 = precision_choices(CycleConfig())
    assert not fp32["sft_bf16"] and not fp32["ppo_bf16"] and not fp32["reward_bf16"] and not fp32["gate_bf16"]
    assert fp32["rollouts"] == "merged fp32 copy" and fp32["rollout_prefix_cache"] and fp32["gate_prefix_cache"]
    assert fp32["gate_sampling"] == "fp32"


def test_the_cycle_benchmarks_feedback_keeps_the_start_of_a_run_ranked_shorter_first(tmp_path):
    """bench/cycle_feedback.py: the first n comparisons and what was written before the next one; each kept
    ranking re-given as shorter answers first, whatever the learner chose."""
    import time

    from app.store import Store
    from bench.cycle_feedback import build

    generation = {"do_sample": True}
    with Store(tmp_path / "run.db") as store:
        ids = []
        for question in ("What is 2 + 2?", "And 3 + 3?"):
            conversation = store.new_conversation("ada", "chat", "You are a patient tutor.")
            store.add_message(conversation, "user", question)
            comparison, answers = store.add_comparison(conversation, question, [], [
                {"text": text, "model_version": "v0000", "generation": generation}
                for text in ("a rather long answer to it", "short", "a middling answer")])
            store.decide_comparison(comparison, "A,C,B")  # longest first: the opposite of the rule
            reply = store.add_message(conversation, "assistant", "4", model_version="v0000", generation=generation,
                                      context=[])
            store.add_rating(reply, "up", "clear")
            ids.append((comparison, answers))
            time.sleep(0.01)
    counts = build(tmp_path / "run.db", tmp_path / "short.db", comparisons=1)
    assert counts == {"comparisons": 1, "comparison_picks": 1, "ratings": 1, "rewrites": 0}
    with Store(tmp_path / "short.db") as store:
        (comparison, (long, short, middling)), (dropped, _) = ids
        assert store.comparison(comparison)["pick"]["ranking"] == [short, middling, long]
        assert store.comparison(comparison)["pick"]["choice"] == "B,C,A"
        assert store.comparison(dropped) is None


def test_the_learning_benchmark_leaves_precision_to_the_plan():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "bench" / "configs" / "learning.toml").read_text()
    assert not [line for line in text.splitlines() if line.split("=")[0].strip() in
                {"bf16", "precision", "rollout_precision", "merged_rollouts"}]

