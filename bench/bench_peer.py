"""Our PPO against TRL's RLOO trainer on the same base model, prompts, reward model, episode budget and answer.

    python bench/bench_peer.py --db docs/learning/uses_example-bag-of-tokens-run16/conversations.db.gz \
        [--reward-form bag_of_tokens] [--episodes 256] [--models-dir DIR]

TRL no longer ships PPO; its online trainers for this job are RLOO and GRPO. Both take a reward function,
a prompt dataset and a LoRA config, as our loop does. In one run:

1. the feedback in `--db` becomes training groups and PPO prompts as a cycle makes them (rlhf/data.py); one
   reward model is trained on them (`--reward-form`), and the gate's prompts are chosen (`gate_prompts`);
2. our `train_ppo` and TRL's `RLOOTrainer` each train a LoRA policy from the base (v0000) for `--episodes`
   answers of the served length and temperature, each in its own process (so each peak RSS is its own);
3. the gate judges each trained policy against the base on the same held-out prompts, by the same reward.

Prints episodes/s, peak memory and the gate's length-controlled gain (95% interval) and KL of each, and the
ratios ours / peer. `--out` keeps the figures as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_learning import unpack_database  # noqa: E402
from bench.bench_serving import peak_rss_mib  # noqa: E402

TRAINERS = ("ours", "rloo")
DEFAULT_PPO_EPOCHS = 2  # rlhf/ppo.py PPOConfig.ppo_epochs; tests/test_peer.py checks they agree
REWARD_FORMS = ("score_head", "implicit", "bag_of_tokens")  # one reward model, shared by both trainers


def prepare(args, work: Path) -> dict:
    """Training groups, PPO prompts, the gate's prompts and one reward model, in `work`."""
    from app.embedded import ensure_base
    from app.store import Store
    from app.versions import ModelRegistry
    from core.chat_format import TUTOR_SYSTEM_PROMPT
    from rlhf.data import collect, gate_prompts, shipped_heldout_prompts, split_data
    from rlhf.ensemble import save_any
    from rlhf.reward import RewardConfig, train_reward_model

    db = work / "c.db"
    if args.db.suffix == ".gz":
        unpack_database(args.db, db)
    else:
        shutil.copy(args.db, db)
    registry = ModelRegistry(args.models_dir)
    ensure_base(registry, args.model)
    with Store(db) as store:
        train, heldout = split_data(collect(store), 0.15)
    eval_prompts, own = gate_prompts(train, heldout, shipped_heldout_prompts(TUTOR_SYSTEM_PROMPT), args.gate_prompts)
    rm = train_reward_model(registry.path("v0000"), train.preference_groups, heldout.preference_groups,
                            RewardConfig(form=args.reward_form))
    save_any(rm, work / "rm")
    plan = {"base": str(registry.path("v0000")), "prompts": [p.prompt for p in train.ppo_prompts],
            "eval_prompts": eval_prompts, "eval_own": own, "reward_heldout_accuracy": rm.metrics["heldout_accuracy"],
            "reward_form": args.reward_form, "train_pairs": train.n_pairs}
    (work / "plan.json").write_text(json.dumps(plan))
    return plan


def reward_of(work: Path):
    from rlhf.ensemble import load_any

    rm = load_any(work / "rm")
    return rm, lambda prompts, completions, _ids=None: rm.score(prompts, completions)


def train_ours(args, work: Path, plan: dict) -> dict:
    from app.versions import load_pretrained
    from rlhf.ppo import PPOConfig, train_ppo

    policy = load_pretrained(Path(plan["base"]), "v0000")
    rm, reward_fn = reward_of(work)
    config = PPOConfig(total_episodes=args.episodes, learning_rate=args.learning_rate, seed=args.seed)
    if args.ppo_epochs:
        config.ppo_epochs = args.ppo_epochs
    start = time.perf_counter()
    result = train_ppo(policy.model, policy.tokenizer, plan["prompts"], reward_fn, config,
                       token_reward_fn=rm.token_rewards())
    seconds = time.perf_counter() - start
    result.model.save_pretrained(work / trainer_name(args))
    episodes = max((h["episodes"] for h in result.history if "score" in h), default=0)  # trained on
    return {"seconds": seconds, "episodes": episodes, "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature, "epochs": config.ppo_epochs,
            "generation_seconds": sum(h.get("gen_seconds", 0.0) for h in result.history)}


def train_rloo(args, work: Path, plan: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from core.chat_format import ANSWER_MAX_NEW_TOKENS, ANSWER_TEMPERATURE
    from core.precision import wants_bf16

    _, reward_fn = reward_of(work)
    sampling = [0.0]  # seconds in TRL's generation step (sampling the answers), as ours records it

    def reward(prompts, completions, **_):  # TRL passes conversations; the reward model reads text answers
        return reward_fn(prompts, [c[-1]["content"] for c in completions]).tolist()

    tokenizer = AutoTokenizer.from_pretrained(plan["base"])
    batch = 16  # answers per step, as our rollout batch: 4 prompts x 4 answers each
    config = RLOOConfig(output_dir=str(work / "rloo-run"), use_cpu=not torch.cuda.is_available(),
                        bf16=wants_bf16("auto"), per_device_train_batch_size=batch, num_generations=4,
                        max_completion_length=ANSWER_MAX_NEW_TOKENS, temperature=ANSWER_TEMPERATURE,
                        num_iterations=args.rloo_iterations,  # steps on each batch of answers
                        learning_rate=args.learning_rate, max_steps=args.episodes // batch * args.rloo_iterations,
                        logging_steps=1,
                        save_strategy="no", report_to=[], seed=args.seed)
    trainer = RLOOTrainer(model=plan["base"], reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in plan["prompts"]]),
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    generate = trainer._generate  # a private method: if TRL renames it, this fails loudly in tests/test_peer.py

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            sampling[0] += time.perf_counter() - t0

    trainer._generate = timed_generate
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.merge_and_unload().save_pretrained(work / trainer_name(args))
    return {"seconds": seconds, "episodes": trainer.state.global_step * batch // config.num_iterations,
            "max_new_tokens": config.max_completion_length,
            "temperature": config.temperature, "epochs": config.num_iterations, "generation_seconds": sampling[0]}


