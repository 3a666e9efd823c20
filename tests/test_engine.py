"""The continuous-batching engine: same tokens as plain generate, joins mid-flight, cancels, swaps policy."""
import threading
import time

import pytest
import torch

from dataclasses import replace

from app.engine import EngineBusy, EngineConfig, EngineFault, GenerationEngine, SamplingConfig
from core.chat_format import TUTOR_SYSTEM_PROMPT, fit_context
from app.versions import ModelRegistry, load_pretrained
from tiny import tiny_model, tiny_tokenizer

GREEDY = SamplingConfig(max_new_tokens=12, do_sample=False, repetition_penalty=1.0)


class FixedSource:
    def __init__(self, policies):
        self.policies = policies
        self.current = next(iter(policies))

    def current_version(self):
        return self.current

    def load(self, version):
        return self.policies[version]


def policy(seed=0, version="v0000"):
    from app.versions import LoadedPolicy

    tok = tiny_tokenizer()
    return LoadedPolicy(model=tiny_model(tok, seed), tokenizer=tok, version=version)


def conversation(text, system=TUTOR_SYSTEM_PROMPT):
    """A first question, under the tutor's system prompt: the engine's cached system turn serves it."""
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def reference_greedy(p, messages, n):
    _, ids = fit_context(p.tokenizer, messages, 10_000)
    out = p.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                           eos_token_id=p.tokenizer.eos_token_id, pad_token_id=p.tokenizer.pad_token_id)
    reply = out[0, len(ids):].tolist()
    return reply[:reply.index(p.tokenizer.eos_token_id)] if p.tokenizer.eos_token_id in reply else reply


def endless(engine_factory, sampling: SamplingConfig, **config):
    """An engine whose policy never ends a reply by itself: every reply runs to its length limit."""
    p = policy()
    p.model.generation_config.eos_token_id = -1
    return engine_factory(FixedSource({"v0000": p}), sampling=sampling, **config)


@pytest.fixture
def engine_factory():
    engines = []

    def make(source, sampling=GREEDY, **kw):
        e = GenerationEngine(source, fit_context, sampling, EngineConfig(**kw))
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()


def test_batched_rows_match_plain_generate(engine_factory):
    """Rows of different lengths decoded together give exactly the tokens of one-at-a-time generate."""
    p = policy()
    engine = engine_factory(FixedSource({"v0000": p}))
    prompts = ["What is a fraction?", "Hi", "Explain photosynthesis to a ten year old, with an example please."]
    requests = [engine.submit(conversation(t)) for t in prompts]
    got = [list(r.tokens(timeout=30)) for r in requests]
    for text, tokens in zip(prompts, got):
        assert tokens == reference_greedy(p, conversation(text), GREEDY.max_new_tokens)
    assert max(engine.stats.forward_batch_sizes) >= 2


@pytest.mark.parametrize("narrow", [{"top_k": 1, "top_p": 1.0}, {"top_k": 0, "top_p": 1e-6}])
def test_served_replies_are_sampled_inside_top_k_and_top_p(engine_factory, narrow):
    """A sampled reply keeps only the tokens its top-k and top-p leave: narrowed to one token, each seed's
    reply is the greedy one (at temperature 1 a random tiny model would otherwise wander off it)."""
    p = policy()
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, repetition_penalty=1.0, **narrow)
    engine = engine_factory(FixedSource({"v0000": p}), sampling=sampling)
    messages = conversation("What is a fraction?")
    greedy = reference_greedy(p, messages, sampling.max_new_tokens)
    assert [list(engine.submit(messages, seed=s).tokens(timeout=30)) for s in range(4)] == [greedy] * 4


