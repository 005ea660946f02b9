"""What a JSON schema costs the decode step: `python -m bench.structured [--data-dir DIR] [--repeats 3]`.

The Engine (no HTTP) serves the default base through a random r=16 LoRA on every linear layer (as bench/engine.py)
and runs C simultaneous requests (C = 1 and 16) of 128 tokens at temperature 1 with fixed seeds, alternately free
and constrained by SCHEMA, a list of records long enough that no constrained answer ends before 128 tokens. Both
kinds are measured in the same run, interleaved, so the ratio survives a machine that is faster or slower from one
session to the next. Per-stream tok/s: a request's tokens after its first over the time after its first; the
best of --repeats runs per cell. The cost is 1 - constrained / free.
"""

import argparse
import asyncio
import logging
import statistics
import time
from pathlib import Path

import torch

from bench.engine import ADAPTER, bench_engine
from service.engine.engine import Engine
from service.engine.grammar import Grammar
from service.engine.requests import GenerationRequest, SamplingParams
from service.settings import Settings

MAX_TOKENS = 128
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "count": {"type": "integer", "minimum": 0},
                    "kind": {"enum": ["fruit", "tool", "animal", "city"]},
                    "ok": {"type": "boolean"},
                },
                "required": ["name", "count", "kind", "ok"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}


async def one(engine: Engine, prompt_ids: list[int], seed: int, grammar: Grammar | None) -> tuple[float, int]:
    """(time from the first text to the end, tokens) of one request."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, grammar=grammar)
    request = engine.submit(GenerationRequest(prompt_ids, params, adapter=ADAPTER))
    first, tokens = None, 0
    async for delta in request.stream():
        if first is None and delta.text:
            first = time.perf_counter()
        tokens = delta.completion_tokens
    return time.perf_counter() - (first or time.perf_counter()), tokens


async def per_stream(engine: Engine, prompts: list[list[int]], streams: int, grammar: Grammar | None) -> float:
    """Mean per-stream tok/s of `streams` simultaneous requests. A free answer may end early at EOS (the rows left
    then decode in a smaller batch, a little faster: the cost shown is if anything too high); none of the
    constrained ones can."""
    results = await asyncio.gather(*(one(engine, prompts[i % len(prompts)], i, grammar) for i in range(streams)))
    if grammar is not None:
        assert all(tokens == MAX_TOKENS for _, tokens in results), "a constrained answer ended before the limit"
    return statistics.mean((tokens - 1) / rest for rest, tokens in results if rest > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Settings().data_dir)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the fastest is kept")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")

    base, engine, prompts = bench_engine(args.data_dir, ask=" Answer in JSON.")
    started = time.perf_counter()
    grammar = engine.grammars.json_schema(SCHEMA)
    compile_ms = 1000 * (time.perf_counter() - started)

    async def run() -> list[tuple[int, float, float]]:
        await per_stream(engine, prompts, 2, None)  # warm-up
        await per_stream(engine, prompts, 2, grammar)
        rows = []
        for streams in args.levels:
            free, constrained = [], []
            for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits both kinds
                free.append(await per_stream(engine, prompts, streams, None))
                constrained.append(await per_stream(engine, prompts, streams, grammar))
            rows.append((streams, max(free), max(constrained)))
        return rows

    engine.start()
    try:
        rows = asyncio.run(run())
    finally:
        engine.stop()
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"{base.name} {base.dtype}, {torch.get_num_threads()} threads, load {load}; LoRA r=16 merged, temperature 1, "
          f"{MAX_TOKENS} tokens; schema compiled in {compile_ms:.0f} ms (llguidance, tokenizer view included)")
    print("| streams | free per-stream tok/s | json_schema per-stream tok/s | cost of the constraint |")
    print("|---|---|---|---|")
    for streams, free, constrained in rows:
        print(f"| {streams} | {free:.1f} | {constrained:.1f} | {100 * (1 - constrained / free):.1f} % |")


if __name__ == "__main__":
    main()
