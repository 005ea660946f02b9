"""Per-decode-step CPU cost of three grammar engines on the project's tokenizer (SmolLM2's, 49152 tokens).

Engines: llguidance (what service/engine/grammar.py uses), xgrammar 0.2.8 and outlines-core 0.2.14. Each is
imported lazily; one that is not installed is skipped with the pip line that installs it, so this runs in the
project venv with llguidance alone.

For one JSON schema (an object with a string, an integer, an enum and an array of strings, all required, no
additional properties), compiled as the service compiles it (no free whitespace: compact separators), it
measures:

- setup: the one-off view of the tokenizer each engine needs (llguidance.hf.from_tokenizer,
  xgrammar.TokenizerInfo.from_huggingface, an outlines_core.Vocabulary built by hand);
- compile: the one-off compile of the schema against that tokenizer (xgrammar's cache off);
- per decode step, for batch 1 and batch 16 (`--batch`): filling the (B, ceil(V/32)) int32 token bitmask for
  all B matchers one after the other ("fill seq"), and with the engine's own parallel call where it has one
  ("fill par": llguidance's LLExecutor, xgrammar's BatchGrammarMatcher, `--threads` threads); applying the
  mask to (B, 49152) float32 logits with one plain-torch function shared by all engines ("apply", as the
  service does it: no torch.compile); advancing every matcher by its token ("advance").

Each of the B matchers is driven along a real answer: a different valid JSON document (ANSWERS) tokenised by
the tokenizer and ended by EOS. At every step the next token is checked to be allowed by the mask before it
is consumed, and a matcher that has consumed its EOS must be finished; it then starts its answer again, so
the batch stays full for `--steps` steps. The sequential and parallel fills are timed in separate passes of
the same steps, and the engines take turns within each repeat. A figure is the mean per step over the
`--steps` steps of one repeat; the table shows the median over `--repeats` repeats (each starts the answers
from the beginning again), in milliseconds. "grammar" is the engine's own work per step (the cheaper fill
plus advance), the figure to compare engines by; "+ apply" adds the shared apply.

Run (the two other engines live outside the project venv):

    pip install --no-deps --target /tmp/grammar-alt xgrammar==0.2.8 outlines-core==0.2.14 apache-tvm-ffi
    PYTHONPATH=/tmp/grammar-alt .venv/bin/python -m bench.grammar_engines [--steps 64 --repeats 7]

About 40 s on 2 cores. Timings depend on the machine and on whatever else runs on it: compare engines
within one run. On a small machine that something else keeps busy, torch's multi-threaded apply can take
ten times longer; `--torch-threads 1` keeps it steady.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import statistics
import time
from typing import Any

import torch

from bench.grammar_adapters import VOCAB, Engine, LLGuidance, OutlinesCore, XGrammar

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}

ANSWERS = [
    {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines", "poetry"]},
    {"name": "Alan Turing", "age": 41, "role": "editor", "tags": ["computability", "cryptanalysis"]},
    {"name": "Grace Hopper", "age": 85, "role": "viewer", "tags": ["compilers", "COBOL", "navy"]},
    {"name": "Edsger W. Dijkstra", "age": 72, "role": "guest", "tags": ["shortest paths", "semaphores"]},
    {"name": "José Martínez", "age": 29, "role": "editor", "tags": ["café", "niño", "año nuevo"]},
    {"name": "Zoë O'Brien", "age": 33, "role": "viewer", "tags": []},
    {"name": "Margaret Hamilton", "age": 88, "role": "admin", "tags": ["Apollo", "software engineering"]},
    {"name": "Donald Knuth", "age": 87, "role": "guest", "tags": ["TeX", "The Art of Computer Programming"]},
    {"name": "Barbara Liskov", "age": 85, "role": "editor", "tags": ["substitution", "CLU", "Argus"]},
    {"name": "Tanaka Hiroshi (田中 博)", "age": 54, "role": "viewer", "tags": ["東京", "ロボット"]},
    {"name": "Linus Torvalds", "age": 55, "role": "admin", "tags": ["kernel", "git", "\"good taste\""]},
    {"name": "Frances E. Allen", "age": 88, "role": "guest", "tags": ["optimising compilers"]},
    {"name": "Ken Thompson", "age": 82, "role": "editor", "tags": ["Unix", "B", "Go", "UTF-8", "regex"]},
    {"name": "Radia Perlman", "age": 73, "role": "viewer", "tags": ["spanning tree", "networks"]},
    {"name": "Yukihiro Matsumoto", "age": -1, "role": "guest", "tags": ["Ruby 💎", "happiness"]},
    {"name": "Sophie Wilson", "age": 67, "role": "admin", "tags": ["ARM", "BBC Micro", "C:\\ drive"]},
]

SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, the logits (B, V) of the tokens whose bit is 0 in the bitmask (B, ceil(V/32))."""
    allowed = ((bitmask[:, :, None] >> SHIFTS) & 1).bool().view(bitmask.shape[0], -1)[:, : logits.shape[1]]
    logits.masked_fill_(~allowed, float("-inf"))


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token >> 5]) >> (token & 31)) & 1)


