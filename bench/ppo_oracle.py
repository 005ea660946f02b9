"""PPO against the users' own preference: `python -m bench.ppo_oracle [--variants ...] [--write]`.

How far can one training run of PPO (the default 8 iterations of 16 answers, 4 per prompt) move the
policy when its reward is the simulated users' preference itself (VADER) rather than a reward model
learnt from their votes? That is the most a reward model could give it, so it separates "PPO cannot
learn this in one run" from "the reward model is too weak". Each variant trains a fresh adapter from
the base on the training prompts, then base and adapter answer the held-out prompts (bench.loop_eval:
same seed, 2 answers per prompt) and the table reports the change in mean score, the KL to the base,
the answer length and the time taken. Variants differ in the advantage estimator and in where the KL
penalty goes (rlhf/ppo.py: PPOConfig.critic, PPOConfig.kl_penalty).
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.loop_eval import compare_variants, preference_reward
from bench.preferences import load_prompts
from bench.serve import git_label, write_results
from common.models import eos_token_ids
from rlhf.config import PPOConfig
from rlhf.modeling import load_base
from rlhf.ppo import PPOTrainer
from service.engine.model import resolve_base_model
from service.settings import Settings

# The service's PPO settings (CHATLOOP_PPO_*, rlhf/config.py) except where a variant says otherwise.
BASE = PPOConfig()
VARIANTS = {
    "default": BASE,
    "gae+kl-reward": replace(BASE, critic=True, kl_penalty="reward", group_size=1),
    "rloo+kl-reward": replace(BASE, kl_penalty="reward"),
    "rloo, no kl": replace(BASE, kl_coef=0.0),
    "lr 1e-3": replace(BASE, lr=1e-3),
    "lr 3e-4": replace(BASE, lr=3e-4),
    "lr 1e-4": replace(BASE, lr=1e-4),
    "lr 3e-4, kl 0.2": replace(BASE, lr=3e-4, kl_coef=0.2),
    "lr 3e-4, batch 32": replace(BASE, lr=3e-4, batch_size=32, minibatch_size=16),
}


def run_variant(config: PPOConfig, iterations: int, prompts: list[str], out: Path) -> float:
    """Train one adapter against the preference and save it to out; returns the training seconds."""
    base_path = resolve_base_model(Settings())
    base, tokenizer = load_base(base_path)
    trainer = PPOTrainer(base, tokenizer, preference_reward("vader", eos_token_ids(base, tokenizer)), config)
    started = time.monotonic()

    def progress(i: int, stats: dict) -> None:
        print(f"  iteration {i}/{iterations}: batch score {stats['objective/raw_score']:.3f}, "
              f"KL {stats['objective/kl']:.2f}, {time.monotonic() - started:.0f} s", flush=True)

    trainer.train([[{"role": "user", "content": p}] for p in prompts], iterations, progress)
    trainer.save_adapter(out)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--iterations", type=int, default=8, help="PPO iterations (CHATLOOP_PPO_ITERATIONS)")
    parser.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts (2 answers each)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, heldout = load_prompts(split="train"), load_prompts(split="heldout")[: args.eval_prompts]
    table = compare_variants(
        resolve_base_model(Settings()), args.variants,
        lambda name, out: run_variant(VARIANTS[name], args.iterations, train, out), heldout, "vader",
    )
    print(table)
    if args.write:
        machine = (f"{args.threads} torch threads; {args.iterations} iterations of {BASE.batch_size} answers "
                   f"({BASE.group_size} per prompt), lr {BASE.lr} unless the variant says, seed {BASE.seed}; "
                   f"{len(heldout)} held-out prompts x 2 answers, VADER compound; ± is the standard error of the mean.")
        write_results("PPO against the preference itself (bench/ppo_oracle.py)", table + "\n", machine,
                      " ".join(["python -m bench.ppo_oracle", *sys.argv[1:]]))
        print(f"written ({git_label()})")


if __name__ == "__main__":
    main()