def test_prompts_under_the_system_prompt_start_from_its_cache_and_decode_as_whole_prompts_do(engine_factory):
    """The system turn's keys and values are computed once at load; a batch mixing prompts that start with
    it (prefilled from the cache, padding in the middle) and prompts that do not (prefilled whole) still
    gives each exactly its one-at-a-time greedy reply."""
    p = policy(seed=3)
    with torch.no_grad():  # peaked attention and logits: at the random init a wrong position hardly shows
        for linear in p.model.modules():
            if isinstance(linear, torch.nn.Linear):
                linear.weight.mul_(8)
    engine = engine_factory(FixedSource({"v0000": p}))
    asked = [conversation("What is a fraction?"), conversation("Hi"), conversation("Hi", system="Be brief."),
             conversation("Explain photosynthesis to a ten year old, with an example please.")]
    requests = [engine.submit(messages) for messages in asked]
    got = [list(r.tokens(timeout=30)) for r in requests]
    for messages, tokens in zip(asked, got):
        assert tokens == reference_greedy(p, messages, GREEDY.max_new_tokens)
    assert engine.stats.prefix_hits == 3
    plain = engine_factory(FixedSource({"v0000": p}), prefix_cache=False)
    assert [list(plain.submit(m).tokens(timeout=30)) for m in asked] == got and plain.stats.prefix_hits == 0


def test_a_bf16_engine_serves_bf16_weights(engine_factory):
    """precision = "bf16" casts the served weights (about 2x faster decoding on a CPU with bf16
    instructions), and the reply is the greedy reply of those bf16 weights."""
    p = policy(seed=2)
    engine = engine_factory(FixedSource({"v0000": p}), precision="bf16")
    assert {param.dtype for param in engine.policy.model.parameters()} == {torch.bfloat16}
    tokens = list(engine.submit(conversation("What is a fraction?")).tokens(timeout=30))
    assert tokens and tokens == reference_greedy(p, conversation("What is a fraction?"), GREEDY.max_new_tokens)
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        EngineConfig(precision="half")


def test_request_joins_running_batch_and_matches(engine_factory):
    """A request admitted while another is mid-reply shares its forward passes and is still exact."""
    p = policy(seed=1)
    engine = engine_factory(FixedSource({"v0000": p}), sampling=SamplingConfig(max_new_tokens=40, do_sample=False,
                                                                              repetition_penalty=1.0))
    first = engine.submit(conversation("Tell me about water."))
    stream = first.tokens(timeout=30)
    early = [next(stream) for _ in range(3)]
    second = engine.submit(conversation("And Paris?"))
    rest_first = early + list(stream)
    second_tokens = list(second.tokens(timeout=30))
    assert rest_first == reference_greedy(p, conversation("Tell me about water."), 40)
    assert second_tokens == reference_greedy(p, conversation("And Paris?"), 40)
    assert max(engine.stats.forward_batch_sizes) >= 2


def test_running_rows_are_not_repeated_when_requests_join(engine_factory):
    """Requests joining mid-reply must not re-send the running rows' latest tokens."""
    from app.versions import LoadedPolicy

    tok = tiny_tokenizer()
    # Untied embeddings and logits of a realistic scale: a tied random model just repeats its input token,
    # which would hide a repeated token.
    p = LoadedPolicy(model=tiny_model(tok, seed=1, tie=False), tokenizer=tok, version="v0000")
    p.model.model.norm.weight.data *= 8
    p.model.generation_config.eos_token_id = -1  # replies run to their limit
    forward = p.model.forward

    def slow_forward(*args, **kwargs):  # the pace of a real model, so every join happens mid-reply
        time.sleep(0.01)
        return forward(*args, **kwargs)

    n = 60
    # the penalty keeps greedy decoding from repeating one token, so a repeated token would show
    engine = engine_factory(FixedSource({"v0000": p}), sampling=SamplingConfig(max_new_tokens=n, do_sample=False,
                                                                              repetition_penalty=1.3))
    p.model.forward = slow_forward
    first = engine.submit(conversation("Tell me about water."))
    stream = first.tokens(timeout=30)
    tokens = [next(stream)]
    joined = []
    for i in range(5):  # five requests join while the first is still running
        joined.append(engine.submit(conversation(f"Question {i}")))
        tokens.append(next(stream))
    tokens += list(stream)
    p.model.forward = forward
    assert len(tokens) == n
    reference = p.model.generate(torch.tensor([fit_context(p.tokenizer, conversation("Tell me about water."), 10_000)[1]]),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.3,
                                 pad_token_id=0)
    assert tokens == reference[0, -n:].tolist()
    for r in joined:
        assert len(list(r.tokens(timeout=30))) == n
    assert max(engine.stats.forward_batch_sizes) >= 3


