"""The PPO step data-parallel under `accelerate launch`: two CPU processes (gloo) end with
bit-identical trained weights after sampling different answers; and the accelerate configs for
GPUs parse with accelerate's own loader."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
UPDATES = 3


def test_two_processes_train_in_sync(tmp_path):
    out = tmp_path / "ranks"
    # --multi_gpu: accelerate starts MULTI_CPU processes only through mpirun; this routes the
    # launch through torchrun. The script's --cpu keeps both processes on CPU with gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(CONFIGS / "multi_cpu_2proc.yaml"), "--multi_gpu",
               "--main_process_port", "0", str(ROOT / "rlhf" / "ppo_distributed_check.py"), str(out),
               "--cpu", "--updates", str(UPDATES)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # one core each
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


@pytest.mark.parametrize("name, distributed_type, num_processes, mixed_precision", [
    ("multi_cpu_2proc", DistributedType.MULTI_CPU, 2, "no"),
    ("deepspeed_zero2", DistributedType.DEEPSPEED, 8, "bf16"),
    ("fsdp", DistributedType.FSDP, 8, "bf16"),
])
def test_accelerate_configs_load(name, distributed_type, num_processes, mixed_precision):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # rejects unknown top-level keys
    assert config.distributed_type == distributed_type
    assert config.num_processes == num_processes and config.num_machines == 1
    assert config.mixed_precision == mixed_precision  # a string, not YAML's false
    assert config.use_cpu == (distributed_type == DistributedType.MULTI_CPU)
    # The loader keeps nested sections as plain dicts; `accelerate launch` copies their keys onto
    # its own arguments, where a misspelt key would be dropped without a word.
    nested = dict(config.deepspeed_config) | dict(config.fsdp_config)
    assert set(nested) <= launch_args(), set(nested) - launch_args()
    if distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2
        assert config.deepspeed_config["gradient_accumulation_steps"] == 1
    if distributed_type == DistributedType.FSDP:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == LlamaDecoderLayer.__name__
