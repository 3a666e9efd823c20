"""The vLLM rollout path's choice and its fallback (CI has no GPU and no vLLM: the plain path samples)."""
from types import SimpleNamespace

import pytest
import torch

from rlhf.ppo import PPOConfig, rollout_engine
from rlhf.vllm_rollouts import answers_tensor, choose_rollout_engine


def test_vllm_only_where_it_can_run():
    assert choose_rollout_engine("auto", cuda=True, installed=True).engine == "vllm"
    assert choose_rollout_engine("vllm", cuda=True, installed=True).engine == "vllm"
    for cuda, installed, why in ((False, True, "CUDA"), (True, False, "not installed")):
        for setting in ("auto", "vllm"):
            choice = choose_rollout_engine(setting, cuda=cuda, installed=installed)
            assert choice.engine == "hf" and why in choice.reason
    assert choose_rollout_engine("hf", cuda=True, installed=True).engine == "hf"
    if not torch.cuda.is_available():  # CI: the default samples with generate
        assert choose_rollout_engine("auto").engine == "hf"
    with pytest.raises(ValueError, match="rollout_engine"):
        PPOConfig(rollout_engine="sglang")


def test_vllm_is_not_asked_for_what_it_cannot_take(monkeypatch):
    import rlhf.ppo as ppo

    monkeypatch.setattr(ppo, "choose_rollout_engine",
                        lambda setting: SimpleNamespace(engine="hf" if setting == "hf" else "vllm", reason=setting))
    config = PPOConfig()
    assert rollout_engine(config, merged=True, processes=1).engine == "vllm"
    assert rollout_engine(config, merged=False, processes=1).engine == "hf"  # FSDP / ZeRO-3: no merged copy
    assert rollout_engine(config, merged=True, processes=2).engine == "hf"
    assert rollout_engine(PPOConfig(rollout_engine="hf"), merged=True, processes=1).engine == "hf"


def completion(ids, finish, stop=None):
    return SimpleNamespace(token_ids=ids, finish_reason=finish, stop_reason=stop)


def test_vllm_answers_read_as_generate_answers():
    """Right-padded; an answer that stopped on a stop token ends in it even when vLLM left it out; one cut
    at the length limit has none (PPO's response mask counts it unfinished)."""
    eos, pad = [2, 3], 0
    out = answers_tensor([completion([5, 6, 2], "stop"), completion([7], "stop", 3), completion([8, 9, 9, 9], "length"),
                          completion([], "stop")], eos, pad)
    assert out.tolist() == [[5, 6, 2, 0], [7, 3, 0, 0], [8, 9, 9, 9], [2, 0, 0, 0]]
    from rlhf.ppo import response_mask

    mask, ended = response_mask(out, eos)
    assert ended.tolist() == [True, True, False, True]
    assert mask.sum(1).tolist() == [3, 2, 4, 1]
