"""Serving benchmark on the embedded model: the app's /chat against plain `model.generate`, and
aggregate throughput with 1, 4 and 8 concurrent users, all measured in one run.

    python bench/bench_serving.py [--max-new-tokens 96] [--users 1 4 8] [--models-dir /tmp/bench-models]
                                  [--precision auto|bf16|fp32] [--prefix-users 8] [--prefix-rounds 8]
                                  [--prefix-clients light gradio_client]

1. Baseline: `model.generate` (greedy, same repetition penalty and length limit) on one prompt.
2. The app in a subprocess (`launch.py`, greedy sampling from a config file) on a loopback port;
   the same prompt through `/chat` with gradio_client, streamed to the end.
3. N users at once, each its own conversation and prompt: aggregate tokens/s, time to first token
   (median, p95), against one user alone.
4. The shared prefix cache (the tutor system turn's KV computed once per version): the same app once
   more with `[serve.engine] prefix_cache = false`, and `--prefix-users` users at once on both servers,
   alternating, `--prefix-rounds` times; time to first token without the cache over with it, with its 95%
   bootstrap interval over the rounds. Measured
   with two clients: a light one (one thread on Gradio's HTTP API, as browsers on learners' devices cost
   the server nothing) and `gradio_client` threads, which take more than a core of this machine
   while they start their requests; each prints its own CPU time. `--prefix-clients light` measures with
   the light one alone (a long run of rounds in half the time).
5. The same comparison for the engine alone, in this process (no HTTP, no Gradio): `--prefix-users`
   requests submitted at once, time from submit to the first token, engines with and without the cache.
6. One prefill of a class's mixed questions (a greeting to a worded problem) after the cached system
   turn, packed into one sequence against left-padded (core/prefix_cache.py), alternating, with the
   ratio's 95% bootstrap interval over the rounds.
`--precision` sets the served weights' dtype (`[serve.engine] precision`) and casts the baseline's
weights the same way, so the ratio compares like with like; run it twice to compare precisions.
Tokens are counted by re-encoding the reply text with the model's tokenizer, on both sides.
Peak memory is the server's peak RSS (VmHWM) and the baseline process's own peak.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.net import free_port  # noqa: E402

PROMPTS = [
    "Can you explain what a fraction is?",
    "How do plants make their food?",
    "What is the difference between a noun and a verb?",
    "Why does the moon have phases?",
    "How do I solve 2x + 3 = 11?",
    "What is a variable in programming?",
    "What caused the French Revolution?",
    "How should I study for a maths test?",
]
# What a class sends at once is rarely of one length: short replies beside worded problems (step 6).
MIXED = ["hi", "What is 7 x 8?", "thanks!", "Can you explain why the sky is blue, and why sunsets are red instead?",
         "ok", "If I have 3/4 of a pizza and eat 1/2 of what I have, how much of the pizza did I eat?",
         "what's a verb", "yes"]


# step 4's clients: the name on the command line -> the name in the report
PREFIX_CLIENTS = {"light": "light client", "gradio_client": "gradio_client"}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def baseline(policy, prompt: str, max_new_tokens: int) -> tuple[float, int]:
    import torch

    from core.chat_format import TUTOR_SYSTEM_PROMPT, fit_context

    messages = [{"role": "system", "content": TUTOR_SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    _, ids = fit_context(policy.tokenizer, messages, 4096)
    x = torch.tensor([ids])
    kw = dict(do_sample=False, repetition_penalty=1.1, max_new_tokens=max_new_tokens,
              eos_token_id=policy.tokenizer.eos_token_id, pad_token_id=policy.tokenizer.pad_token_id)
    with torch.inference_mode():
        policy.model.generate(x, **{**kw, "max_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        out = policy.model.generate(x, **kw)
        elapsed = time.perf_counter() - start
    text = policy.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    return elapsed, count_tokens(policy.tokenizer, text)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def one_chat(client, prompt: str, tokenizer, out: dict, ready: threading.Barrier) -> None:
    conversation = client.predict("bench", "eval", api_name="/new_conversation")["conversation_id"]
    ready.wait()  # every user's conversation exists: the turns arrive together, as "at once" says
    start = time.perf_counter()
    first = None
    last = None
    for chunk in client.submit(conversation, prompt, api_name="/chat"):
        first = first or (time.perf_counter() if chunk["text"] else None)
        last = chunk
    end = time.perf_counter()
    out.update(ttft=first - start, elapsed=end - start, tokens=count_tokens(tokenizer, last["text"]), start=start,
               end=end, done=last["done"])


def load_run(clients, prompts, tokenizer) -> dict:
    results = [{} for _ in clients]
    ready = threading.Barrier(len(clients))
    threads = [threading.Thread(target=one_chat, args=(c, p, tokenizer, r, ready))
               for c, p, r in zip(clients, prompts, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(results)


def summarize(results: list[dict]) -> dict:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {"users": len(results), "tokens": sum(r["tokens"] for r in results), "wall": wall,
            "tok_s": sum(r["tokens"] for r in results) / wall, "ttft_median": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))],
            "all_done": all(r["done"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--users", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-models")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--prefix-users", type=int, default=8, help="users at once for the prefix-cache comparison (0: skip)")
    # a round's median moves by as much as the cache saves on a shared 2-core host: 8 rounds steady the median
    ap.add_argument("--prefix-rounds", type=int, default=8)
    ap.add_argument("--prefix-clients", nargs="+", choices=list(PREFIX_CLIENTS), default=list(PREFIX_CLIENTS),
                    help="which clients step 4 measures with (default: both)")
    args = ap.parse_args()

    from gradio_client import Client

    from app.embedded import ensure_base
    from app.versions import ModelRegistry

    registry = ModelRegistry(args.models_dir)
    ensure_base(registry)
    policy = registry.load(registry.current_version())
    import torch

    from core.precision import inference_dtype

    policy.model.to(inference_dtype(args.precision))

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"weights {next(policy.model.parameters()).dtype}")
    base_s, base_tokens = baseline(policy, PROMPTS[0], args.max_new_tokens)
    base_rate = base_tokens / base_s
    print(f"1. model.generate: {base_tokens} tokens in {base_s:.2f}s = {base_rate:.1f} tokens/s")
    baseline_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    with serve(work / "on", args, prefix_cache=True) as (server, url):
        clients = [Client(url, verbose=False) for _ in range(max(args.users))]
        load_run(clients[:1], PROMPTS[1:2], policy.tokenizer)  # warm-up
        single = load_run(clients[:1], PROMPTS[:1], policy.tokenizer)
        ratio = single["tok_s"] / base_rate
        print(f"2. app /chat:      {single['tokens']} tokens in {single['wall']:.2f}s = {single['tok_s']:.1f} tokens/s"
              f"  -> ratio vs generate {ratio:.2f} (target >= 1.0)")
        print("3. concurrent users (aggregate tokens/s, time to first token):")
        alone = None
        for n in args.users:
            r = load_run(clients[:n], [PROMPTS[i % len(PROMPTS)] for i in range(n)], policy.tokenizer)
            alone = alone or r["tok_s"]
            print(f"   {n} users: {r['tokens']:4d} tokens in {r['wall']:6.2f}s = {r['tok_s']:6.1f} tokens/s"
                  f"  x{r['tok_s'] / alone:.2f} vs 1 user   TTFT median {r['ttft_median']:.2f}s"
                  f" p95 {r['ttft_p95']:.2f}s   all done: {r['all_done']}")
        print(f"   peak memory: server {peak_rss_mib(server.pid):.0f} MiB RSS; baseline process {baseline_peak:.0f} MiB")
    if args.prefix_users:
        prefix_comparison(work, args, policy.tokenizer)
        engine_prefix_comparison(args)
        packing_comparison(policy, args.prefix_rounds)


@contextlib.contextmanager
def serve(work: Path, args, prefix_cache: bool):
    """The app in its own process on a loopback port, greedy, until the block ends."""
    from gradio_client import Client

    work.mkdir(parents=True)
    config = work / "bench.toml"
    config.write_text(f"[serve.sampling]\ndo_sample = false\nrepetition_penalty = 1.1\n"
                      f"max_new_tokens = {args.max_new_tokens}\n[serve.engine]\nprecision = \"{args.precision}\"\n"
                      f"prefix_cache = {str(prefix_cache).lower()}\n")
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--port", str(port), "--db", str(work / "c.db"),
                               "--models-dir", str(args.models_dir), "--config", str(config)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                Client(url, verbose=False)
                break
            except Exception:
                time.sleep(0.5)
        yield server, url
    finally:
        server.terminate()
        server.wait(timeout=30)


async def call_streamed(client, name: str, data: list, session: str, on_chunk=None):
    """One call of a named endpoint over Gradio's plain HTTP API (`POST /gradio_api/call/<name>`, then its
    event stream): what a browser does, without a Python client's threads and parsing on this machine."""
    import json

    joined = await client.post(f"/gradio_api/call/{name}", json={"data": data, "session_hash": session})
    joined.raise_for_status()
    event, last = None, None
    async with client.stream("GET", f"/gradio_api/call/{name}/{joined.json()['event_id']}") as stream:
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event == "error":
                raise RuntimeError(f"{name}: {line}")
            elif line.startswith("data: ") and event in ("generating", "complete"):
                last = json.loads(line[len("data: "):])[0]
                if on_chunk is not None:
                    on_chunk(last)
    return last


