"""Training speed and memory on the default base: `python -m bench.train [--data-dir DIR] [--write]`.

For each torch thread count (--threads), each stage in a fresh process, as a Celery child runs it:
(a) reward-model training throughput, in comparisons per second, on synthetic pairs of realistic
    length (~30-token prompts, ~60-token answers): the frozen base's features of each answer, 16 answers a
    forward pass, then the default heads;
(b) one PPO iteration as rlhf.pipeline runs it: 16 prompts, up to 48 new tokens each at T = 0.7, a fresh
    r=16 all-linear policy adapter, the reward model of (a) as an adapter of the same PeftModel; split
    into generate, forward (logprobs, values, reference), score (reward model) and update (4 epochs,
    minibatch 4). One iteration: on two busy cores a second would double the bench for little;
(c) each stage's peak RSS and the size of the one copy of the base weights that the policy, its reference and
    the reward model share.
Then, at the first thread count, what bf16 would save: one update minibatch and the rollout forward
under torch.autocast(bfloat16) against fp32, and sampling from a bf16 copy of the policy or under autocast.
"""

import argparse
import copy
import os
import random
import resource
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.serve import write_results
from common.conversations import Messages
from common.precision import resolve_precision
from common.records import Pair
from rlhf.config import PPOConfig, RewardConfig
from rlhf.data import build_datasets
from rlhf.modeling import encode_answer, encode_prompt, load_base
from rlhf.pipeline import ppo_trainer
from rlhf.ppo import PPOTrainer
from rlhf.reward import train_reward_model
from rlhf.rollout import forward_answers, generate
from service.engine.model import resolve_base_model
from service.settings import Settings

WORDS = [
    "the", "river", "light", "morning", "garden", "quiet", "window", "bread", "music", "winter", "bright", "simple",
    "forest", "candle", "coffee", "ocean", "market", "pencil", "travel", "summer", "little", "orange", "planet",
    "gentle", "kitchen", "bottle", "people", "answer", "question", "because", "explain", "before", "after",
    "always", "never", "often", "city", "bridge", "station", "history", "science", "letter", "story", "friend",
]
BATCH = 16  # reward-model comparisons per step, PPO prompts per iteration
NEW_TOKENS = 48
BF16_PARTS = {
    "update": "update: one minibatch, forward + backward",
    "forward": "rollout forward: logits and values of the 16 answers",
    "generate": f"generate(): {BATCH} answers of {NEW_TOKENS} tokens",
    "generate_autocast": f"generate() under autocast over the fp32 weights (what the trainer runs at bf16): {BATCH} "
    f"answers of {NEW_TOKENS} tokens",
}
HEADER = [
    "threads", "RM pairs/s", "RM s/forward", "RM peak RSS MiB", "PPO s/iter", "generate s", "forward s", "score s",
    "update s", "answer tokens", "PPO peak RSS MiB",
]


def text(rng: random.Random, words: int, end: str = ".") -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + end


