"""Serving benchmark: streaming chat completions at concurrency 1, 4 and 16, with a LoRA adapter as production.

Starts `chatloop serve` on a free port (or uses --url), then for each level runs rounds of C simultaneous
streaming requests (128 tokens, temperature 1, fixed seeds) for about --seconds. Per request: time to first
content token, completion tokens (from usage) and tokens/s after the first token. Per level: total tokens over
wall time. The base model at 1 and 16 shows what the adapter costs; llama.cpp on the same GGUF, when
llama-cpp-python is installed, gives a single-stream reference.

    python -m bench.serve [--data-dir DIR] [--seconds 25] [--url http://host:port] [--write]
"""

import argparse
import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import torch
from openai import AsyncOpenAI
from redis.asyncio import Redis

from bench.adapter import make_adapter
from common.models import BASE
from service.cli.launcher import free_port
from service.engine.model import default_gguf_path, resolve_base_model, resolve_device, resolve_dtype
from service.settings import Settings
from service.store import registry

PROMPTS = [
    "Explain how a bicycle stays upright while moving.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe the water cycle step by step.",
    "What are the pros and cons of working from home? Give several of each.",
    "Tell me about the history of the printing press.",
    "Give me a recipe for a simple vegetable soup, with instructions.",
    "Why is the sky blue? Explain it to a curious ten-year-old.",
    "Write a letter to a friend describing your last holiday.",
]
MAX_TOKENS = 128
LEVELS = (1, 4, 16)
BASE_LEVELS = (1, 16)
HEADER = "| model | concurrency | aggregate tok/s | per-stream tok/s (mean) | TTFT p50 ms | TTFT p95 ms | requests |"
RESULTS = Path(__file__).with_name("RESULTS.md")
RESULTS_INTRO = """# Serving benchmark results

Written by `python -m bench.serve --write` (`make bench` runs it without --write), one section per commit.
Streaming requests of 128 tokens at temperature 1 with fixed seeds, in rounds of C simultaneous requests;
the production model `chatloop` is a random r=16 LoRA on every linear layer (bench/adapter.py).
Aggregate tok/s: completion tokens of the level over its wall time. Per-stream tok/s: tokens after the first
over the time after the first. TTFT: request sent to first content token, so at 16 it includes waiting for
the batch's prefills. The client runs on the same cores as the server."""


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    stream_tok_s: float | None  # None when fewer than two chunks arrived


@dataclass
class Row:
    model: str
    concurrency: int
    samples: list[Sample]
    wall_s: float

    def cells(self) -> list[str]:
        ttft_ms = 1000 * np.array([s.ttft_s for s in self.samples])
        rates = [s.stream_tok_s for s in self.samples if s.stream_tok_s is not None]
        return [
            self.model,
            str(self.concurrency),
            f"{sum(s.tokens for s in self.samples) / self.wall_s:.1f}",
            f"{np.mean(rates):.1f}" if rates else "-",
            f"{np.percentile(ttft_ms, 50):.0f}",
            f"{np.percentile(ttft_ms, 95):.0f}",
            str(len(self.samples)),
        ]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join([HEADER, "|---" * HEADER.count(" | ") + "|---|", *lines])


async def stream_one(client: AsyncOpenAI, model: str, prompt: str, seed: int, max_tokens: int) -> Sample:
    started = time.perf_counter()
    first = last = None
    chunks, usage, finish = 0, None, None
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=1.0,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            if choice.delta.content:
                last = time.perf_counter()
                first = last if first is None else first
                chunks += 1
    if usage is None or first is None or last is None:
        raise RuntimeError(f"{model}: stream without usage or content (seed {seed})")
    tokens = usage.completion_tokens
    if tokens > max_tokens or chunks > tokens or (finish == "length") != (tokens == max_tokens):
        print(f"warning: {model} seed {seed}: {tokens} tokens, {chunks} chunks, finish {finish}", file=sys.stderr)
    rate = (tokens - 1) / (last - first) if chunks > 1 else None
    return Sample(first - started, tokens, rate)


async def run_level(client: AsyncOpenAI, model: str, concurrency: int, seconds: float) -> Row:
    """Rounds of `concurrency` simultaneous requests until `seconds` have passed (two rounds at least)."""
    samples: list[Sample] = []
    started = time.perf_counter()
    rounds = 0
    while rounds < 2 or time.perf_counter() - started < seconds:
        ids = range(rounds * concurrency, (rounds + 1) * concurrency)
        samples += await asyncio.gather(
            *(stream_one(client, model, PROMPTS[i % len(PROMPTS)], i, MAX_TOKENS) for i in ids)
        )
        rounds += 1
    row = Row(model, concurrency, samples, time.perf_counter() - started)
    print(markdown_table([row]).splitlines()[-1], flush=True)
    return row


async def bench_server(url: str, seconds: float) -> list[Row]:
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=300) as client:
        for model in ("chatloop", "chatloop-base"):  # first requests pay for lazy setup and allocator growth
            await asyncio.gather(*(stream_one(client, model, PROMPTS[i], i, 16) for i in range(len(PROMPTS))))
        rows = [await run_level(client, "chatloop", c, seconds) for c in LEVELS]
        rows += [await run_level(client, "chatloop-base", c, seconds) for c in BASE_LEVELS]
    return rows


