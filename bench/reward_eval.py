"""The reward model judged against the preference it stands for, in the units that matter.

A fixed set of base answers (K per prompt, at the service's sampling settings, cached as JSONL) is scored by the
simulated users' preference and by a reward model. Reported: the reward model's accuracy on pairs of answers to
one prompt whose true scores differ by more than `min_gap` (with a 95 % bootstrap interval), and best-of-n
selection by the reward model next to best-of-n by the preference itself: the gain over the mean answer that
picking the best of n samples buys, the attainable frontier of what a policy can gain for log n - (n-1)/n nats
of KL. Their ratio says how much of the attainable gain the reward model captures.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.loop_eval import preference_reward
from common.models import eos_token_ids
from rlhf.modeling import load_base
from rlhf.reward import RewardModel, accuracy, accuracy_interval
from rlhf.rollout import generate


@dataclass
class AnswerSet:
    prompts: list[str]
    texts: list[list[str]]  # (P, K)
    finish: list[list[str]]  # "stop" or "length"
    scores: torch.Tensor  # (P, K) the preference's

    @property
    def conversations(self) -> list[list[dict]]:
        return [[{"role": "user", "content": p}] for p in self.prompts]


def base_answers(base_path: Path, prompts: list[str], per_prompt: int, cache: Path, preference: str,
                 temperature: float = 0.7, max_tokens: int = 64, seed: int = 0) -> AnswerSet:
    """per_prompt answers of the base to each prompt, from the cache (one JSON line per prompt) where it has them;
    the missing ones are generated and appended, so an interrupted run resumes."""
    done = {}
    if cache.exists():
        done = {row["prompt"]: row for row in map(json.loads, cache.read_text().splitlines())}
    todo = [p for p in prompts if p not in done or len(done[p]["answers"]) < per_prompt]
    if todo:
        base, tokenizer = load_base(base_path)
        eos = eos_token_ids(base, tokenizer)
        score = preference_reward(preference, eos)
        torch.manual_seed(seed)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("a") as f:
            for start in range(0, len(todo), 4):
                chunk = todo[start : start + 4]
                conversations = [[{"role": "user", "content": p}] for p in chunk for _ in range(per_prompt)]
                ids, _ = generate(base, tokenizer, conversations, temperature, max_tokens, eos, "auto")
                texts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
                scores = score(conversations, texts, ids).tolist()
                for i, prompt in enumerate(chunk):
                    rows = slice(i * per_prompt, (i + 1) * per_prompt)
                    done[prompt] = {"prompt": prompt, "answers": texts[rows], "scores": scores[rows],
                                    "finish": ["stop" if x and x[-1] in eos else "length" for x in ids[rows]]}
                    f.write(json.dumps(done[prompt]) + "\n")
                    f.flush()
                print(f"  base answers: {start + len(chunk)}/{len(todo)} prompts", flush=True)
    rows = [done[p] for p in prompts]
    return AnswerSet(
        prompts=list(prompts), texts=[r["answers"][:per_prompt] for r in rows],
        finish=[r["finish"][:per_prompt] for r in rows],
        scores=torch.tensor([r["scores"][:per_prompt] for r in rows], dtype=torch.float32),
    )


def reward_scores(model: RewardModel, base: torch.nn.Module, tokenizer, answers: AnswerSet) -> torch.Tensor:
    """The reward model's raw score of every answer. (P, K)"""
    k = len(answers.texts[0])
    prompts = [c for c in answers.conversations for _ in range(k)]
    texts = [t for row in answers.texts for t in row]
    ended = [f == "stop" for row in answers.finish for f in row]
    return model.raw(model.features(base, tokenizer, prompts, texts, ended)).reshape(len(answers.prompts), k)


def pair_accuracy(predicted: torch.Tensor, true: torch.Tensor, min_gap: float = 0.2,
                  bootstrap: int = 1000) -> dict[str, float]:
    """Accuracy of `predicted` on every within-prompt pair whose true scores differ by more than min_gap."""
    i, j = torch.triu_indices(true.shape[1], true.shape[1], offset=1)
    gap = true[:, i] - true[:, j]  # (P, pairs)
    keep = gap.abs() > min_gap
    margins = ((predicted[:, i] - predicted[:, j]) * gap.sign())[keep]
    low, high = accuracy_interval(margins, bootstrap)
    return {"accuracy": accuracy(margins), "low": low, "high": high, "pairs": int(keep.sum())}


def best_of_n(selector: torch.Tensor, true: torch.Tensor, n: int) -> float:
    """Mean true-score gain over the mean answer of picking, in each disjoint group of n answers to a prompt, the
    one `selector` ranks highest."""
    groups = true.shape[1] // n
    sel = selector[:, : groups * n].reshape(-1, groups, n)
    tru = true[:, : groups * n].reshape(-1, groups, n)
    picked = tru.gather(-1, sel.argmax(-1, keepdim=True)).squeeze(-1)  # (P, groups)
    return (picked - tru.mean(-1)).mean().item()


def report(predicted: torch.Tensor, answers: AnswerSet, ns: tuple[int, ...] = (2, 4, 16)) -> dict:
    """Pair accuracy and best-of-n with the reward model beside best-of-n with the preference."""
    true = answers.scores
    out = {"pair_accuracy": pair_accuracy(predicted, true)}
    for n in ns:
        if n <= true.shape[1]:
            rm, oracle = best_of_n(predicted, true, n), best_of_n(true, true, n)
            out[f"best_of_{n}"] = {"reward_model": rm, "preference": oracle, "captured": rm / oracle if oracle else 0}
    return out