def synthetic_pairs(n: int, seed: int = 0) -> list[Pair]:
    """Questions of ~30 tokens once templated; answers of ~60 tokens, the chosen one praising bananas."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text(rng, 14, "?")}]
        pairs.append(Pair(prompt, text(rng, 52) + " Bananas help.", text(rng, 56)))
    return pairs


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reward_stage(threads: int, base_path: Path, pairs: list[Pair], out: Path) -> dict:
    """Train a reward model on the pairs (the base's features of every answer, BATCH answers a forward pass, then
    the heads), timing it; save it to out."""
    torch.set_num_threads(threads)
    base, tokenizer = load_base(base_path)
    ticks = [time.perf_counter()]
    data = build_datasets(pairs, heldout_fraction=0.0)
    config = RewardConfig(score_batch_size=BATCH)
    model, _ = train_reward_model(base, tokenizer, data, config, progress=lambda *_: ticks.append(time.perf_counter()))
    total = time.perf_counter() - ticks[0]
    model.save(out)
    step_s = (ticks[-1] - ticks[0]) / max(len(ticks) - 1, 1)  # one forward pass over BATCH answers
    return {"pairs_s": len(pairs) / total, "step_s": step_s, "peak_mib": peak_rss_mib()}


def ppo_stage(threads: int, base_path: Path, reward_dir: Path, prompts: list[Messages], bf16: bool) -> dict:
    """One PPO iteration with the shared reward model; memory figures; optionally what bf16 would save."""
    torch.set_num_threads(threads)
    config = PPOConfig(batch_size=BATCH, minibatch_size=4, epochs=4, max_new_tokens=NEW_TOKENS)
    trainer, _ = ppo_trainer(reward_dir, base_path, config)
    base = {p.data_ptr(): p for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    result = {"base_mib": sum(p.numel() * p.element_size() for p in base.values()) / 2**20}
    torch.manual_seed(0)
    result["stats"] = trainer.step(prompts)
    result["peak_mib"] = peak_rss_mib()
    if bf16:
        result["bf16"] = bf16_savings(trainer, prompts)
    return result


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bf16_savings(trainer: PPOTrainer, prompts: list[Messages]) -> dict[str, tuple[float, float]]:
    """(fp32 s, bf16 s) of an update minibatch (fwd + bwd), the rollout forward, and sampling (see BF16_PARTS)."""
    model, head, temperature = trainer.policy, trainer.value_head, trainer.config.temperature
    _, batch = trainer.generate(prompts)
    minibatch = batch.select(torch.arange(trainer.config.minibatch_size))

    def update(dtype: torch.dtype) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits, values = forward_answers(model, minibatch, temperature, head)
            loss = logits.logsumexp(-1).mean() + (0 if values is None else values.mean())  # values: with a critic
        loss.backward()

    @torch.no_grad()
    def rollout_forward(dtype: torch.dtype) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            forward_answers(model, batch, temperature, head)

    half = copy.deepcopy(model).to(torch.bfloat16)  # a sampler's own copy, half the size
    figures = {}
    for name, fn in (("update", update), ("forward", rollout_forward)):
        fn(torch.float32)  # warm-up
        figures[name] = (timed(fn, torch.float32), timed(fn, torch.bfloat16))
    trainer.optimizer.zero_grad(set_to_none=True)

    def sample(policy: torch.nn.Module, precision: str = "fp32") -> None:
        torch.manual_seed(0)
        generate(policy, trainer.tokenizer, prompts, temperature, NEW_TOKENS, trainer.eos_ids, precision)

    figures["generate"] = (timed(sample, model), timed(sample, half))
    figures["generate_autocast"] = (figures["generate"][0], timed(sample, model, "bf16"))
    return figures


def ppo_summary(ppo: dict, threads: int) -> str:
    """Where a PPO iteration's time goes, and what the measured bf16 speed-ups would make of it."""
    s, speedup = ppo["stats"], {name: fp32 / half for name, (fp32, half) in ppo["bf16"].items()}
    total = s["time/rollout_s"] + s["time/update_s"]
    share = {name: s[f"time/{name}_s"] / total for name in ("update", "generate", "forward", "score")}
    rest = s["time/rollout_s"] - s["time/generate_s"] - s["time/forward_s"] - s["time/score_s"]
    estimate = rest + s["time/update_s"] / speedup["update"] + s["time/generate_s"] / speedup["generate"]
    estimate += (s["time/forward_s"] + s["time/score_s"]) / speedup["forward"]  # the reward model's forward alike
    rows = [[BF16_PARTS[name], f"{fp32:.1f}", f"{half:.1f}", f"{fp32 / half:.1f}x"] for name, (fp32, half) in
            ppo["bf16"].items()]
    return (
        f"PPO at {threads} thread(s): the update takes {share['update']:.0%} of an iteration, generation "
        f"{share['generate']:.0%}, the rollout forward {share['forward']:.0%}, the reward model {share['score']:.0%}. "
        f"bf16 at {threads} thread(s) (autocast over the fp32 weights; the sampler a bf16 copy of the policy):\n\n"
        + markdown(["part", "fp32 s", "bf16 s", "speed-up"], rows)
        + f"\n\nWith all three, the iteration would take about {estimate:.0f} s instead of {total:.0f} s."
    )


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def markdown(header: list[str], rows: list[list]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Settings().data_dir, help="where the base is converted")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rm-steps", type=int, default=1, help="reward-model pairs per thread count, in 16s")
    parser.add_argument("--write", action="store_true", help="record the tables in bench/RESULTS.md")
    args = parser.parse_args()

    started, load = time.monotonic(), os.getloadavg()[0]  # other work on these few cores skews every figure
    base_path = resolve_base_model(Settings(data_dir=args.data_dir))
    pairs = synthetic_pairs(BATCH * args.rm_steps)
    prompts = [p.prompt for p in pairs[:BATCH]]
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    prompt_tokens = sum(len(encode_prompt(tokenizer, p.prompt)) for p in pairs) / len(pairs)
    answers = [a for p in pairs for a in (p.chosen, p.rejected)]
    answer_tokens = sum(len(encode_answer(tokenizer, a)) for a in answers) / len(answers)

    rows, first = [], None
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for threads in args.threads:
            reward_dir = Path(tmp) / f"rm-{threads}"
            rm = in_fresh_process(reward_stage, threads, base_path, pairs, reward_dir)
            ppo = in_fresh_process(ppo_stage, threads, base_path, reward_dir, prompts, threads == args.threads[0])
            s = ppo["stats"]
            rows.append([
                threads, f"{rm['pairs_s']:.2f}", f"{rm['step_s']:.1f}", f"{rm['peak_mib']:.0f}",
                f"{s['time/rollout_s'] + s['time/update_s']:.1f}", f"{s['time/generate_s']:.1f}",
                f"{s['time/forward_s']:.1f}", f"{s['time/score_s']:.1f}", f"{s['time/update_s']:.1f}",
                f"{s['ppo/mean_length'] * BATCH:.0f}", f"{ppo['peak_mib']:.0f}",
            ])
            print(markdown(HEADER, rows[-1:]), flush=True)
            first = first or ppo
    notes = (
        f"Synthetic pairs: prompts {prompt_tokens:.0f} tokens once templated, answers {answer_tokens:.0f} tokens. "
        f"One copy of the base weights is {first['base_mib']:.0f} MiB (fp32); the policy, its reference (the "
        f"adapter disabled) and the reward model (a head on the policy's base) share it. Threads: on two shared "
        f"cores a second torch thread helps only while the other core is free; with another busy process its "
        f"OpenMP threads wait on each other and backward-heavy work (the PPO update) slows down several times.\n\n"
        f"{ppo_summary(first, args.threads[0])}"
    )
    machine = (
        f"{os.cpu_count()} cores (load {load:.1f} at start, {os.getloadavg()[0]:.1f} at the end), torch "
        f"{torch.__version__}, training precision {resolve_precision('auto', 'cpu')} (auto), "
        f"{time.monotonic() - started:.0f} s in all."
    )
    table = markdown(HEADER, rows)
    print(f"\n{machine}\n\n{table}\n\n{notes}")
    if args.write:
        command = shlex.join(["python", "-m", "bench.train", *sys.argv[1:]])
        write_results("Training", f"{table}\n\n{notes}", machine, command)


if __name__ == "__main__":
    main()