def test_requests_that_arrive_during_a_prefill_are_prefilled_before_the_next_decode_step(engine_factory):
    """A burst of first turns reaches the engine spread out: those that arrive while the first is being
    prefilled get their own prefill at once, not after a decode step of the rows already running."""
    p = policy()
    p.model.generation_config.eos_token_id = -1
    engine = engine_factory(FixedSource({"v0000": p}))
    forward, inside, release = p.model.forward, threading.Event(), threading.Event()
    calls = []

    def held_forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        if len(calls) == 1:  # the first prefill: the burst's other turns arrive while it runs
            inside.set()
            release.wait(timeout=30)
        return forward(*args, **kwargs)

    p.model.forward = held_forward
    first = engine.submit(conversation("Tell me about water."))
    assert inside.wait(timeout=30)
    later = [engine.submit(conversation(f"Question {i}")) for i in range(3)]
    release.set()
    for r in [first, *later]:
        assert len(list(r.tokens(timeout=30))) == GREEDY.max_new_tokens
    p.model.forward = forward
    rows_and_widths = [tuple(shape) for shape in calls]
    assert rows_and_widths[0][0] == 1 and rows_and_widths[1][0] == 3 and rows_and_widths[1][1] > 1  # two prefills
    assert rows_and_widths[2] == (4, 1)  # then the first decode step, of all four rows
    assert engine.stats.forward_batch_sizes[1] == 1


def test_cancel_stops_generation_and_frees_the_row(engine_factory):
    engine = endless(engine_factory, SamplingConfig(max_new_tokens=1000, do_sample=False))
    request = engine.submit(conversation("Go on forever"))
    stream = request.tokens(timeout=30)
    next(stream)
    request.cancel()
    list(stream)  # ends instead of running 1,000 steps
    assert request.finish_reason == "cancelled"
    assert len(request.token_ids) < 1000
    deadline = time.time() + 5
    while engine.load_stats()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert engine.load_stats()["running"] == 0


def test_queue_is_bounded(engine_factory):
    engine = endless(engine_factory, SamplingConfig(max_new_tokens=1000), max_batch_size=1, max_queue=2)
    running = engine.submit(conversation("one"))
    next(running.tokens(timeout=30))
    waiting = [engine.submit(conversation("two")), engine.submit(conversation("three"))]
    with pytest.raises(EngineBusy, match="busy"):
        engine.submit(conversation("four"))
    for r in [running, *waiting]:
        r.cancel()


def test_a_group_is_queued_all_or_none(engine_factory):
    engine = endless(engine_factory, SamplingConfig(max_new_tokens=1000), max_batch_size=1, max_queue=3)
    running = engine.submit(conversation("one"))
    next(running.tokens(timeout=30))
    waiting = engine.submit(conversation("two"))
    with pytest.raises(EngineBusy, match="busy"):  # room for two more, not three
        engine.submit_group(conversation("three answers"), 3)
    assert engine.load_stats()["waiting"] == 1, "part of a refused group was queued"
    group = engine.submit_group(conversation("two answers"), 2)
    assert engine.load_stats()["waiting"] == 3
    for r in [running, waiting]:
        r.cancel()
    group.cancel()


def test_a_group_streams_each_reply_as_plain_generate_would(engine_factory):
    p = policy()
    engine = engine_factory(FixedSource({"v0000": p}))
    group = engine.submit_group(conversation("Compare these"), 3)
    tokens = {i: [] for i in range(3)}
    arrivals = []
    for new in group.token_chunks(timeout=30):
        arrivals.append(sorted(new))
        for i, more in new.items():
            tokens[i].extend(more)
    expected = reference_greedy(p, conversation("Compare these"), GREEDY.max_new_tokens)
    assert all(tokens[i] == expected for i in range(3))  # greedy: the same reply k times, none mixed up
    assert any(len(a) == 3 for a in arrivals), "the replies were not decoded side by side"
    assert [r.finish_reason for r in group.requests] == [group.requests[0].finish_reason] * 3


