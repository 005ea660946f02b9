"""Serving benchmark: chatloop through HTTP against transformers' generate(), in one run on the same cores.

    python -m bench.serve [--data-dir DIR] [--seconds 20] [--levels 1 16 64] [--skip reference,turns,join,memory]
                          [--url http://host:port] [--write]

1. The reference (bench/reference.py): transformers `generate()` in bf16 on the base, 1 and 16 prompts per batch.
2. `chatloop serve` on a free port with a random r=16 LoRA on every linear layer in production (bench/adapter.py),
   batches of up to 64 rows: rounds of C simultaneous streaming requests (128 tokens, temperature 1, fixed seeds)
   for about --seconds per level, through a raw-socket client (bench/sse_client.py) so that the client's own
   cost stays small beside the server's.
3. Latency (bench/latency.py): a ~1,000-token conversation's second turn against its first; the longest wait of
   8 decoding streams' next token while a 1,500-token prompt joins; peak RSS with 4 adapters loaded.
The hot-swap figures come from bench/swap.py.
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
from redis.asyncio import Redis
from transformers import AutoTokenizer

from bench import latency
from bench.adapter import make_adapter
from bench.reference import generate_reference, llama_cpp_reference
from bench.sse_client import Sample, stream_chat
from common.models import BASE
from service.cli.launcher import free_port
from service.engine.model import resolve_base_model, resolve_device, resolve_dtype
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
LEVELS = (1, 16, 64)
REFERENCE_LEVELS = (1, 16)
# One client stands in for many users here: the per-caller cap would otherwise hold it to 16 rows.
SERVER_ENV = {"CHATLOOP_MAX_BATCH_SIZE": "64", "CHATLOOP_MAX_SEQUENCES_PER_CALLER": "0"}
HEADER = ("| what | streams | aggregate tok/s | x reference | per-stream tok/s (mean) | TTFT p50 ms | TTFT p95 ms "
          "| requests |")
RESULTS = Path(__file__).with_name("RESULTS.md")
RESULTS_INTRO = """# Serving benchmark results

Written by `python -m bench.serve --write` (`make bench` runs it without --write), one section per commit.
Streaming requests of 128 tokens at temperature 1 with fixed seeds, in rounds of C simultaneous requests;
the production model `chatloop` is a random r=16 LoRA on every linear layer (bench/adapter.py).
Aggregate tok/s: completion tokens of the level over its wall time. Per-stream tok/s: tokens after the first
over the time after the first. TTFT: request sent to first content token, so at 16 it includes waiting for
the batch's prefills. The client runs on the same cores as the server."""


