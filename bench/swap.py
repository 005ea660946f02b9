"""Hot-swap latency under load: promote adapters repeatedly while concurrent streams run.

    python -m bench.swap [--streams 8] [--swaps 20] [--write]

Starts `chatloop serve` on the default model (or uses --url), registers two random LoRA adapters,
keeps N streams busy, and promotes the two in turn. Swap time is measured from the promotion (the
registry's atomic pointer change + pub/sub message) to the first answer the replica labels with the
new version; every stream is checked to complete with one label throughout. Prints a table and, with
--write, records it in bench/RESULTS.md.
"""

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
from redis.asyncio import Redis

from bench.adapter import make_adapter
from bench.serve import BENCH_REDIS, git_label, running_server, write_results
from service.settings import Settings
from service.store import registry

MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]


async def one_stream(client: httpx.AsyncClient, url: str) -> str:
    """Stream one answer; return its adapter label (every chunk must carry the same one)."""
    body = {"model": "chatloop", "messages": MESSAGES, "max_tokens": 32, "stream": True}
    labels = set()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                labels.add(line.split('"system_fingerprint":"', 1)[1].split('"', 1)[0])
            if line == "data: [DONE]":
                break
        else:
            raise RuntimeError("stream ended without [DONE]")
    if len(labels) != 1:
        raise RuntimeError(f"one stream, several labels: {labels}")
    return labels.pop()


async def probe(client: httpx.AsyncClient, url: str) -> str:
    body = {"model": "chatloop", "messages": MESSAGES, "max_tokens": 1}
    response = await client.post(f"{url}/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()["system_fingerprint"]


async def run(url: str, redis_url: str, versions: list[str], streams: int, swaps: int) -> dict:
    redis = Redis.from_url(redis_url, decode_responses=True)
    stop, failures, completed = asyncio.Event(), [], 0

    async def load(client: httpx.AsyncClient) -> None:
        nonlocal completed
        while not stop.is_set():
            try:
                await one_stream(client, url)
                completed += 1
            except Exception as exc:
                failures.append(repr(exc))

    times = []
    async with httpx.AsyncClient(timeout=120) as client:
        workers = [asyncio.create_task(load(client)) for _ in range(streams)]
        await asyncio.sleep(2)
        for i in range(swaps):
            target = versions[i % 2]
            started = time.perf_counter()
            await registry.promote(redis, target, reason="bench")
            while await probe(client, url) != target:
                pass
            times.append(1000 * (time.perf_counter() - started))
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*workers)
    await redis.aclose()
    times.sort()
    return {
        "swaps": len(times), "p50": statistics.median(times), "p99": times[min(len(times) - 1, int(0.99 * len(times)))],
        "max": times[-1], "streams": streams, "completed": completed, "failed": len(failures),
        "errors": failures[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--data-dir", type=Path, default=Settings().data_dir)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    settings = Settings(data_dir=args.data_dir)
    adapters = [make_adapter(settings, f"bench-swap-{seed}", seed=seed) for seed in (1, 2)]
    with running_server(args.data_dir, adapters[0]) as url:

        async def second() -> list[str]:
            client = Redis.from_url(BENCH_REDIS, decode_responses=True)
            try:
                return [await registry.production(client),
                        await registry.register_dir(client, adapters[1], {"source": "bench"})]
            finally:
                await client.aclose()

        versions = asyncio.run(second())
        result = asyncio.run(run(url, BENCH_REDIS, versions, args.streams, args.swaps))
    table = (
        "| streams | swaps | swap p50 ms | swap p99 ms | swap max ms | streams completed | failed or broken |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {result['streams']} | {result['swaps']} | {result['p50']:.0f} | {result['p99']:.0f} | {result['max']:.0f} "
        f"| {result['completed']} | {result['failed']} |\n"
    )
    print(table)
    if result["errors"]:
        print("errors:", *result["errors"], sep="\n  ")
    if args.write:
        machine = (f"Swap time: promotion (pointer + pub/sub) to the first answer labelled with the new version, "
                   f"seen by a client while {args.streams} streams run. {os.cpu_count()} cores, "
                   f"load {os.getloadavg()[0]:.1f}.")
        write_results(f"Hot swap ({git_label()})", table, machine, "python -m bench.swap " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