def test_cancelling_one_reply_of_a_group_leaves_the_others_running(engine_factory):
    engine = endless(engine_factory, SamplingConfig(max_new_tokens=40, do_sample=False))
    group = engine.submit_group(conversation("Go on"), 2)
    tokens, cancelled = {0: [], 1: []}, False
    for new in group.token_chunks(timeout=30):
        assert not (cancelled and 0 in new), "a cancelled reply's tokens were still yielded"
        for i, more in new.items():
            tokens[i].extend(more)
        if tokens[0] and not cancelled:
            group.cancel(0)
            cancelled = True
    assert group.requests[0].finish_reason == "cancelled" and len(tokens[0]) < 40
    assert group.requests[1].finish_reason == "length" and len(tokens[1]) == 40


def test_promoted_version_is_served_after_the_batch_drains(engine_factory):
    a, b = policy(seed=0, version="v0000"), policy(seed=5, version="v0001")
    source = FixedSource({"v0000": a, "v0001": b})
    engine = engine_factory(source, poll_interval_s=0.01)
    first = engine.submit(conversation("hello"))
    list(first.tokens(timeout=30))
    assert first.model_version == "v0000"
    source.current = "v0001"
    deadline = time.time() + 5
    while engine.version != "v0001" and time.time() < deadline:
        time.sleep(0.02)
    second = engine.submit(conversation("hello"))
    tokens = list(second.tokens(timeout=30))
    assert second.model_version == "v0001" and engine.stats.swaps == 1
    assert tokens == reference_greedy(b, conversation("hello"), GREEDY.max_new_tokens)


