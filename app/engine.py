"""Continuous-batching generation engine for concurrent chat users on CPU.

One background thread owns the model. Requests join the running batch at any decode step (their
prompt is prefilled, then their KV cache is left-padded and concatenated onto the batch's cache)
and leave it when they finish or their client goes away, so users never wait for each other's
replies to end. It is a plain left-padded batch, with joining and leaving mid-flight added:
transformers' own `generate_batch` decoded several times slower on a CPU (docs/performance.md).

The served policy is re-read from the model registry between steps: when a newer version is
promoted, admission pauses, the running batch drains, and the new weights are loaded.

Faults stay with the requests they touch. An exception in admission, prefill or a decode step fails
those rows with EngineFault (a clear message, never the exception's text) and the thread goes on; if
the thread itself ever dies, the next submit restarts it. A promoted version that fails to load, or
whose first forward passes fail, is marked bad: the engine goes back to the version it served before
and never retries the bad one (a new promotion is a new version). `health()` says all of this.
"""
from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Protocol

import torch
from transformers import DynamicCache

from core.causal_lm import left_pad_to, next_position_ids
from core.chat_format import ANSWER_MAX_NEW_TOKENS, ANSWER_TEMPERATURE, TUTOR_SYSTEM_PROMPT, end_of_turn_ids
from core.precision import check_inference_precision, inference_dtype
from core.prefix_cache import MIN_PREFIX_TOKENS, PrefixCache, prefill, system_prefix_ids
from core.sampling import draw_tokens, sampling_filters

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How replies are sampled; stored with every assistant message."""

    max_new_tokens: int = ANSWER_MAX_NEW_TOKENS
    temperature: float = ANSWER_TEMPERATURE
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    do_sample: bool = True
    # Each reply is sampled from its own generator, seeded at submit and stored with the reply, so any
    # answer can be drawn again whatever it was batched with. Set, the seeds follow from it in submit
    # order: a client that asks one thing at a time gets the same replies every run.
    seed: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EngineConfig:
    max_batch_size: int = 16  # rows decoded together
    max_queue: int = 64  # waiting requests beyond the running batch; more are refused at once
    max_context_tokens: int = 2048  # prompt + reply; older turns are cut to fit
    poll_interval_s: float = 0.2  # how often an idle engine looks for a newly promoted policy
    # The longest a reply may go without a token (queue wait and prefill included) before its
    # client is told so; a healthy engine under full load stays far below it.
    token_timeout_s: float = 120.0
    # Weights' dtype while serving. "auto": the machine's precision plan (core/precision.py): bf16 on a
    # GPU or a CPU with bf16 instructions (AVX512-BF16, AMX), fp32 elsewhere; bench/bench_serving.py.
    precision: str = "auto"
    # The system prompt's keys and values computed once per version and shared by every prompt that
    # starts with it (core/prefix_cache.py): a new conversation's prefill runs only its own tokens.
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        check_inference_precision(self.precision)  # a bad setting fails when read, not on the decode thread


class Policy(Protocol):
    """What the engine serves: a causal LM, its tokenizer and a version name."""

    model: torch.nn.Module
    tokenizer: object
    version: str


class PolicySource(Protocol):
    def current_version(self) -> str: ...

    def load(self, version: str) -> Policy: ...


class EngineFault(RuntimeError):
    """The engine could not serve this request; the message is for the user (details are in the log)."""


class EngineBusy(RuntimeError):
    """The waiting queue is full; the caller should tell the user to try again shortly."""


# prepare(tokenizer, messages, max_prompt_tokens) -> (context messages actually used, prompt token ids)
PreparePrompt = Callable[[object, list, int], "tuple[list[dict], list[int]]"]


@dataclass
class Request:
    messages: list[dict]
    sampling: SamplingConfig
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in at admission, so that a policy swap between submit and admission stays consistent.
    context: list[dict] | None = None
    model_version: str | None = None
    tokenizer: object = None
    token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # seeded from sampling.seed at prefill
    # (tokenizer, context, prompt ids), fitted on the submitting thread so that a long history costs
    # the decode thread nothing; admission uses it when that tokenizer is still the one served.
    prepared: tuple | None = None
    finish_reason: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def tokens(self, timeout: float | None = None):
        """Yields token ids as they are generated; raises the engine's error if admission failed."""
        for chunk in self.token_chunks(timeout):
            yield from chunk

    def token_chunks(self, timeout: float | None = None):
        """Yields lists of the token ids generated since the last list: a slow reader (a busy server
        streaming to many clients) catches up in one step instead of one message per token."""
        while True:
            try:
                chunk = [self.events.get(timeout=timeout)]
            except queue.Empty:  # the engine is stuck: the client gets an answer, not a hang
                self.cancel()
                raise EngineFault("the tutor took too long to answer; please try again") from None
            while chunk[-1] is not None and not isinstance(chunk[-1], BaseException):
                try:
                    chunk.append(self.events.get_nowait())
                except queue.Empty:
                    break
            done = chunk[-1] is None or isinstance(chunk[-1], BaseException)
            if [t for t in chunk if isinstance(t, int)]:
                yield [t for t in chunk if isinstance(t, int)]
            if isinstance(chunk[-1], BaseException):
                raise chunk[-1]
            if done:
                return


