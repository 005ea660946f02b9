"""PPO's served iteration against DPO on the same votes: `python -m bench.served_sweep [--variants ...] [--write]`.

In the learning benchmark DPO, trained on its users' comparisons, moves further and gains more per nat than PPO,
whose first iteration trains on the very same verdicts: the answers production served, each rewarded +1 or -1
by its user's vote (rlhf/ppo.py, PPOTrainer.step_served). This isolates that step. The base answers training
prompts three times each at the service's sampling settings (the served answers); simulated users vote on them as
in the loop (bench/offline_sweep.py: the first two compared, a thumb on the third); then each variant trains a
fresh adapter from the base on the same records, with the service's settings (CHATLOOP_*) except what the variant
names: DPO on their comparisons, PPO's served iteration on both answers of each comparison (and, with
served_thumbs, each thumbed answer). The base and every adapter answer
all held-out prompts with the same seeds (bench.loop_eval), so each gain is a paired difference.
"""

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.loop_eval import compare_variants
from bench.offline_sweep import training_votes
from bench.preferences import load_prompts
from bench.serve import record_section
from bench.users import UserConfig
from rlhf.data import FeedbackData, Served
from rlhf.modeling import load_base
from rlhf.offline import train_offline
from rlhf.ppo import PPOTrainer
from service.engine.model import resolve_base_model
from service.settings import Settings
from workers.config import config_from_settings

# The clipped served step (PPO's step on a fresh batch, the default before "contrast") and what was tried on it
CLIPPED = {"served_step": "clipped"}
# DPO's optimiser steps with PPO's objective, taken by the clipped step's knobs: a pair's two answers in one step,
# 8 pairs a step, one pass, no ratio clip and no KL term, so that what is left between them is the loss itself
# (served_step "contrast" is this shape, with a stop at max_kl)
ONE_GROUPED_PASS = CLIPPED | {"minibatch_groups": True, "minibatch_size": 16, "epochs": 1}
DPO_STEPS = ONE_GROUPED_PASS | {"cliprange": 10.0, "kl_coef": 0.0}
# name: (algorithm, changes to the service's settings for it)
VARIANTS: dict[str, tuple[str, dict]] = {
    "dpo (default)": ("dpo", {}),
    "ppo served (default)": ("ppo", {}),
    "ppo served, contrast without its stop": ("ppo", {"max_kl": 0.0}),
    # the contrast's steps on 4x the comparisons each (32, not 8): the stop comes after a few steps whatever the
    # number of votes, so the step's noise, not the data, may be what the KL budget is spent on
    "ppo served, 32 comparisons a step": ("ppo", {"minibatch_size": 32}),
    "ppo served, clipped": ("ppo", CLIPPED),
    "ppo served, groups in one minibatch": ("ppo", CLIPPED | {"minibatch_groups": True}),
    "ppo served, 4 epochs": ("ppo", CLIPPED | {"epochs": 4}),
    "ppo served, lr 2e-3": ("ppo", CLIPPED | {"lr": 2e-3}),
    "ppo served, 1 epoch": ("ppo", CLIPPED | {"epochs": 1}),
    "ppo served, no KL term": ("ppo", CLIPPED | {"kl_coef": 0.0}),
    "ppo served, no clip (cliprange 10)": ("ppo", CLIPPED | {"cliprange": 10.0}),
    "ppo served, KL weight at most 2": ("ppo", CLIPPED | {"kl_max_weight": 2.0}),
    "ppo served, lr 2e-3, KL weight at most 2": ("ppo", CLIPPED | {"lr": 2e-3, "kl_max_weight": 2.0}),
    "ppo served, DPO's steps": ("ppo", DPO_STEPS),
    "ppo served, DPO's steps, clip and KL term": ("ppo", ONE_GROUPED_PASS),
    "ppo served, DPO's steps, temperature 1": ("ppo", DPO_STEPS | {"temperature": 1.0}),
    # beta 0.01: sigmoid(-beta * margin) stays near 1/2, so DPO's step is the plain contrast of the pair's two
    # log-likelihoods (what PPO's loss is on a pair) and nothing else changes
    "dpo, beta 0.01": ("dpo", {"beta": 0.01}),
    "ppo served, thumbs too": ("ppo", CLIPPED | {"served_thumbs": True}),
    "ppo served, thumbs too, groups in one minibatch": ("ppo", CLIPPED | {"served_thumbs": True,
                                                                          "minibatch_groups": True}),
    "ppo served, thumbs too, 4 epochs": ("ppo", CLIPPED | {"served_thumbs": True, "epochs": 4}),
    "ppo served, thumbs too, groups, 4 epochs": ("ppo", CLIPPED | {"served_thumbs": True, "minibatch_groups": True,
                                                                   "epochs": 4}),
}