def load_tokenizer() -> Any:
    """The project's tokenizer, as the service loads it (from the GGUF of the weights package)."""
    from transformers import AutoTokenizer

    from service.engine.model import default_gguf_path

    gguf = default_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def answer_tokens(tok: Any) -> list[list[int]]:
    """Each answer as the service's grammar wants it (no whitespace, UTF-8 as is), tokenised, then EOS."""
    texts = [json.dumps(a, separators=(",", ":"), ensure_ascii=False) for a in ANSWERS]
    return [[*tok.encode(t, add_special_tokens=False), tok.eos_token_id] for t in texts]


def run_pass(engine: Engine, tokens: list[list[int]], steps: int, parallel: bool) -> tuple[float, float, float]:
    """Drive len(tokens) fresh matchers `steps` steps along their answers; mean ms per step of fill, apply, advance."""
    batch = len(tokens)
    matchers = engine.matchers(batch)
    bitmask = torch.full((batch, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    logits = torch.randn(batch, VOCAB)
    pos = [0] * batch
    fill = engine.fill_par if parallel else engine.fill
    t_fill = t_apply = t_advance = 0
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        fill(matchers, bitmask)
        t1 = time.perf_counter_ns()
        apply_mask(logits, bitmask)
        t2 = time.perf_counter_ns()
        step = [seq[p] for seq, p in zip(tokens, pos, strict=True)]
        for i, token in enumerate(step):
            if not allowed(bitmask, i, token):
                raise AssertionError(f"{engine.name}: answer {i} token {pos[i]} ({token}) not allowed by the mask")
        t3 = time.perf_counter_ns()
        ok = [engine.advance(m, token) for m, token in zip(matchers, step, strict=True)]
        t4 = time.perf_counter_ns()
        if not all(ok):
            raise AssertionError(f"{engine.name}: a matcher refused its allowed token")
        for i, m in enumerate(matchers):
            pos[i] += 1
            if pos[i] == len(tokens[i]):
                if not engine.done(m):
                    raise AssertionError(f"{engine.name}: answer {i} consumed but its matcher is not finished")
                engine.reset(m)
                pos[i] = 0
        t_fill += t1 - t0
        t_apply += t2 - t1
        t_advance += t4 - t3
    return t_fill / steps / 1e6, t_apply / steps / 1e6, t_advance / steps / 1e6


def prepare(engine: Engine, tok: Any) -> tuple[float, float]:
    """Build the engine's view of the tokenizer, then compile SCHEMA: seconds, milliseconds."""
    t0 = time.perf_counter()
    engine.setup(tok)
    t1 = time.perf_counter()
    engine.compile(SCHEMA)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) * 1e3


def bench(engines: list[Engine], tokens: list[list[int]], batches: list[int], steps: int, repeats: int) -> dict:
    """Per (engine, batch, pass) the per-step means of each repeat. The engines take turns within a repeat, so
    that whatever else runs on the machine weighs on all of them alike."""
    runs: dict[tuple[str, int, str], list[tuple[float, float, float]]] = {}
    for _ in range(repeats):
        for engine in engines:
            for batch in batches:
                seqs = [tokens[i % len(tokens)] for i in range(batch)]
                passes = ["seq", "par"] if engine.parallel and batch > 1 else ["seq"]
                for kind in passes:
                    result = run_pass(engine, seqs, steps, parallel=kind == "par")
                    runs.setdefault((engine.name, batch, kind), []).append(result)
    return runs


def xgrammar_kernel(batch: int, repeats: int) -> float | None:
    """ms for xgrammar's own CPU kernel to apply a (batch, V) mask, where it works (checked against apply_mask)."""
    try:
        xgr = importlib.import_module("xgrammar")
    except ImportError:
        return None
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, (VOCAB + 31) // 32), dtype=torch.int32)
    logits = torch.randn(batch, VOCAB)
    expected = logits.clone()
    apply_mask(expected, bitmask)
    try:
        xgr.apply_token_bitmask_inplace(logits, bitmask)
    except Exception as exc:  # whatever stops it, say so
        print(f"xgrammar's CPU kernel did not run: {exc}")
        return None
    if not torch.equal(logits, expected):
        print("xgrammar's CPU kernel disagrees with apply_mask")
        return None
    times = []
    for _ in range(repeats * 20):
        t0 = time.perf_counter_ns()
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="decode steps per repeat (default 64)")
    parser.add_argument("--repeats", type=int, default=7, help="repeats; the median is reported (default 7)")
    parser.add_argument("--batch", type=int, default=16, help="the larger batch, besides 1 (default 16)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads of the parallel fills and of xgrammar's compiler (default: all CPUs)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch's intra-op threads for the apply (default: torch's own choice)")
    parser.add_argument("--engines", default="llguidance,xgrammar,outlines-core",
                        help="comma-separated engines to run (default: all three)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    chosen = args.engines.split(",")
    engines: list[Engine] = []
    for engine in (LLGuidance(args.threads), XGrammar(args.threads), OutlinesCore()):
        if engine.name not in chosen:
            continue
        if importlib.util.find_spec(engine.module) is None:
            print(f"{engine.name}: not installed: {engine.pip}")
            continue
        try:
            engine.load()
        except ImportError as exc:
            print(f"{engine.name}: cannot be imported ({exc}); skipped")
            continue
        engines.append(engine)
    if not engines:
        return

    tok = load_tokenizer()
    tokens = answer_tokens(tok)
    lengths = [len(t) for t in tokens]
    print(f"tokenizer: {len(tok)} tokens; {len(tokens)} answers of {min(lengths)}-{max(lengths)} tokens (EOS incl.); "
          f"{args.steps} steps x {args.repeats} repeats; {args.threads} threads of {os.cpu_count()} CPUs; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    batches = [1, args.batch] if args.batch != 1 else [1]
    one_off = {}
    for engine in engines:
        print(f"preparing {engine.name}", flush=True)
        one_off[engine.name] = prepare(engine, tok)
    print("timing", flush=True)
    runs = bench(engines, tokens, batches, args.steps, args.repeats)

    def median(key: tuple[str, int, str], part: int) -> float | None:
        return statistics.median(r[part] for r in runs[key]) if key in runs else None

    apply_ms = {b: statistics.median(r[1] for (_, batch, _), rs in runs.items() if batch == b for r in rs)
                for b in batches}
    rows = []
    for engine in engines:
        for batch in batches:
            fills = [median((engine.name, batch, kind), 0) for kind in ("seq", "par")]
            passes = [r for kind in ("seq", "par") for r in runs.get((engine.name, batch, kind), [])]
            advance = statistics.median(r[2] for r in passes)
            grammar = min(f for f in fills if f is not None) + advance
            rows.append((engine, batch, *fills, advance, grammar, grammar + apply_ms[batch]))

    print()
    head = (f"{'engine':<14} {'version':>8} {'setup s':>8} {'compile ms':>11} {'batch':>5} {'fill seq':>9} "
            f"{'fill par':>9} {'advance':>8} {'grammar':>8} {'+ apply':>8}")
    print(head)
    print("-" * len(head))
    for engine, batch, seq, par, advance, grammar, total in rows:
        setup_s, compile_ms = one_off[engine.name]
        par_text = f"{par:9.3f}" if par is not None else f"{'-':>9}"
        print(f"{engine.name:<14} {engine.version():>8} {setup_s:8.2f} {compile_ms:11.1f} {batch:5d} {seq:9.3f} "
              f"{par_text} {advance:8.3f} {grammar:8.3f} {total:8.3f}")
    print("ms per decode step (mean over the steps of a repeat, median over repeats); grammar = the cheaper fill "
          "+ advance;\n+ apply = grammar + the shared plain-torch apply below")
    for batch in batches:
        line = f"apply, plain torch, same for every engine, batch {batch}: {apply_ms[batch]:.3f} ms"
        if any(e.name == "xgrammar" for e in engines) and (kernel := xgrammar_kernel(batch, args.repeats)):
            line += f"; xgrammar's own CPU kernel: {kernel:.3f} ms"
        print(line)

    big = sorted((r for r in rows if r[1] == batches[-1]), key=lambda r: r[5])
    if len(big) > 1:
        best = big[0]
        others = ", ".join(f"{r[0].name} {r[5]:.3f} ms ({r[5] / best[5]:.1f}x)" for r in big[1:])
        print(f"least grammar work per step at batch {best[1]}: {best[0].name} {best[5]:.3f} ms; {others}")

if __name__ == "__main__":
    main()
