"""The PPO step data-parallel under `accelerate launch`: two CPU processes (gloo) end with
bit-identical trained weights after sampling different answers; and what `accelerate launch` would
give the training processes from each config in configs/accelerate, read through accelerate's own
launcher code (nothing is started: the GPU configs need 8 GPUs)."""

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import (DeepSpeedPlugin, FullyShardedDataParallelPlugin, patch_environment,
                              prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env)
from accelerate.utils.dataclasses import get_module_class_from_name
from torch.distributed.fsdp import ShardingStrategy

from rlhf.ppo import PPOConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
UPDATES = 3


def test_two_processes_train_in_sync(tmp_path):
    out = tmp_path / "ranks"
    # --multi_gpu: accelerate starts MULTI_CPU processes only through mpirun; this routes the
    # launch through torchrun. The script's --cpu keeps both processes on CPU with gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(CONFIGS / "multi_cpu_2proc.yaml"), "--multi_gpu",
               "--main_process_port", "0", str(ROOT / "tests" / "ppo_distributed_check.py"), str(out),
               "--cpu", "--updates", str(UPDATES)]
    # The script imports rlhf from the repository root; tiny from its own folder.
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # one core each
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert sorted(p.name for p in out.iterdir()) == ["rank0.json", "rank1.json"]
    assert [r["rank"] for r in ranks] == [0, 1], seconds
    for r in ranks:
        assert r["world_size"] == 2 and r["distributed_type"] == "DistributedType.MULTI_CPU"
        assert r["backend"] == "gloo"
        assert len(r["history"]) == UPDATES and len(r["answers"]) == UPDATES
        assert [h["update"] for h in r["history"]] == list(range(1, UPDATES + 1))
        assert r["history"][-1]["episodes"] == UPDATES * 4 * 2  # rollout 4 per process, 2 processes
        # Training moved the weights away from the initial ones.
        assert r["trained_model"]["sha256"] != r["initial"]["sha256"]

    # Each process sampled its own answers...
    assert ranks[0]["answers"] != ranks[1]["answers"]
    # ...yet the gradients were all-reduced, so the replicas are bit-identical,
    assert ranks[0]["initial"] == ranks[1]["initial"]
    assert ranks[0]["trained"] == ranks[1]["trained"]
    # and the statistics (means over processes) and the KL controller agree.
    for h0, h1 in zip(ranks[0]["history"], ranks[1]["history"]):
        for key in ("score", "kl", "kl_coef", "value_loss", "policy_loss", "entropy"):
            assert h0[key] == h1[key], key


def launch_args() -> set[str]:
    return {action.dest for action in launch_command_parser()._actions}


@pytest.mark.parametrize("name", ["multi_cpu_2proc", "deepspeed_zero2", "fsdp"])
def test_accelerate_config_keys_are_all_read(name):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # rejects unknown top-level keys
    # The loader keeps nested sections as plain dicts; `accelerate launch` copies their keys onto
    # its own arguments, where a misspelt key would be dropped without a word.
    nested = dict(config.deepspeed_config) | dict(config.fsdp_config)
    assert set(nested) <= launch_args(), set(nested) - launch_args()


def launched(name: str, *flags: str) -> tuple[str, int, dict[str, str]]:
    """(launcher, processes on this machine, environment variables it adds for them) of
    `accelerate launch --config_file NAME.yaml FLAGS script.py`: accelerate's own parser, defaults
    from the config and environment preparation, dispatched in launch_command's order, but nothing
    started."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), *flags, "script.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed and not args.cpu:
        fields = [*defaults.deepspeed_config, *(["mixed_precision"] if mixed_precision_from_config else [])]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        launcher, (_, env) = "deepspeed", prepare_deepspeed_cmd_env(args)
    elif (args.use_fsdp or args.multi_gpu) and not args.cpu:
        launcher, env = "torchrun", prepare_multi_gpu_env(args)
    else:
        launcher, (_, env) = "simple", prepare_simple_launcher_cmd_env(args)
    processes = int(args.nproc_per_node) if launcher != "simple" else 1  # simple: mpirun only with a hostfile
    return launcher, processes, {k: v for k, v in env.items() if os.environ.get(k) != v}


@pytest.fixture(autouse=True)
def _no_accelerate_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)


def test_multi_cpu_config_gives_two_processes_only_through_torchrun():
    # What docs/multi_gpu.md says: without --multi_gpu one process, and not a word about it...
    assert launched("multi_cpu_2proc")[:2] == ("simple", 1)
    # ...with it two torchrun processes in fp32; the launcher does not tell them to stay on the CPU,
    # which is why the check script sets ACCELERATE_USE_CPU itself (--cpu).
    launcher, processes, env = launched("multi_cpu_2proc", "--multi_gpu", "--main_process_port", "0")
    assert (launcher, processes) == ("torchrun", 2)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no" and "ACCELERATE_USE_CPU" not in env


def test_deepspeed_config_gives_the_processes_zero2_in_bf16_clipped_as_ppo_clips():
    launcher, processes, env = launched("deepspeed_zero2")
    assert (launcher, processes) == ("deepspeed", 8)
    # AcceleratorState turns DEEPSPEED on from this variable and its precision from the next.
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with patch_environment(**env):
        plugin = DeepSpeedPlugin()  # what each process's Accelerator builds from its environment
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    # DeepSpeed clips inside its own step, in place of train_ppo's clip_grad_norm_.
    assert plugin.deepspeed_config["gradient_clipping"] == PPOConfig().max_grad_norm
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1


def test_fsdp_config_shards_the_embedded_model_one_decoder_layer_per_unit_in_bf16():
    from transformers import AutoConfig, AutoModelForCausalLM

    from app.embedded import GGUF_FILE, gguf_location

    launcher, processes, env = launched("fsdp")
    assert (launcher, processes) == ("torchrun", 8)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # The plugin each process's Accelerator builds; sync_module_states (and the RAM-efficient
    # loading that needs it) want a GPU to build on, so they are off for this CPU-only reading.
    with patch_environment(**env | {"FSDP_SYNC_MODULE_STATES": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.use_orig_params  # LoRA: frozen base and trainable adapters in the same units

    # The embedded model's own architecture, on the meta device (no weights read).
    config = AutoConfig.from_pretrained(gguf_location(), gguf_file=GGUF_FILE)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plugin.set_auto_wrap_policy(model)  # raises if the class to wrap is not in the model
    assert isinstance(plugin.auto_wrap_policy, functools.partial)
    units = [m for m in model.modules() if plugin.auto_wrap_policy(m, recurse=False, nonwrapped_numel=0)]
    layer = get_module_class_from_name(model, plugin.transformer_cls_names_to_wrap[0])
    assert len(units) == config.num_hidden_layers and {type(m) for m in units} == {layer}
    assert {type(m) for m in model.model.layers} == {layer}  # the decoder layers, nothing else