def bench_llama_cpp(settings: Settings, seconds: float) -> Row | None:
    """One stream through llama.cpp on the same GGUF and the same chat-templated prompt tokens."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(settings))
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False)
        for p in PROMPTS
    ]
    llm = Llama(model_path=str(default_gguf_path()), n_threads=2, n_ctx=1024, verbose=False)
    eos = {llm.token_eos(), *tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])}

    def stream(i: int, max_tokens: int) -> Sample:
        llm.reset()  # no prefix reuse between requests: the server gets none either
        llm.set_seed(i)
        sent, stamps = time.perf_counter(), []
        for token in llm.generate(prompts[i % len(prompts)], temp=1.0, top_k=0, top_p=1.0, min_p=0.0):
            if token in eos:
                break
            stamps.append(time.perf_counter())
            if len(stamps) == max_tokens:
                break
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
        return Sample((stamps[0] if stamps else time.perf_counter()) - sent, len(stamps), rate)

    stream(0, 16)  # the first call allocates buffers and pages the weights in
    samples: list[Sample] = []
    started = time.perf_counter()
    while len(samples) < 2 or time.perf_counter() - started < seconds:
        samples.append(stream(len(samples), MAX_TOKENS))
    row = Row("llama.cpp (Q4_1 GGUF, 2 threads)", 1, samples, time.perf_counter() - started)
    print(markdown_table([row]).splitlines()[-1], flush=True)
    return row


BENCH_REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def register_production(redis_url: str, adapter_dir: Path | None) -> str:
    """A flushed bench database whose production adapter is adapter_dir (or the base when None)."""

    async def run() -> str:
        client = Redis.from_url(redis_url, decode_responses=True)
        try:
            await client.flushdb()
            if adapter_dir is None:
                return BASE
            version = await registry.register_dir(client, adapter_dir, {"source": "bench"})
            await registry.promote(client, version, reason="bench")
            return version
        finally:
            await client.aclose()

    return asyncio.run(run())


@contextmanager
def running_server(data_dir: Path, adapter_dir: Path | None = None, redis_url: str = BENCH_REDIS,
                   timeout_s: float = 300) -> Iterator[str]:
    """`chatloop serve` with adapter_dir as production; stopped on exit, whatever the reason."""
    register_production(redis_url, adapter_dir)
    port = free_port()
    env = {
        **os.environ,
        "CHATLOOP_DATA_DIR": str(data_dir),
        "CHATLOOP_REDIS_URL": redis_url,
        "CHATLOOP_CHAT_REQUESTS_PER_MINUTE": "0",
        "CHATLOOP_LOG_LEVEL": "warning",
    }
    log = tempfile.NamedTemporaryFile("w+", prefix="chatloop-bench-", suffix=".log", delete=False)  # noqa: SIM115
    cmd = [sys.executable, "-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not ready(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready; its log: {log.name}")
            time.sleep(0.5)
        print(f"server ready on {url} (log: {log.name})", flush=True)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def write_results(label: str, table: str, machine: str, command: str) -> None:
    """Replace the section headed `## <label>` in RESULTS.md, or append it."""
    section = f"## {label}\n\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. {machine}\n\n`{command}`\n\n{table}"
    text = RESULTS.read_text() if RESULTS.exists() else RESULTS_INTRO
    kept = [s.rstrip() for s in re.split(r"(?m)^(?=## )", text) if not s.startswith(f"## {label}\n")]
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text("\n\n".join([*kept, section]) + "\n")
    tmp.replace(RESULTS)


def git_label() -> str:
    out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False)
    return f"chatloop {out.stdout.strip() or 'unknown'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Settings().data_dir, help="CHATLOOP_DATA_DIR for the server")
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--seconds", type=float, default=25, help="time per concurrency level")
    parser.add_argument("--write", action="store_true", help=f"record the table in {RESULTS.name}")
    parser.add_argument("--label", default=git_label(), help="section heading in RESULTS.md")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on kill too

    settings = Settings(data_dir=args.data_dir)
    load = os.getloadavg()[0]  # other work on these few cores skews every figure
    if args.url:
        rows = asyncio.run(bench_server(args.url.rstrip("/"), args.seconds))
        dtype = "dtype unknown (external server)"
    else:
        adapter = make_adapter(settings)
        print(f"adapter: {adapter}", flush=True)
        with running_server(args.data_dir, adapter) as url:
            rows = asyncio.run(bench_server(url, args.seconds))
        dtype = str(resolve_dtype(settings.dtype, resolve_device(settings.device))).removeprefix("torch.")
    if (reference := bench_llama_cpp(settings, args.seconds)) is not None:
        rows.append(reference)
    table = markdown_table(rows)
    machine = f"{os.cpu_count()} cores (load {load:.1f} at start), torch {torch.__version__}, {dtype}."
    if reference is None:
        machine += " llama-cpp-python not installed: no llama.cpp row."
    print(f"\n{machine}\n\n{table}")
    if args.write:
        write_results(args.label, table, machine, shlex.join(["python", "-m", "bench.serve", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