class _Tagged:
    """A request's event sink that puts each event on a queue shared by a group, tagged with the
    request's index, so one blocking read serves all of the group's replies."""

    def __init__(self, shared: queue.Queue, index: int) -> None:
        self.shared, self.index = shared, index

    def put(self, item) -> None:
        self.shared.put((self.index, item))


@dataclass
class RequestGroup:
    """Replies to one prompt that one client reads together: a comparison's k candidates."""

    requests: list[Request]
    events: queue.Queue
    _open: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._open = set(range(len(self.requests)))

    def cancel(self, index: int | None = None) -> None:
        """Stops one reply (it is no longer waited for) or, with no index, all of them."""
        for i in range(len(self.requests)) if index is None else [index]:
            self.requests[i].cancel()
            self._open.discard(i)

    def token_chunks(self, timeout: float | None = None):
        """Yields {index: token ids since the last yield} until every open reply has ended; raises
        the engine's error for any of them (the caller cancels the rest)."""
        while self._open:
            try:
                items = [self.events.get(timeout=timeout)]
            except queue.Empty:
                self.cancel()
                raise EngineFault("the tutor took too long to answer; please try again") from None
            while True:
                try:
                    items.append(self.events.get_nowait())
                except queue.Empty:
                    break
            new: dict[int, list[int]] = {}
            for index, item in items:
                if index not in self._open:
                    continue  # a reply cancelled by the caller: its last events are not wanted
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    self._open.discard(index)
                else:
                    new.setdefault(index, []).append(item)
            if new:
                yield new


def submit_across(engines: list["GenerationEngine"], messages: list[dict]) -> RequestGroup:
    """One reply to `messages` from each engine (an arena pair: two versions), read as one group; all or
    none: when an engine refuses, the replies already queued are cancelled."""
    events: queue.Queue = queue.Queue()
    requests: list[Request] = []
    try:
        for index, engine in enumerate(engines):
            requests += engine._enqueue(messages, [_Tagged(events, index)], None, None)
    except BaseException:
        for request in requests:
            request.cancel()
        raise
    return RequestGroup(requests, events)


@dataclass
class EngineStats:
    forward_batch_sizes: collections.Counter = field(default_factory=collections.Counter)
    tokens_generated: int = 0
    swaps: int = 0
    faults: int = 0  # requests' batches failed by an exception in prefill or a step
    restarts: int = 0  # of the decode thread
    last_fault: str | None = None
    prefix_hits: int = 0  # prompts prefilled from the cached system turn