@dataclass
class Row:
    what: str
    concurrency: int
    samples: list[Sample]
    wall_s: float
    reference: float | None = None  # aggregate tok/s this row is compared with

    @property
    def aggregate(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s

    def cells(self) -> list[str]:
        streamed = [s for s in self.samples if len(s.stamps) > 1]
        ttft_ms = 1000 * np.array([s.ttft_s for s in streamed]) if streamed else None
        rates = [r for s in self.samples if (r := s.stream_tok_s) is not None]
        return [
            self.what, str(self.concurrency), f"{self.aggregate:.1f}",
            f"{self.aggregate / self.reference:.2f}" if self.reference else "-",
            f"{np.mean(rates):.1f}" if rates else "-",
            f"{np.percentile(ttft_ms, 50):.0f}" if ttft_ms is not None else "-",
            f"{np.percentile(ttft_ms, 95):.0f}" if ttft_ms is not None else "-",
            str(len(self.samples)),
        ]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join([HEADER, "|---" * HEADER.count(" | ") + "|---|", *lines])


def body(i: int, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": "chatloop", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": i}


async def run_level(url: str, concurrency: int, seconds: float, reference: float | None) -> Row:
    """Rounds of `concurrency` simultaneous requests until `seconds` have passed (two rounds at least)."""
    samples: list[Sample] = []
    started = time.perf_counter()
    rounds = 0
    while rounds < 2 or time.perf_counter() - started < seconds:
        ids = range(rounds * concurrency, (rounds + 1) * concurrency)
        samples += await asyncio.gather(*(stream_chat(url, body(i)) for i in ids))
        rounds += 1
    row = Row("chatloop, LoRA in production, HTTP", concurrency, samples, time.perf_counter() - started, reference)
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


@dataclass
class Server:
    url: str
    pid: int


@contextmanager
def running_server(data_dir: Path, adapter_dir: Path | None = None, redis_url: str = BENCH_REDIS,
                   timeout_s: float = 300, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`chatloop serve` with adapter_dir as production (and `env` on top); stopped on exit, whatever the reason."""
    register_production(redis_url, adapter_dir)
    port = free_port()
    env = {
        **os.environ,
        "CHATLOOP_DATA_DIR": str(data_dir),
        "CHATLOOP_REDIS_URL": redis_url,
        "CHATLOOP_CHAT_REQUESTS_PER_MINUTE": "0",
        "CHATLOOP_LOG_LEVEL": "warning",
        **(env or {}),
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
        yield Server(url, server.pid)
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


def record_section(label: str, table: str, machine: str, module: str) -> None:
    """write_results with the command that ran (`python -m <module>` and this process's arguments), and say so."""
    write_results(label, table + "\n", machine, " ".join([f"python -m {module}", *sys.argv[1:]]))
    print(f"written ({git_label()})")


def git_label() -> str:
    out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False)
    return f"chatloop {out.stdout.strip() or 'unknown'}"


@dataclass
class Report:
    rows: list[Row]
    targets: list[tuple[str, str, str]]  # (what, measured, goal)

    def markdown(self) -> str:
        lines = ["| target | measured | goal |", "|---|---|---|"]
        lines += [f"| {what} | {measured} | {goal} |" for what, measured, goal in self.targets]
        return markdown_table(self.rows) + "\n\n" + "\n".join(lines)


def reference_rows(settings: Settings, seconds: float) -> list[Row]:
    """generate() at each reference level, with every thread count up to torch's and the best kept: on shared
    cores one thread can be several times faster than two (service/engine/threads.py), and the reference
    should not lose for that."""
    rows, most = [], torch.get_num_threads()
    for concurrency in REFERENCE_LEVELS:
        tries = []
        for threads in sorted({1, most}):
            torch.set_num_threads(threads)
            samples, wall = generate_reference(settings, PROMPTS, concurrency, MAX_TOKENS, seconds)
            tries.append(Row(f"transformers generate(), bf16, base, {threads} thread(s)", concurrency, samples, wall))
            print(markdown_table(tries[-1:]).splitlines()[-1], flush=True)
        rows.append(max(tries, key=lambda r: r.aggregate))
    torch.set_num_threads(most)
    if (llama := llama_cpp_reference(settings, PROMPTS, MAX_TOKENS, seconds)) is not None:
        rows.append(Row("llama.cpp (Q4_1 GGUF, 2 threads)", 1, llama, sum(s.stamps[-1] - s.started for s in llama)))
    return rows


async def bench_server(url: str, tokenizer, levels: list[int], seconds: float, skip: set[str],
                       reference: dict[int, float]) -> Report:
    await asyncio.gather(*(stream_chat(url, body(i, 16)) for i in range(len(PROMPTS))))  # warm-up
    rows, targets = [], []
    for concurrency in levels:
        ref = reference.get(1 if concurrency == 1 else 16)
        rows.append(await run_level(url, concurrency, seconds, ref))
        if ref:
            goal = {1: 3, 16: 3, 64: 5}.get(concurrency)
            targets.append((f"{concurrency} stream(s) vs generate() at {1 if concurrency == 1 else 16}",
                            f"{rows[-1].aggregate / ref:.2f}x", f">= {goal}x" if goal else "-"))
    if "turns" not in skip:
        latency.wait_idle(url)
        turns = await latency.second_turn(url, tokenizer)
        targets.append((
            f"TTFT of a {turns.prompt_tokens}-token conversation's second turn / its first",
            f"{turns.ratio:.2f} ({1000 * np.median(turns.second_ttft_s):.0f} / "
            f"{1000 * np.median(turns.first_ttft_s):.0f} ms)", "<= 0.3"))
        print(targets[-1], flush=True)
    if "join" not in skip:
        latency.wait_idle(url)
        join = await latency.join_delay(url, tokenizer)
        targets.append((
            f"longest wait for a running stream's next token while a {join.prompt_tokens}-token prompt joins "
            f"{join.running} decoding streams",
            f"{join.worst_gap_ms:.0f} ms (median gap before: {join.gap_before_ms:.0f} ms; the prompt's TTFT "
            f"{join.join_ttft_ms:.0f} ms)", "<= 150 ms"))
        print(targets[-1], flush=True)
    return Report(rows, targets)


async def register_more(redis_url: str, adapters: list[Path]) -> list[str]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        return [await registry.register_dir(client, a, {"source": "bench"}) for a in adapters]
    finally:
        await client.aclose()


def memory(server: Server, settings: Settings) -> tuple[str, str, str]:
    """Peak RSS once 4 adapters are loaded: production and three more versions, each asked for by name."""
    for seed in (11, 12, 13):  # one at a time: the registry keeps only a few never-promoted versions
        adapter = make_adapter(settings, f"bench-lora-r16-{seed}", seed=seed)
        versions = asyncio.run(register_more(BENCH_REDIS, [adapter]))
        asyncio.run(latency.load_adapters(server.url, versions))
    peak, now = latency.peak_rss_mib(server.pid)
    return "peak RSS of `chatloop serve`, 4 adapters loaded", f"{peak:.0f} MiB (now {now:.0f} MiB)", "printed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Settings().data_dir, help="CHATLOOP_DATA_DIR for the server")
    parser.add_argument("--url", help="benchmark this running server instead of starting one (no memory part)")
    parser.add_argument("--seconds", type=float, default=20, help="time per concurrency level")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: reference,turns,join,memory")
    parser.add_argument("--write", action="store_true", help=f"record the tables in {RESULTS.name}")
    parser.add_argument("--label", default=git_label(), help="section heading in RESULTS.md")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on kill too

    settings = Settings(data_dir=args.data_dir)
    load = os.getloadavg()[0]  # other work on these few cores skews every figure
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(settings))
    references = [] if "reference" in skip else reference_rows(settings, args.seconds)
    by_level = {r.concurrency: r.aggregate for r in references if r.what.startswith("transformers")}
    if args.url:
        report = asyncio.run(bench_server(args.url.rstrip("/"), tokenizer, args.levels, args.seconds, skip, by_level))
        dtype = "dtype unknown (external server)"
    else:
        adapter = make_adapter(settings)
        with running_server(args.data_dir, adapter, env=SERVER_ENV) as server:
            report = asyncio.run(bench_server(server.url, tokenizer, args.levels, args.seconds, skip, by_level))
            if "memory" not in skip:
                report.targets.append(memory(server, settings))
        dtype = str(resolve_dtype(settings.dtype, resolve_device(settings.device))).removeprefix("torch.")
    report.rows = references + report.rows
    machine = (f"{os.cpu_count()} cores shared with other agents' work (load {load:.1f} at start, "
               f"{os.getloadavg()[0]:.1f} at the end): absolute figures are noisy, ratios within the run are what "
               f"count. torch {torch.__version__}, {dtype}.")
    print(f"\n{machine}\n\n{report.markdown()}")
    if args.write:
        write_results(args.label, report.markdown(), machine,
                      shlex.join(["python", "-m", "bench.serve", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