def test_registry_pointer_switch_is_atomic_and_loadable(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    tok = tiny_tokenizer()
    for seed in (0, 1):
        registry.write_version(registry.next_version(), tiny_model(tok, seed), tok, {"parent": None})
    registry.set_current("v0001")
    assert registry.current_version() == "v0001"
    assert registry.load("v0001").version == "v0001"
    assert not list(registry.root.glob(".*tmp")) and not list(registry.root.glob(".*partial"))


def test_context_is_cut_from_the_oldest_turn_never_mid_message():
    tok = tiny_tokenizer()
    turns = [{"role": "system", "content": "tutor"}]
    for i in range(10):
        turns += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    turns.append({"role": "user", "content": "last question"})
    full = len(fit_context(tok, turns, 100_000)[1])
    context, ids = fit_context(tok, turns, full // 2)
    assert len(ids) <= full // 2
    assert context[0] == turns[0] and context[-1] == turns[-1] and context[1]["role"] == "user"
    assert all(m in turns for m in context)  # whole messages only
    kept = turns[-(len(context) - 1):]
    assert context[1:] == kept  # a contiguous suffix: the oldest turns went first


def history_of(turns: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = "the a fraction pizza slice half why because é 数学 😀 plus minus".split()
    messages = [{"role": "system", "content": "tutor"}]
    for _ in range(turns):
        for role in ("user", "assistant"):
            messages.append({"role": role, "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 50)))})
    return messages + [{"role": "user", "content": "and now?"}]


def test_fitting_keeps_the_most_turns_that_fit_and_is_linear_in_the_history(monkeypatch):
    """The same context as dropping one turn at a time and re-encoding, from a few template applications."""
    from core import chat_format

    tok = tiny_tokenizer()
    for seed in range(20):
        messages = history_of(12, seed)
        full = len(chat_format.generation_prompt_ids(tok, messages))
        for budget in (full, full - 1, full // 2, full // 5):
            context, ids = fit_context(tok, messages, budget)
            assert len(ids) <= budget and ids == chat_format.generation_prompt_ids(tok, context)
            dropped = len(messages) - len(context)
            if dropped:  # one more turn kept would not fit
                one_more = [messages[0], *messages[dropped - 1:]]
                assert len(chat_format.generation_prompt_ids(tok, one_more)) > budget
    applications = []
    apply = chat_format.generation_prompt_ids
    monkeypatch.setattr(chat_format, "generation_prompt_ids", lambda *a: applications.append(1) or apply(*a))
    fit_context(tok, history_of(100), 1500)
    assert len(applications) <= 4, f"{len(applications)} template applications for a 100-turn history"


def test_a_long_history_is_fitted_on_the_submitting_thread_not_the_decode_thread(engine_factory):
    threads = []

    def recording(tokenizer, messages, budget):
        threads.append(threading.current_thread().name)
        return fit_context(tokenizer, messages, budget)

    p = policy()
    engine = GenerationEngine(FixedSource({"v0000": p}), recording, GREEDY, EngineConfig(max_context_tokens=600))
    try:
        request = engine.submit(history_of(100))
        tokens = list(request.tokens(timeout=30))
        assert tokens and threads == [threading.current_thread().name]
        assert request.context[-1]["content"] == "and now?" and len(request.context) < 100
    finally:
        engine.close()


def test_a_sampled_reply_is_drawn_again_from_its_seed(engine_factory):
    """Each reply samples from its own generator: its stored seed draws the same reply again, alone or in
    a batch with other rows; an engine seed fixes the seeds, so a session asked in order repeats."""
    p = policy()
    sampled = SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    asked = conversation("What is a fraction?")
    first = engine_factory(FixedSource({"v0000": p}), sampling=sampled)
    alone = [first.submit(asked) for _ in range(3)]
    replies = [list(r.tokens(timeout=30)) for r in alone]
    seeds = [r.sampling.seed for r in alone]
    assert len(set(seeds)) == 3 and len({tuple(t) for t in replies}) > 1  # three draws, not one reply thrice

    again = engine_factory(FixedSource({"v0000": p}), sampling=sampled)
    assert [again.submit(asked).sampling.seed for _ in range(3)] == seeds
    crowd = [again.submit(conversation(f"Something else {i}")) for i in range(3)]
    redrawn = again.submit(asked, seed=seeds[1])
    assert list(redrawn.tokens(timeout=30)) == replies[1]
    assert max(again.stats.forward_batch_sizes) >= 4  # it was decoded beside the crowd


# -- faults stay with the requests they touch ------------------------------------------------------
def break_forward(p, when):
    """Makes p's model raise inside its forward pass whenever `when(kwargs)` holds."""
    forward = p.model.forward

    def faulty(*args, **kwargs):
        if when(kwargs):
            raise RuntimeError("CUDA error: device-side assert /secret/path.py")
        return forward(*args, **kwargs)
    p.model.forward = faulty


def prefill(kwargs):
    return kwargs["input_ids"].shape[1] > 1


def answered(engine, text="hello"):
    request = engine.submit(conversation(text))
    return list(request.tokens(timeout=30)), request


@pytest.mark.parametrize("where", ["prefill", "step"])
def test_an_exception_in_prefill_or_a_step_fails_only_its_requests_and_the_engine_goes_on(engine_factory, where):
    from app.engine import EngineFault

    p = policy()
    broken = {"on": True}
    engine = engine_factory(FixedSource({"v0000": p}))  # loaded first: its system turn's cache is computed whole
    break_forward(p, lambda kw: broken["on"] and prefill(kw) == (where == "prefill"))
    request = engine.submit(conversation("hello"))
    with pytest.raises(EngineFault, match="could not answer") as raised:
        list(request.tokens(timeout=30))
    assert "secret" not in str(raised.value)  # the user sees a clear message, the log the details
    broken["on"] = False
    tokens, again = answered(engine)
    assert tokens == reference_greedy(p, conversation("hello"), GREEDY.max_new_tokens)
    health = engine.health()
    assert health["ok"] and health["faults"] == 1 and where.replace("step", "decode step") in health["last_fault"]


def test_a_version_that_fails_to_load_is_marked_bad_and_not_retried(engine_factory):
    a = policy(seed=0, version="v0000")
    loads = []

    class Source(FixedSource):
        def load(self, version):
            loads.append(version)
            if version == "v0001":
                raise OSError("model.safetensors: truncated")
            return super().load(version)

    source = Source({"v0000": a})
    engine = engine_factory(source, poll_interval_s=0.01)
    source.current = "v0001"
    time.sleep(0.5)  # fifty polls
    assert loads.count("v0001") == 1, loads
    assert "v0001" in engine.health()["bad_versions"] and engine.version == "v0000"
    tokens, request = answered(engine)
    assert request.model_version == "v0000" and tokens


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["first-request", "system-turn-at-load"])
def test_a_version_that_loads_but_cannot_run_is_marked_bad_and_the_last_one_serves_again(engine_factory,
                                                                                         prefix_cache):
    """Without a prefix cache the first request on the new version finds out (and fails); with it the
    system turn's forward pass at load does, and no request fails."""
    from app.engine import EngineFault

    a, b = policy(seed=0, version="v0000"), policy(seed=5, version="v0001")
    break_forward(b, lambda kw: True)
    source = FixedSource({"v0000": a, "v0001": b})
    engine = engine_factory(source, poll_interval_s=0.01, prefix_cache=prefix_cache)
    source.current = "v0001"
    deadline = time.time() + 5
    while engine.version != "v0001" and "v0001" not in engine.health()["bad_versions"] and time.time() < deadline:
        time.sleep(0.01)
    if prefix_cache:
        assert "load failed" in engine.health()["bad_versions"]["v0001"]
    else:
        with pytest.raises(EngineFault):
            answered(engine)
    assert engine.version == "v0000" and "v0001" in engine.health()["bad_versions"]
    time.sleep(0.2)  # polls again: v0001 is still CURRENT, and is not loaded again
    tokens, request = answered(engine)
    assert request.model_version == "v0000"
    assert tokens == reference_greedy(a, conversation("hello"), GREEDY.max_new_tokens)


def test_a_dead_decode_thread_is_restarted_by_the_next_request(engine_factory):
    class Boom(BaseException):
        pass

    engine = engine_factory(FixedSource({"v0000": policy()}))
    admit = engine._admit
    calls = {"n": 0}

    def dies_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise Boom()
        admit()
    engine._admit = dies_once
    with engine._wake:
        engine._wake.notify()
    engine._thread.join(timeout=5)
    assert not engine._thread.is_alive() and not engine.health()["ok"]
    tokens, _ = answered(engine)
    assert tokens and engine.health()["ok"] and engine.health()["restarts"] == 1


def test_a_stuck_engine_answers_its_client_within_the_deadline(engine_factory):
    from app.engine import EngineFault

    p = policy()
    forward = p.model.forward
    stuck = threading.Event()

    def slow(*args, **kwargs):
        if not stuck.is_set():
            stuck.wait(timeout=3)
        return forward(*args, **kwargs)
    p.model.forward = slow
    engine = engine_factory(FixedSource({"v0000": p}), token_timeout_s=0.3)
    request = engine.submit(conversation("hello"))
    started = time.monotonic()
    with pytest.raises(EngineFault, match="too long"):
        list(request.tokens(timeout=engine.config.token_timeout_s))
    assert time.monotonic() - started < 2
    assert request.cancelled.is_set()
    stuck.set()


def test_closing_an_engine_tells_the_replies_it_was_writing_instead_of_leaving_them_waiting(engine_factory):
    engine = endless(engine_factory, replace(GREEDY, max_new_tokens=900))
    running = engine.submit([{"role": "user", "content": "Go on forever"}])
    next(running.tokens(timeout=30))  # decoding
    started = time.monotonic()
    engine.close()
    with pytest.raises(EngineFault, match="stopped"):
        list(running.tokens(timeout=30))
    assert time.monotonic() - started < 15