def light_load_run(url: str, prompts: list[str], tokenizer) -> dict:
    """`load_run` with one event-loop thread for all users (Gradio's HTTP API, see `call_streamed`)."""
    import asyncio

    import httpx

    async def user(client, index: int, prompt: str, ready: asyncio.Event, out: dict) -> None:
        session = f"bench-{index}-{time.monotonic_ns()}"
        conversation = (await call_streamed(client, "new_conversation", ["bench", "eval"], session))["conversation_id"]
        out["created"] = True
        await ready.wait()
        start = time.perf_counter()
        first = []
        last = await call_streamed(client, "chat", [conversation, prompt], session,
                                   lambda chunk: first.append(time.perf_counter()) if chunk["text"] and not first else None)
        end = time.perf_counter()
        out.update(ttft=first[0] - start, elapsed=end - start, tokens=count_tokens(tokenizer, last["text"]),
                   start=start, end=end, done=last["done"])

    async def run() -> list[dict]:
        results = [{} for _ in prompts]
        ready = asyncio.Event()
        async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=120) as client:
            users = [asyncio.create_task(user(client, i, p, ready, r)) for i, (p, r) in enumerate(zip(prompts, results))]
            # every conversation exists: the turns go together (a user that failed ends the wait; gather raises)
            while not all(r.get("created") for r in results) and not any(u.done() for u in users):
                await asyncio.sleep(0.01)
            ready.set()
            await asyncio.gather(*users)
        return results

    return summarize(asyncio.run(run()))