def trainer_name(args) -> str:
    """"ours" and "rloo" with their default passes over each batch; "ours-e1", "rloo-i2" otherwise."""
    if args.run == "ours":
        return "ours" if args.ppo_epochs in (None, DEFAULT_PPO_EPOCHS) else f"ours-e{args.ppo_epochs}"
    return "rloo" if args.rloo_iterations == 1 else f"rloo-i{args.rloo_iterations}"


def judge(args, work: Path, plan: dict, trainer: str) -> dict:
    """The gate's verdict on the trained policy against the base, by the shared reward model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.evaluate import GateConfig, GateModels, gate

    _, reward_fn = reward_of(work)
    tokenizer = AutoTokenizer.from_pretrained(plan["base"])
    base = AutoModelForCausalLM.from_pretrained(plan["base"]).eval()
    new = AutoModelForCausalLM.from_pretrained(work / trainer).eval()
    verdict = gate(GateModels(current=base, new=new, reference=base, base=base), tokenizer, reward_fn,
                   plan["eval_prompts"], GateConfig(samples_per_prompt=args.gate_samples))
    m = verdict.metrics
    return {"gain": m["reward_gain_length_controlled"], "gain_ci95": m["reward_gain_ci95"],
            "kl_reference": m["kl_to_reference"], "gate_prompts": m["heldout_prompts"], "promote": verdict.promote,
            "reward_new": m["reward_new"], "reward_base": m["reward_current"], "length_new": m["length_new"]}


def run_one(args) -> None:
    """One trainer in this process: train, judge, and its figures as JSON in args.out."""
    work = args.work
    plan = json.loads((work / "plan.json").read_text())
    figures = (train_ours if args.run == "ours" else train_rloo)(args, work, plan)
    figures["peak_rss_mib"] = peak_rss_mib(os.getpid())  # training's peak: the gate below loads two more models
    figures |= judge(args, work, plan, trainer_name(args))
    args.child_out.write_text(json.dumps(figures))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, default=ROOT / "docs/learning/uses_example-bag-of-tokens-run16/conversations.db.gz")
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-models")
    ap.add_argument("--model", type=Path, help="base model directory (default: the embedded model)")
    ap.add_argument("--reward-form", default="bag_of_tokens", choices=REWARD_FORMS)
    ap.add_argument("--episodes", type=int, default=256)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--gate-prompts", type=int, default=24)
    ap.add_argument("--gate-samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    ap.add_argument("--ppo-epochs", type=int, nargs="+", default=[DEFAULT_PPO_EPOCHS],
                    help="our PPO once per value: epochs over each batch of rollouts")
    ap.add_argument("--rloo-iterations", type=int, nargs="+", default=[1],
                    help="RLOO once per value: steps on each batch of answers (TRL's num_iterations)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--run", choices=TRAINERS, help=argparse.SUPPRESS)  # one trainer, in a child process
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        args.ppo_epochs, args.rloo_iterations = args.ppo_epochs[0], args.rloo_iterations[0]
        return run_one(args)
    work = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    plan = prepare(args, work)
    print(f"{len(plan['prompts'])} PPO prompts, {plan['train_pairs']} pairs; reward model {plan['reward_form']}, "
          f"held-out accuracy {plan['reward_heldout_accuracy']:.2f}; gate on {len(plan['eval_prompts'])} prompts "
          f"({plan['eval_own']} of the class's), {args.gate_samples} answers each", flush=True)
    runs = [(t, "--ppo-epochs" if t == "ours" else "--rloo-iterations", n) for t in args.trainers
            for n in (args.ppo_epochs if t == "ours" else args.rloo_iterations)]
    results = {}
    for trainer, flag, passes in runs:
        name = trainer_name(argparse.Namespace(run=trainer, ppo_epochs=passes, rloo_iterations=passes))
        out = work / f"{name}.json"
        subprocess.run([sys.executable, __file__, "--run", trainer, "--work", str(work), "--child-out", str(out),
                        "--episodes", str(args.episodes), "--learning-rate", str(args.learning_rate),
                        "--gate-samples", str(args.gate_samples), "--seed", str(args.seed), flag, str(passes)],
                       check=True)
        results[name] = r = json.loads(out.read_text())
        print(f"{name:7s} {r['episodes']} episodes in {r['seconds']:.0f}s = {r['episodes'] / r['seconds']:.3f} "
              f"episodes/s (generation {r['generation_seconds'] / r['seconds']:.0%} of it); peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB; gate gain {r['gain']:+.3f} "
              f"[{r['gain_ci95'][0]:+.3f}, {r['gain_ci95'][1]:+.3f}], KL {r['kl_reference']:.2f}", flush=True)
    for ours in (n for n in results if n.startswith("ours")):
        for peer in (n for n in results if n.startswith("rloo")):
            a, b = results[ours], results[peer]
            speed = (a["episodes"] / a["seconds"]) / (b["episodes"] / b["seconds"])
            print(f"{ours} / {peer}: {speed:.2f}x episodes/s (target >= 1.5), peak memory "
                  f"{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x, gain {a['gain']:+.3f} vs {b['gain']:+.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
