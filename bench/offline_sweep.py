"""One DPO or KTO run on simulated votes, by learning rate: `python -m bench.offline_sweep [--variants ...] [--write]`.

How far does one training run of TRL's DPO or KTO (what each generation of the loop does) move the
policy, and at what KL to the base? The base answers training prompts three times each at the service's
sampling settings; simulated users vote on them as in the loop (bench/users.py: the first two answers
compared, a thumb on the third, with the same noise); each variant trains a fresh adapter from the base
on the same train_window votes, with the service's settings (CHATLOOP_*) except its algorithm and
learning rate; then the base and every adapter answer the held-out prompts (bench.loop_eval). The
learning rate is the knob that decides whether a run learns little, learns, or leaves the KL budget.
"""

import argparse
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.loop_eval import compare_variants, preference_reward
from bench.preferences import load_prompts
from bench.serve import record_section
from bench.users import UserConfig, pick, thumb
from common.models import eos_token_ids
from common.records import Pair, Thumb
from rlhf.data import FeedbackData
from rlhf.modeling import load_base
from rlhf.offline import train_offline
from rlhf.rollout import generate
from service.engine.model import resolve_base_model
from service.settings import Settings
from workers.config import config_from_settings

VARIANTS = {  # name: (algorithm, learning rate)
    "dpo, lr 1e-3 (default)": ("dpo", 1e-3),
    "dpo, lr 2e-3": ("dpo", 2e-3),
    "kto, lr 5e-4": ("kto", 5e-4),
    "kto, lr 1e-3 (default)": ("kto", 1e-3),
    "kto, lr 2e-3": ("kto", 2e-3),
}
ANSWERS_PER_PROMPT = 3  # two compared, one thumbed


def base_answers(
    prompts: list[str], settings: Settings, seed: int
) -> list[tuple[str, list[str], list[float], list[bool]]]:
    """(prompt, answers, preference scores, whether each ended at EOS) of the base, ANSWERS_PER_PROMPT answers per
    prompt."""
    base, tokenizer = load_base(resolve_base_model(settings))
    eos = eos_token_ids(base, tokenizer)
    score = preference_reward("vader", eos)
    users = UserConfig()
    torch.manual_seed(seed)
    out = []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        conversations = [[{"role": "user", "content": p}] for p in chunk for _ in range(ANSWERS_PER_PROMPT)]
        ids, _ = generate(base, tokenizer, conversations, users.temperature, users.max_tokens, eos, "auto")
        texts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        scores = score(conversations, texts, ids).tolist()
        for i, prompt in enumerate(chunk):
            row = slice(i * ANSWERS_PER_PROMPT, (i + 1) * ANSWERS_PER_PROMPT)
            out.append((prompt, texts[row], scores[row], [x[-1] in eos for x in ids[row]]))
        print(f"  base answers: {len(out)}/{len(prompts)} prompts", flush=True)
    return out


def simulated_votes(
    answers: list[tuple], users: UserConfig, limit: int = 0
) -> FeedbackData:
    """The votes the loop's users would give, the first `limit` of them (0: all): per prompt a comparison of
    answers 0 and 1 (a tie says nothing) and a thumb on answer 2."""
    rng = random.Random(users.seed)
    votes: list[Pair | Thumb] = []
    for prompt, texts, scores, *_ in answers:
        messages = [{"role": "user", "content": prompt}]
        preferred = pick(scores[:2], users.noise, rng)
        if preferred != "tie":
            votes.append(Pair(messages, texts[preferred], texts[1 - preferred]))
        votes.append(Thumb(messages, texts[2], thumb(scores[2], users.threshold, users.noise, rng) == "up"))
    votes = votes[:limit] if limit else votes
    return FeedbackData(pairs=[v for v in votes if isinstance(v, Pair)],
                        thumbs=[v for v in votes if isinstance(v, Thumb)])


def training_votes(votes: int, settings: Settings, seed: int) -> tuple[list[tuple], FeedbackData]:
    """The base's answers to shuffled training prompts and the first `votes` simulated votes on them."""
    train = load_prompts(split="train")
    random.Random(seed).shuffle(train)
    # Each prompt gives a comparison and a thumb: enough prompts for the votes, with room for ties.
    answers = base_answers(train[: votes // 2 + 8], settings, seed)
    data = simulated_votes(answers, UserConfig(seed=seed), votes)
    print(f"{len(data.pairs)} comparisons, {len(data.thumbs)} thumbs", flush=True)
    return answers, data


def run_variant(algorithm: str, lr: float, data: FeedbackData, settings: Settings, out: Path) -> float:
    """Train one adapter from the base on the votes and save it to out; returns the training seconds."""
    config = replace(config_from_settings(settings).offline, algorithm=algorithm, lr=lr)
    base, tokenizer = load_base(resolve_base_model(settings))
    started = time.monotonic()

    def progress(step: int, total: int, logs: dict) -> None:
        if "loss" in logs:
            print(f"  step {step}/{total}: loss {logs['loss']:.3f}, {time.monotonic() - started:.0f} s", flush=True)

    train_offline(base, tokenizer, data, config, None, out, progress)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts (2 answers each)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    _, data = training_votes(settings.train_window or 150, settings, args.seed)
    heldout = load_prompts(split="heldout")[: args.eval_prompts]
    table = compare_variants(
        resolve_base_model(settings), args.variants,
        lambda name, out: run_variant(*VARIANTS[name], data, settings, out), heldout, "vader",
    )
    print(table)
    if args.write:
        machine = (f"{args.threads} torch threads; one run from the base on {len(data.pairs)} comparisons and "
                   f"{len(data.thumbs)} thumbs of simulated users (VADER, noise {UserConfig().noise}) on base "
                   f"answers, beta {settings.offline_beta}, batch 8, {settings.offline_epochs} epoch(s), "
                   f"seed {args.seed}; {len(heldout)} held-out prompts x 2 answers, VADER compound; "
                   "± is the standard error of the mean.")
        record_section("One DPO/KTO run by learning rate (bench/offline_sweep.py)", table, machine,
                       "bench.offline_sweep")


if __name__ == "__main__":
    main()