def prefix_comparison(work: Path, args, tokenizer) -> None:
    """Both servers at once (one idle while the other serves), the same n users' first turns, alternating;
    once with a light client (one thread, Gradio's HTTP API: learners' browsers run on their own devices)
    and once with n gradio_client threads, whose own CPU time on this machine is printed beside."""
    from gradio_client import Client

    n = args.prefix_users
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    with serve(work / "cache-on", args, True) as (_, on_url), serve(work / "cache-off", args, False) as (_, off_url):
        urls = {True: on_url, False: off_url}
        clients = {cache: [Client(url, verbose=False) for _ in range(n)] for cache, url in urls.items()}
        runners = {"light": lambda cache: light_load_run(urls[cache], prompts, tokenizer),
                   "gradio_client": lambda cache: load_run(clients[cache], prompts, tokenizer)}
        for key in args.prefix_clients:
            name, runner = PREFIX_CLIENTS[key], runners[key]
            ttft, cpu = {True: [], False: []}, {True: [], False: []}
            for cache in (True, False):
                runner(cache)  # warm-up: the first round at n users pays one-time costs
            for _ in range(args.prefix_rounds):
                for cache in (False, True):
                    before = time.process_time()
                    ttft[cache].append(runner(cache)["ttft_median"])
                    cpu[cache].append(time.process_time() - before)
            on, off = statistics.median(ttft[True]), statistics.median(ttft[False])
            ratio, low, high = speedup_interval(ttft[False], ttft[True])
            print(f"4. shared prefix cache, {n} users at once, {args.prefix_rounds} rounds, {name} (its CPU "
                  f"{statistics.median(cpu[True] + cpu[False]):.2f} s a round): TTFT median {off:.2f}s without "
                  f"({', '.join(f'{t:.2f}' for t in ttft[False])}), {on:.2f}s with "
                  f"({', '.join(f'{t:.2f}' for t in ttft[True])})  -> x{ratio:.2f} [{low:.2f}, {high:.2f}] "
                  f"(target >= 1.5)")


