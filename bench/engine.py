"""Decode speed of the Engine itself, without HTTP: `python -m bench.engine [--data-dir DIR]`.

Serves the default base through a random r=16 LoRA on every linear layer and runs C simultaneous
requests (C = 1, 4, 16) of at most 128 tokens at temperature 1 with fixed seeds. Answers may stop
early at EOS, so rates count the tokens actually generated: aggregate = all tokens over the level's
wall time; per-stream = a request's tokens after its first over the time after its first; TTFT =
submit to first text. bench/serve.py measures the same through HTTP.
"""

import argparse
import asyncio
import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from service.engine.engine import Engine
from service.engine.lora import LoraAdapter
from service.engine.model import BaseModel, load_base_model, one_torch_thread
from service.engine.requests import GenerationRequest, SamplingParams
from service.settings import Settings

ADAPTER = "bench"
MAX_TOKENS = 128
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market in a large city, with all the sights and smells.",
    "Write a long letter from a sailor to his family at home.",
]


@one_torch_thread()  # this thread's torch work must not slow the engine thread's (see one_torch_thread)
def random_adapter(base: BaseModel) -> LoraAdapter:
    """r=16 on every linear layer; lora_B is random (peft starts it at zero, a no-op adapter)."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base.model).float(), LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=5e-3)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return LoraAdapter.from_dir(Path(tmp))


def bench_engine(data_dir: Path, ask: str = "") -> tuple[BaseModel, Engine, list[list[int]]]:
    """The default base serving the random adapter as ADAPTER, and PROMPTS (each followed by `ask`) templated and
    tokenised: what bench/engine.py and bench/structured.py measure."""
    base = load_base_model(Settings(data_dir=data_dir))
    engine = Engine(base, max_batch_size=32, max_context=2048)
    engine.add_adapter(ADAPTER, base.with_adapter(random_adapter(base)))
    tok = base.tokenizer
    prompts = [
        tok(tok.apply_chat_template([{"role": "user", "content": f"{p}{ask}"}], add_generation_prompt=True,
                                    tokenize=False), add_special_tokens=False)["input_ids"]
        for p in PROMPTS
    ]
    return base, engine, prompts


async def one(engine: Engine, prompt_ids: list[int], seed: int, top_p: float) -> tuple[float, float, int]:
    """(time to first text, time from first text to the end, tokens) of one request."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=top_p, seed=seed)
    started = time.perf_counter()
    request = engine.submit(GenerationRequest(prompt_ids, params, adapter=ADAPTER))
    first, tokens = None, 0
    async for delta in request.stream():
        if first is None and delta.text:
            first = time.perf_counter()
        tokens = delta.completion_tokens
    end = time.perf_counter()
    first = first or end  # an answer that is EOS at once has no text
    return first - started, end - first, tokens


async def level(engine: Engine, prompts: list[list[int]], concurrency: int, top_p: float = 1.0) -> dict[str, float]:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(one(engine, prompts[i % len(prompts)], seed=i, top_p=top_p) for i in range(concurrency))
    )
    wall = time.perf_counter() - started
    return {
        "streams": concurrency,
        "tokens": sum(tokens for _, _, tokens in results),
        "aggregate": sum(tokens for _, _, tokens in results) / wall,
        "per_stream": statistics.mean((tokens - 1) / rest for _, rest, tokens in results if rest > 0),
        "ttft_ms": 1000 * statistics.median(ttft for ttft, _, _ in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Engine decode speed at 1, 4 and 16 concurrent requests.")
    parser.add_argument("--data-dir", type=Path, default=Settings().data_dir)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=2, help="runs per level; the fastest is shown")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, as many clients send (0.9...)")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("service").setLevel(logging.INFO)  # e.g. the engine changing its thread count

    base, engine, prompts = bench_engine(args.data_dir)

    async def run_levels() -> list[dict[str, float]]:
        await level(engine, prompts, 2)  # warm-up: first-call allocations and kernel choices
        rows = []
        for concurrency in args.levels:
            runs = [await level(engine, prompts, concurrency, args.top_p) for _ in range(args.repeats)]
            rows.append(max(runs, key=lambda r: r["aggregate"]))
        return rows

    engine.start()
    try:
        rows = asyncio.run(run_levels())
    finally:
        engine.stop()
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(
        f"{base.name} {base.dtype}, {torch.get_num_threads()} threads, load {load}; LoRA r=16 merged, "
        f"temperature 1, top_p {args.top_p}"
    )
    print("| streams | tokens | aggregate tok/s | per-stream tok/s | TTFT p50 ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['streams']} | {r['tokens']} | {r['aggregate']:.1f} | {r['per_stream']:.1f} | {r['ttft_ms']:.0f} |")


if __name__ == "__main__":
    main()
