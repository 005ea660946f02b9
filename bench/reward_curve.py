"""The reward model's learning curve: accuracy and best-of-n against the number of votes.

    python -m bench.reward_curve [--votes 250 500 1000 1500 2000] [--variant default ...] [--write]

Base answers to the train prompts (8 each) are voted on as the loop's simulated users vote (bench/users.py:
half the turns compare two answers, half give a thumb, 10 % of votes flipped), and the service's reward model
(rlhf/reward.py, the default settings unless a variant says otherwise) is trained on the first N votes. Each is
judged on base answers to the held-out prompts (16 each), which no vote ever saw: accuracy on the pairs whose
VADER scores differ by more than 0.2 (95 % bootstrap interval), and best-of-4 / best-of-16 selection by the
reward model next to selection by VADER itself (bench/reward_eval.py). Answers are cached under --data-dir.
"""

import argparse
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch

from bench.loop_eval import markdown_table
from bench.preferences import load_prompts
from bench.reward_eval import AnswerSet, base_answers, report, reward_scores
from bench.serve import git_label, write_results
from bench.users import UserConfig, pick, thumb
from common.records import Pair, Thumb
from rlhf.data import FeedbackData
from rlhf.modeling import load_base
from rlhf.reward import train_reward_model
from service.engine.model import resolve_base_model
from service.settings import Settings
from workers.config import config_from_settings

VARIANTS = {
    "default": {},
    "last layer": {"layers": (1.0,)},
    "embeddings": {"layers": (0.0,)},
    "3 layers": {"layers": (0.27, 0.53, 0.8)},
    "mean+last": {"pooling": "mean+last"},
    "l2 0.03": {"l2": 0.03},
    "l2 1": {"l2": 1.0},
    "no ensemble": {"ensemble": 1},
}


def simulate_votes(answers: AnswerSet, n: int, users: UserConfig) -> FeedbackData:
    """n votes as the loop's users cast them, each on answers no earlier vote used while there are any left."""
    rng = random.Random(users.seed)
    unused = {p: list(range(len(answers.texts[p]))) for p in range(len(answers.prompts))}
    for indexes in unused.values():
        rng.shuffle(indexes)
    pairs, thumbs = [], []
    while len(pairs) + len(thumbs) < n:
        p = rng.randrange(len(answers.prompts))
        compare = rng.random() < users.compare_fraction
        need = 2 if compare else 1
        if len(unused[p]) < need:
            unused[p] = rng.sample(range(len(answers.texts[p])), len(answers.texts[p]))
        chosen = [unused[p].pop() for _ in range(need)]
        prompt, scores = answers.conversations[p], [answers.scores[p, i].item() for i in chosen]
        if compare:
            winner = pick(scores, users.noise, rng)
            if winner != "tie":
                pairs.append(Pair(prompt, answers.texts[p][chosen[winner]], answers.texts[p][chosen[1 - winner]]))
        else:
            up = thumb(scores[0], users.threshold, users.noise, rng) == "up"
            thumbs.append(Thumb(prompt, answers.texts[p][chosen[0]], up))
    return FeedbackData(pairs=pairs, thumbs=thumbs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, nargs="+", default=[250, 500, 1000, 1500, 2000])
    parser.add_argument("--variant", nargs="+", choices=list(VARIANTS), default=["default"])
    parser.add_argument("--train-answers", type=int, default=8, help="base answers per train prompt")
    parser.add_argument("--heldout-answers", type=int, default=16, help="base answers per held-out prompt")
    parser.add_argument("--data-dir", type=Path, default=Settings().data_dir / "bench-reward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    base_path = resolve_base_model(settings)
    users = UserConfig(seed=args.seed)
    train = base_answers(base_path, load_prompts(split="train"), args.train_answers,
                         args.data_dir / "train-answers.jsonl", users.preference)
    heldout = base_answers(base_path, load_prompts(split="heldout"), args.heldout_answers,
                           args.data_dir / "heldout-answers.jsonl", users.preference, seed=args.seed + 1)
    base, tokenizer = load_base(base_path)
    service = config_from_settings(Settings()).reward  # what the service trains
    rows = []
    for name in args.variant:
        config = replace(service, **VARIANTS[name])
        for n in args.votes:
            data = simulate_votes(train, n, users)
            model, metrics = train_reward_model(base, tokenizer, data, config, cache_dir=args.data_dir / "cache")
            result = report(reward_scores(model, base, tokenizer, heldout), heldout)
            acc = result["pair_accuracy"]
            rows.append([
                name, str(n), f"{len(data.pairs)} / {len(data.thumbs)}",
                f"{acc['accuracy']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}]",
                *(f"{result[k]['reward_model']:+.3f} / {result[k]['preference']:+.3f} ({result[k]['captured']:.0%})"
                  for k in ("best_of_4", "best_of_16")),
                f"{metrics['reward/train_seconds']:.0f}",
            ])
            print(" | ".join(rows[-1]), flush=True)
    header = ["variant", "votes", "pairs / thumbs", f"accuracy, pairs > 0.2 apart ({acc['pairs']} pairs)",
              "best of 4: RM / VADER (captured)", "best of 16: RM / VADER (captured)", "train s"]
    table = markdown_table(header, rows)
    print(table)
    if args.write:
        machine = (f"{args.threads} torch threads; base answers at T 0.7, 64 tokens: {args.train_answers} per train "
                   f"prompt ({len(train.prompts)}), {args.heldout_answers} per held-out prompt "
                   f"({len(heldout.prompts)}); simulated users' votes (VADER, noise {users.noise}, seed {args.seed}).")
        write_results("Reward model against the number of votes (bench/reward_curve.py)", table + "\n", machine,
                      " ".join(["python -m bench.reward_curve", *sys.argv[1:]]))
        print(f"written ({git_label()})")


if __name__ == "__main__":
    main()
