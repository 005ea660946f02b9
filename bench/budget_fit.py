"""A PPO run from a production policy near the KL budget's edge, with and without pulling it back within the
budget: `python -m bench.budget_fit [--votes N] [--seeds ...] [--write]`.

In the learning benchmark, runs from a production policy 10.5-11.8 nats from the reference took one contrast step
on served answers that moved the policy 10-15 nats further, and the gate refused both candidates for their KL
(bench/RESULTS.md): one step at lr 1e-3 can cross the whole 12-nat budget. rlhf.kl_budget.fit_budget pulls a
run that ends past the budget back along its own step. Here, per seed: the base answers training prompts, the
simulated users vote (bench/offline_sweep.py), production is trained from the base on the first half of the
comparisons with the service's settings (PPO's served iteration, the gate's budget as its limit), and a candidate
is trained from production on the second half twice: with the pull-back switched off (CHATLOOP_PPO_BUDGET_TRIALS
0) and with the service's default. The second half's answers are the base's, so they count as another version's
(the start's own distance is measured on fresh samples). The base and every adapter answer the held-out prompts
with the same seeds (bench.loop_eval), so each gain is a paired difference, and each adapter's KL is measured as
the gate measures it, on its own answers.
"""

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.loop_eval import compare_variants, markdown_table
from bench.offline_sweep import training_votes
from bench.preferences import load_prompts
from bench.serve import record_section
from bench.served_sweep import served_answers
from bench.users import UserConfig
from rlhf.data import FeedbackData
from rlhf.modeling import load_base
from rlhf.ppo import PPOTrainer
from service.engine.model import resolve_base_model
from service.settings import Settings
from workers.config import config_from_settings

PRODUCTION = "production (from the base, first half)"
UNFITTED = "candidate from production, not pulled back"
FITTED = "candidate from production (default: pulled back)"
FIT_HEADER = ["run", "start KL", "steps", "end KL (its own measure)", "f", "measures after the first", "train s"]


def _measure(stats: dict[str, float]) -> str:
    return f"{stats['ppo/budget_kl']:.1f} ± {stats['ppo/budget_kl_se']:.1f}" if "ppo/budget_kl" in stats else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, default=400, help="records (comparisons and thumbs) per seed; "
                        "production trains on the first half of the comparisons, the candidates on the rest")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="draws the votes and trains")
    parser.add_argument("--samples", type=int, default=3, help="answers per held-out prompt and policy")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--write", action="store_true", help="record the tables in bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    config = config_from_settings(settings)
    base_path = resolve_base_model(settings)
    kl_limit = config.gate.max_kl
    votes = {}
    for seed in args.seeds:
        answers, data = training_votes(args.votes, settings, seed)
        ended = {text: stop for _, texts, _, stops in answers for text, stop in zip(texts, stops, strict=True)}
        half = len(data.pairs) // 2
        first = served_answers(FeedbackData(pairs=data.pairs[:half]), ended, thumbs=False)
        second = served_answers(FeedbackData(pairs=data.pairs[half:]), ended, thumbs=False)
        votes[seed] = (data.prompts, first, [s._replace(on_policy=False) for s in second])
    runs = {f"seed {seed}: {name}": (seed, name) for seed in args.seeds for name in (PRODUCTION, UNFITTED, FITTED)}
    productions: dict[int, Path] = {}
    fits: list[list[str]] = []

    def train(run: str, out: Path) -> float:
        seed, name = runs[run]
        prompts, first, second = votes[seed]
        ppo = replace(config.ppo, seed=seed, budget_trials=0 if name == UNFITTED else config.ppo.budget_trials)
        base, tokenizer = load_base(base_path)
        started = time.monotonic()
        trainer = PPOTrainer(base, tokenizer, None, ppo, None if name == PRODUCTION else productions[seed])
        [stats] = trainer.train(prompts, 1, served=first if name == PRODUCTION else second, kl_limit=kl_limit,
                                budget_prompts=config.eval.prompts)
        seconds = time.monotonic() - started
        trainer.save_adapter(out)
        if name == PRODUCTION:
            productions[seed] = out
        fits.append([run, f"{stats['ppo/start_kl']:.1f}", f"{stats['ppo/steps']:.0f}",
                     _measure(stats), f"{stats.get('ppo/budget_scale', 1.0):.2f}",
                     f"{stats.get('ppo/budget_trials', 0.0):.0f}", f"{seconds:.0f}"])
        print(f"  {fits[-1]}", flush=True)
        return seconds

    heldout = load_prompts(split="heldout")
    table = compare_variants(base_path, list(runs), train, heldout, "vader", args.samples,
                             {run: name for run, (_, name) in runs.items()})
    table += ("\n\nEach run's own measures (nats per answer to the reference on its own answers: the start's on 256 "
              "served answers or one fresh answer to each of 32 served prompts, the end's on one fresh answer to each "
              "of 32 prompts ± its standard error; a run not pulled back is not measured at its end):\n\n"
              + markdown_table(FIT_HEADER, fits))
    print(table)
    if args.write:
        machine = (f"{args.threads} torch threads; per seed, {args.votes} votes of simulated users (VADER, noise "
                   f"{UserConfig().noise}) on base answers; production trained from the base on the first half of "
                   f"the comparisons, each candidate from production on the second half, PPO's served iteration "
                   f"with the service's settings and the gate's budget ({kl_limit:g} nats) as its limit; "
                   f"{len(heldout)} held-out prompts x {args.samples} answers, VADER compound; the score's ± is its "
                   "standard error, the gain's that of the paired difference.")
        record_section("A run near the KL budget's edge, pulled back or not (bench/budget_fit.py)", table, machine,
                       "bench.budget_fit")


if __name__ == "__main__":
    main()