class _Batch:
    """The running rows: their requests, last sampled token, KV cache and attention mask."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.next_tokens = torch.empty(0, dtype=torch.long)  # (B,) sampled, not yet fed
        self.attention_mask = torch.empty(0, 0, dtype=torch.long)  # (B, T) 0 = left padding
        self.seen = None  # (B, V) bool: tokens already in each row, for the repetition penalty
        self.cache: DynamicCache | None = None

    def __len__(self) -> int:
        return len(self.requests)

    def extend(self, requests, next_tokens, attention_mask, seen, cache) -> None:
        if not self.requests:
            self.requests, self.next_tokens, self.attention_mask = list(requests), next_tokens, attention_mask
            self.seen, self.cache = seen, cache
            return
        t_old, t_new = self.attention_mask.shape[1], attention_mask.shape[1]
        width = max(t_old, t_new)
        self.attention_mask = torch.cat([left_pad_to(self.attention_mask, width), left_pad_to(attention_mask, width)])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([left_pad_to(old.keys, width, dim=2), left_pad_to(new.keys, width, dim=2)])
            old.values = torch.cat([left_pad_to(old.values, width, dim=2), left_pad_to(new.values, width, dim=2)])
        self.requests.extend(requests)
        self.next_tokens = torch.cat([self.next_tokens, next_tokens])
        self.seen = torch.cat([self.seen, seen])

    def keep(self, rows: list[int]) -> None:
        """Drops finished rows, then the columns that are padding in every remaining row."""
        if len(rows) == len(self.requests):
            return
        self.requests = [self.requests[i] for i in rows]
        if not rows:
            self.cache = None
            return
        index = torch.tensor(rows, device=self.attention_mask.device)
        self.next_tokens, self.seen = self.next_tokens[index], self.seen[index]
        mask = self.attention_mask[index]
        start = int(mask.any(dim=0).long().argmax())
        self.attention_mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


def sample_next(logits: torch.Tensor, seen: torch.Tensor, sampling: SamplingConfig, warpers,
                generators: list[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> token ids (B,), with HF's repetition-penalty semantics on real tokens only;
    row i draws from generators[i]."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0:
        p = sampling.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    return draw_tokens(torch.softmax(warpers(None, logits), dim=-1), generators)


class GenerationEngine:
    """Owns the served policy and one decode thread. `submit` is safe to call from any thread."""

    def __init__(self, source: PolicySource, prepare: PreparePrompt, sampling: SamplingConfig,
                 config: EngineConfig | None = None, system_prompt: str = TUTOR_SYSTEM_PROMPT) -> None:
        self.source, self.prepare, self.sampling = source, prepare, sampling
        self.system_prompt = system_prompt  # whose turn's KV cache is kept (EngineConfig.prefix_cache)
        self._prefixes: dict[str, PrefixCache | None] = {}  # version -> its cached system turn
        self.config = config or EngineConfig()
        self.stats = EngineStats()
        self._warpers = sampling_filters(sampling.temperature, sampling.top_k, sampling.top_p)
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._batch = _Batch()
        self._seeds = random.Random(sampling.seed)
        # All torch work happens on the decode thread, loading included: OpenMP keeps a spinning
        # thread team per calling thread, and a second team (say, the main thread's after a load)
        # slows decoding down on a small CPU (docs/performance.md).
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._bad_versions: dict[str, str] = {}  # version -> why it is not served
        self._on_probation: tuple | None = None  # (previous policy, its eos ids) until a new one runs a step
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    @property
    def version(self) -> str:
        return self.policy.version

    def submit(self, messages: list[dict], max_new_tokens: int | None = None, seed: int | None = None) -> Request:
        """Queues a reply to `messages`. Sampling settings are the engine's, shared by the whole batch;
        only the length limit and the seed (by default the engine's next) are per request."""
        return self._enqueue(messages, [queue.Queue()], max_new_tokens, seed)[0]

    def submit_group(self, messages: list[dict], n: int, max_new_tokens: int | None = None) -> "RequestGroup":
        """Queues `n` independent replies to the same `messages` (a comparison's candidates), all or
        none: a queue with room for fewer refuses the whole group, so no reply runs for nobody."""
        events: queue.Queue = queue.Queue()
        requests = self._enqueue(messages, [_Tagged(events, i) for i in range(n)], max_new_tokens, None)
        return RequestGroup(requests, events)

    def _enqueue(self, messages: list[dict], sinks: list, max_new_tokens: int | None, seed: int | None) -> list[Request]:
        sampling = self.sampling if max_new_tokens is None else replace(self.sampling, max_new_tokens=max_new_tokens)
        if not self._thread.is_alive() and not self._stop.is_set():
            self._restart()
        tokenizer = self.policy.tokenizer
        try:
            prepared = (tokenizer, *self.prepare(tokenizer, messages, self.config.max_context_tokens - sampling.max_new_tokens))
        except Exception:  # e.g. too long: admission fits it again and tells the client, as for any request
            prepared = None
        with self._wake:
            if len(self._waiting) + len(sinks) > self.config.max_queue:
                raise EngineBusy(f"the tutor is busy ({len(self._waiting)} requests waiting); try again in a moment")
            requests = []
            for events in sinks:
                row_seed = self._seeds.getrandbits(63) if seed is None else seed
                requests.append(Request(messages=messages, sampling=replace(sampling, seed=row_seed), events=events,
                                        prepared=prepared))
            self._waiting.extend(requests)
            self._wake.notify()
        return requests

    def _restart(self) -> None:
        with self._wake:
            if self._thread.is_alive():
                return
            self.stats.restarts += 1
            log.error("restarting the decode thread (restart %d)", self.stats.restarts)
            self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():  # whoever still waits is told, instead of waiting for a timeout
            with self._wake:
                left, self._waiting = [*self._batch.requests, *self._waiting], collections.deque()
            self._fail(left, "the tutor stopped; please try again")

    def load_stats(self) -> dict:
        """How busy the engine is: rows decoding, requests waiting, and the version served."""
        return {"running": len(self._batch), "waiting": len(self._waiting), "version": self.version}

    def health(self) -> dict:
        """Whether the engine serves, and what went wrong lately (for /status and the log)."""
        return {"ok": self._thread.is_alive() and not self._stop.is_set(), "faults": self.stats.faults,
                "restarts": self.stats.restarts, "last_fault": self.stats.last_fault,
                "bad_versions": dict(self._bad_versions)}

    # -- the decode thread -------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if not hasattr(self, "policy"):  # first start; a restart keeps the policy it had
            try:
                self.policy = self._load_policy(self.source.current_version())
                self._eos = set(end_of_turn_ids(self.policy.model, self.policy.tokenizer))
            except BaseException as exc:
                self._load_error = exc
                return
            finally:
                self._loaded.set()
        try:
            self._loop()
        except BaseException:  # never expected; the next submit() restarts the thread
            log.exception("decode thread died; it restarts on the next request")
            self._fail(self._batch.requests, "the tutor hit an internal error; please try again")
            self._batch = _Batch()

    def _loop(self) -> None:
        last_poll = 0.0
        pending_version = None
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_poll > self.config.poll_interval_s:
                last_poll = now
                pending_version = self._promoted_version()
            if pending_version and not self._batch:
                self._swap(pending_version)
                pending_version = None
            if not pending_version:
                self._admit()
            if not self._batch:
                with self._wake:
                    if not self._waiting and not self._stop.is_set():
                        self._wake.wait(timeout=self.config.poll_interval_s)
                continue
            try:
                self._step()
            except Exception as exc:  # a broken step must not hang every client of the batch
                self._fault("decode step", exc, self._batch.requests)
                self._batch = _Batch()
            else:
                self._on_probation = None  # the swapped-in version has run a step: it works

    def _fault(self, where: str, exc: BaseException, requests: list[Request]) -> None:
        log.error("%s failed on policy %s", where, self.policy.version, exc_info=exc)
        self.stats.faults += 1
        self.stats.last_fault = f"{where}: {type(exc).__name__}"
        self._fail(requests, "the tutor could not answer this time; please try again")
        if self._on_probation is not None:  # a just-promoted version that cannot run: back to the last
            bad, previous = self.policy.version, self._on_probation
            self._bad_versions[bad] = f"{where} failed: {type(exc).__name__}"
            self.policy, self._eos, self._on_probation = previous[0], previous[1], None
            log.error("policy %s marked bad; serving %s again", bad, self.policy.version)

    @staticmethod
    def _fail(requests: list[Request], message: str) -> None:
        for request in requests:
            request.finish_reason = "error"
            request.events.put(EngineFault(message))

    def _promoted_version(self) -> str | None:
        try:
            version = self.source.current_version()
        except Exception:  # a registry mid-write or unreadable: keep serving what we have
            return None
        if version == self.policy.version or version in self._bad_versions:
            return None
        return version

    def _swap(self, version: str) -> None:
        try:
            policy = self._load_policy(version)
            eos = set(end_of_turn_ids(policy.model, policy.tokenizer))
        except Exception as exc:
            # Marked bad, not retried: a retry loop would pause admission every poll for nothing.
            self._bad_versions[version] = f"load failed: {type(exc).__name__}: {exc}"[:300]
            log.exception("could not load promoted policy %s; still serving %s", version, self.policy.version)
            return
        self._on_probation = (self.policy, self._eos)
        self._prefixes = {v: c for v, c in self._prefixes.items() if v in (version, self.policy.version)}
        self.policy, self._eos = policy, eos
        self.stats.swaps += 1
        log.info("now serving policy %s", version)

    def _load_policy(self, version: str) -> Policy:
        policy = self.source.load(version)
        policy.model.to(inference_dtype(self.config.precision))  # the engine's own copy, loaded for it alone
        if self.config.prefix_cache:  # once per version: every new conversation starts with these tokens
            ids = system_prefix_ids(policy.tokenizer, self.system_prompt)
            self._prefixes[version] = PrefixCache(policy.model, ids) if len(ids) >= MIN_PREFIX_TOKENS else None
        return policy

    def _admit(self) -> None:
        """Prefills what is waiting, and again what arrived during that prefill, before the next decode
        step: a burst of new conversations reaches the engine spread over a few hundred milliseconds, and
        a decode step between its prefills would delay every late arrival's first token by one step
        (prefill first, as vLLM's scheduler does). Bounded by the free rows: each round admits one at least."""
        while self._waiting and len(self._batch) < self.config.max_batch_size and self._admit_waiting():
            pass

    def _admit_waiting(self) -> bool:
        """Admits and prefills the waiting requests that fit; False when there was nothing to admit."""
        free = self.config.max_batch_size - len(self._batch)
        admitted = []
        with self._wake:
            while free > 0 and self._waiting:
                request = self._waiting.popleft()
                if not request.cancelled.is_set():
                    admitted.append(request)
                    free -= 1
        ready = []
        for request in admitted:
            try:
                if request.prepared is not None and request.prepared[0] is self.policy.tokenizer:
                    request.context, request.token_ids = request.prepared[1], list(request.prepared[2])
                else:  # not fitted yet, or a new version was swapped in since
                    budget = self.config.max_context_tokens - request.sampling.max_new_tokens
                    request.context, request.token_ids = self.prepare(self.policy.tokenizer, request.messages, budget)
                request.model_version, request.tokenizer = self.policy.version, self.policy.tokenizer
                ready.append(request)
            except Exception as exc:
                request.events.put(exc)
        if ready:
            try:
                self._prefill(ready)
            except Exception as exc:
                self._fault("prefill", exc, ready)
        return bool(admitted)

    def _prefill(self, requests: list[Request]) -> None:
        """Runs the new prompts as left-padded batches (those that start with the system turn from its
        cached keys and values, the others whole) and joins them to the running batch."""
        prefix = self._prefixes.get(self.policy.version)
        hit = [prefix is not None and prefix.covers(r.token_ids) for r in requests]
        for group, group_prefix in (([r for r, h in zip(requests, hit) if h], prefix),
                                    ([r for r, h in zip(requests, hit) if not h], None)):
            if group:
                self._prefill_group(group, group_prefix)

    def _prefill_group(self, requests: list[Request], prefix: PrefixCache | None) -> None:
        model = self.policy.model
        out, attention_mask, cache = prefill(model, [r.token_ids for r in requests],
                                             self.policy.tokenizer.pad_token_id or 0, prefix)
        self.stats.forward_batch_sizes[len(requests)] += 1
        self.stats.prefix_hits += len(requests) if prefix is not None else 0
        seen = torch.zeros(len(requests), out.logits.shape[-1], dtype=torch.bool, device=model.device)
        for row, r in enumerate(requests):
            seen[row, r.token_ids] = True
            r.generator = torch.Generator(device=model.device).manual_seed(r.sampling.seed)
        logits = out.logits[:, -1].float()
        logits[:, sorted(self._eos)] = float("-inf")  # a tutor never answers with nothing
        next_tokens = sample_next(logits, seen, self.sampling, self._warpers, [r.generator for r in requests])
        for request in requests:
            request.token_ids = []  # from here on: the reply's tokens
        joining = _Batch()
        joining.extend(requests, next_tokens, attention_mask, seen, cache)
        joining.keep(self._emit(joining))  # only the new rows: the running rows' tokens went out already
        if joining:
            self._batch.extend(joining.requests, joining.next_tokens, joining.attention_mask, joining.seen,
                               joining.cache)

    def _step(self) -> None:
        batch = self._batch
        batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(len(batch), 1)], dim=1)
        out = self.policy.model(input_ids=batch.next_tokens[:, None], attention_mask=batch.attention_mask,
                                position_ids=next_position_ids(batch.attention_mask), cache=batch.cache,
                                use_cache=True, logits_to_keep=1)
        self.stats.forward_batch_sizes[len(batch)] += 1
        batch.seen[torch.arange(len(batch), device=batch.seen.device), batch.next_tokens] = True
        batch.next_tokens = sample_next(out.logits[:, -1], batch.seen, self.sampling, self._warpers,
                                        [r.generator for r in batch.requests])
        batch.keep(self._emit(batch))

    def _emit(self, batch: _Batch) -> list[int]:
        """Hands each row of `batch` its newest token; returns the rows that go on (not ended, not at
        their length limit, not cancelled)."""
        keep = []
        now = time.perf_counter()
        for row, (request, token) in enumerate(zip(batch.requests, batch.next_tokens.tolist())):
            if request.cancelled.is_set():
                request.finish_reason = "cancelled"
                request.events.put(None)
                continue
            if token in self._eos:
                request.finish_reason = "stop"
                request.events.put(None)
                continue
            request.token_ids.append(token)
            request.first_token_at = request.first_token_at or now
            request.events.put(token)
            self.stats.tokens_generated += 1
            if len(request.token_ids) >= request.sampling.max_new_tokens:
                request.finish_reason = "length"
                request.events.put(None)
                continue
            keep.append(row)
        return keep