def served_answers(data: FeedbackData, ended: dict[str, bool], thumbs: bool = True) -> list[Served]:
    """Every voted answer as the PPO trainer takes served ones: both sides of each comparison (+1 chosen, -1
    rejected) and, with thumbs, each thumbed answer (+1 up, -1 down). ended: answer text -> it stopped at EOS."""
    out = [Served(p.prompt, text, ended[text], vote)
           for p in data.pairs for text, vote in ((p.chosen, 1.0), (p.rejected, -1.0))]
    if thumbs:
        out += [Served(t.prompt, t.answer, ended[t.answer], 1.0 if t.label else -1.0) for t in data.thumbs]
    return out


def run_variant(
    name: str, data: FeedbackData, ended: dict[str, bool], settings: Settings, out: Path, seed: int | None = None
) -> float:
    """Train one adapter from the base on the votes and save it to out; returns the training seconds. seed: the
    training seed (the adapter's initialisation, the minibatch order), if not the service's."""
    algorithm, changes = VARIANTS[name]
    if seed is not None:
        changes = changes | {"seed": seed}
    config = config_from_settings(settings)
    base, tokenizer = load_base(resolve_base_model(settings))
    started = time.monotonic()
    if algorithm == "ppo":
        ppo = replace(config.ppo, **changes)
        served = served_answers(data, ended, ppo.served_thumbs)
        trainer = PPOTrainer(base, tokenizer, None, ppo)
        [stats] = trainer.train(data.prompts, 1, served=served)
        print(f"  {len(served)} served answers: update {stats['time/update_s']:.0f} s, approx KL to pi_old "
              f"{stats['ppo/policy/approx_kl']:.3f}, clipped {stats['ppo/policy/clipfrac']:.2f}, KL term "
              f"{stats.get('ppo/loss/kl', math.nan):.3f}", flush=True)
        trainer.save_adapter(out)
    else:
        offline = replace(config.offline, algorithm=algorithm, **changes)
        train_offline(base, tokenizer, data, offline, None, out)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--votes", type=int, default=150, help="records (comparisons and thumbs) to train on; "
                        "150 is DPO's window (CHATLOOP_OFFLINE_WINDOW)")
    parser.add_argument("--samples", type=int, default=5, help="answers per held-out prompt and policy")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="draws the training votes")
    parser.add_argument("--train-seeds", type=int, nargs="+", help="train each variant once per training seed (the "
                        "adapter's initialisation and the minibatch order) and add a table of each variant's mean "
                        "over them; default: once, at the service's seed")
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    answers, data = training_votes(args.votes, settings, args.seed)
    ended = {text: stop for _, texts, _, stops in answers for text, stop in zip(texts, stops, strict=True)}
    heldout = load_prompts(split="heldout")
    runs = {name: (name, None) for name in args.variants}
    if args.train_seeds:
        runs = {f"{name}, training seed {k}": (name, k) for name in args.variants for k in args.train_seeds}
    table = compare_variants(
        resolve_base_model(settings), list(runs),
        lambda run, out: run_variant(runs[run][0], data, ended, settings, out, runs[run][1]), heldout, "vader",
        args.samples, {run: name for run, (name, _) in runs.items()} if args.train_seeds else None,
    )
    print(table)
    if args.write:
        machine = (f"{args.threads} torch threads; one run from the base on {len(data.pairs)} comparisons and "
                   f"{len(data.thumbs)} thumbs of simulated users (VADER, noise {UserConfig().noise}) on base "
                   f"answers, the service's settings otherwise, seed {args.seed}; {len(heldout)} held-out prompts x "
                   f"{args.samples} answers, VADER compound; the score's ± is its standard error, the gain's that "
                   "of the paired difference.")
        record_section("PPO's served iteration against DPO on the same votes (bench/served_sweep.py)", table, machine,
                       "bench.served_sweep")


if __name__ == "__main__":
    main()
