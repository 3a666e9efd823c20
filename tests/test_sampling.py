"""Inverse transform sampling (core/sampling.py): the distribution generate's own draw samples, from one
uniform number per row, inside generate, in PPO's rollouts, the gate's samples and the serving engine."""
import pytest
import torch
from transformers import GenerationConfig

from core.prefix_cache import generate_answers
from core.sampling import draw_tokens, generate_kwargs_for
from tiny import tiny_model, tiny_tokenizer


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / len(tokens)


def test_tokens_are_drawn_with_their_probabilities_and_never_a_zero_one():
    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    tokens = draw_tokens(probs.expand(40_000, -1))
    # 40k draws: a share's standard error is at most 0.0025; 0.01 is four of them.
    assert torch.allclose(frequencies(tokens, 6), probs.double(), atol=0.01)
    assert set(tokens.tolist()) == {1, 3, 4}
    assert draw_tokens(torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 100)).eq(2).all()


@pytest.mark.parametrize("u, expected", [(0.0, 1), (1.0, 4)])
def test_the_ends_of_the_uniform_range_land_on_tokens_that_have_probability(monkeypatch, u, expected):
    """u = 0 must not pick a leading zero-probability token, and u * total rounding up to the total (u = 1
    stands for it) must not run past the last token with probability."""
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full((1, 1), u, dtype=torch.float64))
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    assert draw_tokens(probs).tolist() == [expected]


def test_each_row_draws_from_its_own_generator():
    probs = torch.softmax(torch.randn(3, 50), dim=-1)

    def draws(seeds):
        return draw_tokens(probs, [torch.Generator().manual_seed(s) for s in seeds]).tolist()
    assert draws([1, 2, 3]) == draws([1, 2, 3])
    assert draws([1, 2, 3])[1] == draws([7, 2, 9])[1]  # a row's token depends on its own seed only
    assert len({tuple(draws([s, s, s])) for s in range(20)}) > 1


@pytest.mark.parametrize("filters", [{"temperature": 0.4, "top_k": 0, "top_p": 1.0},
                                     {"temperature": 0.7, "top_k": 6, "top_p": 1.0},
                                     {"temperature": 1.0, "top_k": 0, "top_p": 0.5}])
def test_generate_samples_the_filtered_distribution_it_would_sample_itself(filters):
    """The first answer token of 6,000 rows of one prompt: its frequencies are the model's softmax after
    temperature, top-k and top-p, as generate's own draw samples it; a filtered-out token never comes."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=4).eval()
    with torch.no_grad():  # sharper logits than a random init gives, so the filters matter
        model.lm_head.weight.mul_(8)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is a fraction?"}], tokenize=True,
                                     add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    probs = {}
    for name, f in (("asked", filters), ("unfiltered", {"temperature": 1.0, "top_k": 0, "top_p": 1.0})):
        p = torch.softmax(logits / f["temperature"], -1)
        if f["top_k"]:
            p = torch.where(p >= p.topk(f["top_k"]).values[-1], p, 0.0)
        if f["top_p"] < 1.0:  # the smallest set of most likely tokens holding top_p of the mass
            ranked, order = p.sort(descending=True)
            keep = (ranked.cumsum(0) - ranked) < f["top_p"]
            p = torch.zeros_like(p).scatter(0, order[keep], ranked[keep])
        probs[name] = p / p.sum()
    tv = lambda a, b: 0.5 * (a - b).abs().sum().item()  # noqa: E731 (total variation distance)
    assert tv(probs["asked"], probs["unfiltered"]) > 0.15  # the filters change the distribution clearly

    config = GenerationConfig(do_sample=True, max_new_tokens=1, eos_token_id=tok.eos_token_id, **filters)
    torch.manual_seed(0)
    first = generate_answers(model, [prompt] * 6000, tok.pad_token_id, None, config)[:, 0]
    seen = frequencies(first, len(probs["asked"]))
    assert tv(seen, probs["asked"]) < 0.05
    assert seen[probs["asked"] == 0].sum() == 0


def test_greedy_and_unknown_filters_keep_generate_s_own_path():
    greedy = GenerationConfig(do_sample=False, max_new_tokens=3)
    assert generate_kwargs_for(greedy, "inverse_cdf") == {"generation_config": greedy}
    typical = GenerationConfig(do_sample=True, typical_p=0.9)
    assert "logits_processor" not in generate_kwargs_for(typical, "inverse_cdf")
    sampled = GenerationConfig(do_sample=True, temperature=0.7)
    assert generate_kwargs_for(sampled, "multinomial") == {"generation_config": sampled}
    kwargs = generate_kwargs_for(sampled, "inverse_cdf")
    assert kwargs["generation_config"].do_sample is False and sampled.do_sample is True  # a copy changed
    with pytest.raises(ValueError, match="token_draw"):
        generate_kwargs_for(sampled, "gumbel")


def test_rollouts_and_gate_samples_draw_by_inverse_cdf_unless_told_otherwise(monkeypatch):
    """generate's own draw (torch.multinomial, a random number per vocabulary entry) is not called by
    PPO's rollouts or the gate's samples by default, and is with token_draw = "multinomial"."""
    from accelerate.state import AcceleratorState

    from rlhf import evaluate
    from rlhf.evaluate import GateConfig, head_to_head
    from rlhf.ppo import PPOConfig, train_ppo

    calls, gate_draws = [], []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **kw: calls.append(1) or multinomial(*a, **kw))
    monkeypatch.setattr(evaluate, "generate_answers", lambda *a, token_draw, **kw: gate_draws.append(token_draw)
                        or generate_answers(*a, token_draw=token_draw, **kw))
    tok = tiny_tokenizer()
    prompts = [[{"role": "user", "content": q}] for q in ("What is a fraction?", "Hi", "Why is the sky blue?")]
    for draw in ("inverse_cdf", "multinomial"):
        calls.clear()
        AcceleratorState._reset_state(True)
        config = PPOConfig(total_episodes=4, rollout_batch_size=4, minibatch_size=4, ppo_epochs=1,
                           max_new_tokens=4, stop_kl=0, token_draw=draw)
        train_ppo(tiny_model(tok), tok, prompts, lambda p, c, ids: torch.zeros(len(ids)), config)
        ppo_calls = len(calls)
        gate = GateConfig(max_new_tokens=4, token_draw=draw)
        gate_draws.clear()
        head_to_head(tiny_model(tok), tiny_model(tok, seed=1), tok, prompts, 2, gate)
        assert gate_draws == [draw, draw]  # both policies' answers
        assert (ppo_calls > 0, len(calls) > ppo_calls) == ((draw == "multinomial"),) * 2, draw
    with pytest.raises(ValueError, match="token_draw"):
        PPOConfig(token_draw="gumbel")
    with pytest.raises(ValueError, match="token_draw"):
        GateConfig(token_draw="gumbel")
