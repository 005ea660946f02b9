"""Hot-swap latency under load: promote adapters repeatedly while concurrent streams run.

    python -m bench.swap [--streams 8] [--swaps 20] [--write]

Starts `chatloop serve` on the default model, registers two random LoRA adapters, keeps N streams busy,
and promotes the two in turn. Swap time is measured from the promotion (the registry's atomic pointer
change + pub/sub message) to the first answer the replica labels with the new version; every stream is
checked to complete with one label throughout. The streams are greedy, and each version's greedy answer
is taken alone before the load starts: an answer that starts like the other version's answer (more of it
than like its own label's) is mislabelled; one that starts like both as far counts apart, unverified.
Prints a table and, with --write, records it in bench/RESULTS.md.
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
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


async def one_stream(client: httpx.AsyncClient, url: str) -> tuple[str, str]:
    """Stream one greedy answer; return its adapter label (every chunk must carry the same one) and text."""
    body = {"model": "chatloop", "messages": MESSAGES, "max_tokens": 32, "stream": True, "temperature": 0}
    labels, text = set(), []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                labels.add(line.split('"system_fingerprint":"', 1)[1].split('"', 1)[0])
                text.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
            if line == "data: [DONE]":
                break
        else:
            raise RuntimeError("stream ended without [DONE]")
    if len(labels) != 1:
        raise RuntimeError(f"one stream, several labels: {labels}")
    return labels.pop(), "".join(text)


async def expected_answers(client: httpx.AsyncClient, url: str, versions: list[str]) -> dict[str, str]:
    """Each version's greedy answer, asked for by name, alone."""
    out = {}
    for version in versions:
        body = {"model": version, "messages": MESSAGES, "max_tokens": 32, "temperature": 0}
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        response.raise_for_status()
        out[version] = response.json()["choices"][0]["message"]["content"]
    return out


async def probe(client: httpx.AsyncClient, url: str) -> str:
    body = {"model": "chatloop", "messages": MESSAGES, "max_tokens": 1}
    response = await client.post(f"{url}/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()["system_fingerprint"]


def closest(text: str, expected: dict[str, str]) -> str | None:
    """The version whose answer alone shares the longest start with `text`; None on a tie.

    Under load a greedy answer can part from its version's lone answer after a while (bf16 sums in another
    order), but it starts like its own version's answer, not like the other's.
    """
    shared = {v: next((i for i, (a, b) in enumerate(zip(text, e, strict=False)) if a != b), min(len(text), len(e)))
              for v, e in expected.items()}
    best = max(shared.values())
    winners = [v for v, n in shared.items() if n == best]
    return winners[0] if len(winners) == 1 else None


async def run(url: str, redis_url: str, versions: list[str], streams: int, swaps: int) -> dict:
    redis = Redis.from_url(redis_url, decode_responses=True)
    stop, failures, answers = asyncio.Event(), [], []

    async def load(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                answers.append(await one_stream(client, url))
            except Exception as exc:
                failures.append(repr(exc))
                await asyncio.sleep(0.1)  # a failure that came at once must not spin the loop

    times = []
    async with httpx.AsyncClient(timeout=120) as client:
        expected = await expected_answers(client, url, versions)
        print(f"each version's greedy answer, alone: {expected}", flush=True)
        workers = [asyncio.create_task(load(client)) for _ in range(streams)]
        await asyncio.sleep(2)
        for i in range(swaps):
            target = versions[(i + 1) % 2]  # versions[0] is production already: promoting it again is refused
            started = time.perf_counter()
            await registry.promote(redis, target, reason="bench")
            while await probe(client, url) != target:
                pass
            times.append(1000 * (time.perf_counter() - started))
            print(f"swap {i + 1}/{swaps} to {target}: {times[-1]:.0f} ms", flush=True)
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*workers)
    await redis.aclose()
    times.sort()
    verdicts = [closest(text, expected) for _, text in answers]
    return {
        "swaps": len(times), "p50": statistics.median(times), "p99": times[min(len(times) - 1, int(0.99 * len(times)))],
        "max": times[-1], "streams": streams, "completed": len(answers), "failed": len(failures),
        "errors": failures[:3],
        "mislabelled": sum(v is not None and v != label for v, (label, _) in zip(verdicts, answers, strict=True)),
        "neither": verdicts.count(None),
        "distinct": len(set(expected.values())) == len(expected),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--data-dir", type=Path, default=Settings().data_dir)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on kill too

    settings = Settings(data_dir=args.data_dir)
    # B drawn wider than bench/adapter.py's default, so that the two versions' greedy answers differ.
    adapters = [make_adapter(settings, f"bench-swap-{seed}-wide", b_std=0.02, seed=seed) for seed in (1, 2)]
    with running_server(args.data_dir, adapters[0]) as server:

        async def second() -> list[str]:
            client = Redis.from_url(BENCH_REDIS, decode_responses=True)
            try:
                return [await registry.production(client),
                        await registry.register_dir(client, adapters[1], {"source": "bench"})]
            finally:
                await client.aclose()

        versions = asyncio.run(second())
        result = asyncio.run(run(server.url, BENCH_REDIS, versions, args.streams, args.swaps))
    table = (
        "| streams | swaps | swap p50 ms | swap p99 ms | swap max ms | streams completed | failed or broken "
        "| mislabelled | unverified |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        f"| {result['streams']} | {result['swaps']} | {result['p50']:.0f} | {result['p99']:.0f} | {result['max']:.0f} "
        f"| {result['completed']} | {result['failed']} | {result['mislabelled']} | {result['neither']} |\n"
    )
    if not result["distinct"]:
        table += "\nThe two versions gave the same greedy answer alone: the label check could not tell them apart.\n"
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
