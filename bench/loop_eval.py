"""Held-out evaluation of the policies a learning run promoted, scored by the simulated users' preference.

Every policy (the base and each promoted adapter, all on one copy of the base weights) answers the same
held-out prompts, which no simulated user ever sent, with the same seed, at the service's sampling
settings. Reported per policy: mean preference score (for "vader", the mean VADER compound), KL to the
base (k1, nats per answer, on the policy's own samples), mean answer length in tokens and the fraction
of answers that end with EOS rather than at the length limit.
"""

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import fmean, stdev

import torch
from peft import PeftModel, get_peft_model

from bench.preferences import get_preference
from common.models import eos_token_ids
from rlhf.config import EvalConfig, LoraSettings
from rlhf.evaluate import answer_policy
from rlhf.modeling import load_base, peft_config
from rlhf.rollout import RewardFn

log = logging.getLogger(__name__)


def preference_reward(name: str, eos_ids: set[int]) -> RewardFn:
    """The users' preference as a reward function: answers that stopped at EOS finished with "stop"."""
    preference = get_preference(name)

    def score(prompts: list, texts: list[str], ids: list[list[int]]) -> torch.Tensor:
        reasons = ["stop" if answer and answer[-1] in eos_ids else "length" for answer in ids]
        return torch.tensor([preference(t, r) for t, r in zip(texts, reasons, strict=True)])

    return score


def load_policies(base_path: Path, adapters: dict[str, Path]) -> tuple[PeftModel, object]:
    """One PeftModel holding every adapter under its version name; with none, a zero LoRA (= the base)."""
    base, tokenizer = load_base(base_path)
    if not adapters:
        return get_peft_model(base, peft_config(LoraSettings())).eval(), tokenizer
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval(), tokenizer


def evaluate_policies(
    base_path: Path, adapters: dict[str, Path], prompts: list[str], preference: str, samples: int = 2,
    config: EvalConfig | None = None,
) -> dict[str, dict[str, float]]:
    """{"base": metrics, version: metrics, ...}: score, kl, length, eos (means) and n (answers)."""
    config = config or EvalConfig()
    model, tokenizer = load_policies(base_path, adapters)
    reward = preference_reward(preference, eos_token_ids(model, tokenizer))
    conversations = [[{"role": "user", "content": p}] for p in prompts for _ in range(samples)]
    results = {}
    for name in [None, *adapters]:
        started = time.monotonic()
        log.info("evaluating %s: %d answers", name or "base", len(conversations))
        stats = answer_policy(model, name, tokenizer, conversations, reward, config)
        log.info("evaluated %s in %.0f s: score %.3f", name or "base", time.monotonic() - started,
                 stats["score"].mean().item())
        results[name or "base"] = {
            "scores": [round(x, 4) for x in stats["score"].tolist()],  # answer j of prompt i at i * samples + j
            "score": stats["score"].mean().item(),
            "score_se": (stats["score"].std() / len(stats["score"]) ** 0.5).item(),
            "kl": stats["kl"].mean().item(),
            "length": stats["length"].mean().item(),
            "eos": stats["eos"].mean().item(),
            "n": len(stats["score"]),
        }
    return results


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean of a - b, its standard error) over answers paired by prompt and sample: both policies answered the
    same prompts with the same seeds, so what the prompt decides cancels."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired scores need two equal-length lists of at least 2, not {len(a)} and {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return d.mean().item(), (d.std() / len(d) ** 0.5).item()


VARIANT_HEADER = ["variant", "held-out score", "gain over base (paired)", "KL to base", "length", "train s"]


def compare_variants(
    base_path: Path, names: list[str], train: Callable[[str, Path], float], prompts: list[str], preference: str,
    samples: int = 2, seeds: dict[str, str] | None = None,
) -> str:
    """Train each variant from the base (train(name, out_dir) saves its adapter and returns the seconds it
    took) into a scratch directory, evaluate the base and every adapter on the held-out prompts, and return
    a markdown table: score ± its standard error, gain over the base (the paired difference ± its standard error),
    KL, length, training time.

    seeds: run name -> the variant it is one training seed of. Then a second table follows with each variant's mean
    over its seeds: a gain's standard error above counts only the evaluation's sampling noise, and one training
    run of a variant can differ from another seed's by more than that (bench/RESULTS.md, the served sweep)."""
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        adapters, seconds = {}, {}
        for i, name in enumerate(names):
            print(f"{name}: training", flush=True)
            adapters[f"v{i}"] = Path(tmp) / f"adapter-{i}"  # adapter names become module names: no dots
            seconds[name] = train(name, adapters[f"v{i}"])
        print("evaluating on held-out prompts", flush=True)
        results = evaluate_policies(base_path, adapters, prompts, preference, samples)
    base = results["base"]
    rows = [["base", f"{base['score']:.3f} ± {base['score_se']:.3f}", "", "0", f"{base['length']:.1f}", ""]]
    gains: dict[str, tuple[float, float]] = {}  # run name -> (gain, KL)
    for i, name in enumerate(names):
        r = results[f"v{i}"]
        gain, gain_se = paired_difference(r["scores"], base["scores"])
        gains[name] = gain, r["kl"]
        rows.append([name, f"{r['score']:.3f} ± {r['score_se']:.3f}", f"{gain:+.3f} ± {gain_se:.3f}",
                     f"{r['kl']:.1f}", f"{r['length']:.1f}", f"{seconds[name]:.0f}"])
    table = markdown_table(VARIANT_HEADER, rows)
    return table if not seeds else table + "\n\n" + seed_summary(gains, seeds)


SEED_HEADER = ["variant", "training runs", "gain by run", "mean gain ± its standard error", "spread (sd)",
               "mean KL"]


def seed_summary(gains: dict[str, tuple[float, float]], seeds: dict[str, str]) -> str:
    """Per variant, over its training runs (gains: run name -> (gain, KL); seeds: run name -> variant): the gains,
    their mean with the standard error of that mean (sd / sqrt(runs), which holds training and evaluation noise
    alike; "–" for a single run), their standard deviation and the mean KL."""
    by_variant: dict[str, list[tuple[float, float]]] = {}
    for run, variant in seeds.items():
        by_variant.setdefault(variant, []).append(gains[run])
    rows = []
    for variant, runs in by_variant.items():
        g = [gain for gain, _ in runs]
        sd = stdev(g) if len(g) > 1 else None
        rows.append([variant, str(len(g)), ", ".join(f"{x:+.3f}" for x in g),
                     f"{fmean(g):+.3f} ± " + ("–" if sd is None else f"{sd / len(g) ** 0.5:.3f}"),
                     "–" if sd is None else f"{sd:.3f}", f"{fmean(kl for _, kl in runs):.1f}"])
    return markdown_table(SEED_HEADER, rows)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])