def speedup_interval(without: list[float], with_: list[float]) -> tuple[float, float, float]:
    """median(without) / median(with) and its 95% bootstrap interval over the rounds, each round's pair
    (the two servers measured one after the other) resampled together."""
    from core.stats import bootstrap

    return bootstrap(list(zip(without, with_)),
                     lambda pairs: statistics.median(a for a, _ in pairs) / statistics.median(b for _, b in pairs))


def engine_prefix_comparison(args) -> None:
    from app.engine import EngineConfig, GenerationEngine, SamplingConfig
    from app.versions import ModelRegistry
    from core.chat_format import TUTOR_SYSTEM_PROMPT, fit_context

    sampling = SamplingConfig(do_sample=False, repetition_penalty=1.1, max_new_tokens=args.max_new_tokens)
    engines = {cache: GenerationEngine(ModelRegistry(args.models_dir), fit_context, sampling,
                                       EngineConfig(precision=args.precision, prefix_cache=cache))
               for cache in (True, False)}
    n = args.prefix_users
    conversations = [[{"role": "system", "content": TUTOR_SYSTEM_PROMPT},
                      {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(n)]
    ttft = {True: [], False: []}
    try:
        for round_ in range(args.prefix_rounds + 1):  # round 0 warms both up
            for cache in (False, True):
                requests = [engines[cache].submit(c) for c in conversations]
                for r in requests:
                    list(r.tokens(timeout=120))
                if round_:
                    ttft[cache].append(statistics.median(r.first_token_at - r.submitted_at for r in requests))
    finally:
        for engine in engines.values():
            engine.close()
    on, off = statistics.median(ttft[True]), statistics.median(ttft[False])
    print(f"5. the engine alone, {n} requests at once, {args.prefix_rounds} rounds: TTFT median {off * 1000:.0f} ms "
          f"without, {on * 1000:.0f} ms with the prefix cache  -> x{off / on:.2f}")


def packing_comparison(policy, rounds: int) -> None:
    import torch

    from core.chat_format import TUTOR_SYSTEM_PROMPT, generation_prompt_ids
    from core.prefix_cache import PrefixCache, packed_prefill, padded_prefill, system_prefix_ids

    model, tokenizer = policy.model, policy.tokenizer
    prefix = PrefixCache(model, system_prefix_ids(tokenizer, TUTOR_SYSTEM_PROMPT))
    rows = [generation_prompt_ids(tokenizer, [{"role": "system", "content": TUTOR_SYSTEM_PROMPT},
                                              {"role": "user", "content": q}]) for q in MIXED]
    own = [r[len(prefix):] for r in rows]
    runs = {"padded": lambda: padded_prefill(model, rows, tokenizer.pad_token_id or 0, prefix),
            "packed": lambda: packed_prefill(model, own, prefix)}
    took = {name: [] for name in runs}
    with torch.inference_mode():
        for round_ in range(rounds + 2):  # two warm-up rounds
            for name in (runs if round_ % 2 else reversed(runs)):
                start = time.perf_counter()
                runs[name]()
                if round_ >= 2:
                    took[name].append(time.perf_counter() - start)
    ratio, low, high = speedup_interval(took["padded"], took["packed"])
    print(f"6. one prefill of {len(rows)} mixed questions ({min(map(len, own))}-{max(map(len, own))} tokens after the "
          f"system turn), {rounds} rounds: {statistics.median(took['padded']) * 1000:.0f} ms padded, "
          f"{statistics.median(took['packed']) * 1000:.0f} ms packed  -> x{ratio:.2f} [{low:.2f}, {high:.2f}]")


if __name__ == "__main__":
    main()
