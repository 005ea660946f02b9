"""The learning benchmark's table (bench/RESULTS.md) and plot (docs/learning_curve.png) from its results.

    python -m bench.loop_report   # re-render from bench/results/loop-*.json without running anything
"""

import json
import sys
from pathlib import Path

from bench.serve import write_results

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "docs" / "learning_curve.png"
LABEL = "Learning benchmark (bench/loop.py)"
TARGET_GAIN = 0.25  # the held-out score gain over the base the defaults are tuned for
COLOURS = {"ppo": "tab:blue", "dpo": "tab:orange", "kto": "tab:green"}


def load_results(results_dir: Path) -> list[dict]:
    order = list(COLOURS)
    found = [json.loads(p.read_text()) for p in sorted(results_dir.glob("loop-*.json"))]
    return sorted(found, key=lambda r: order.index(r["algorithm"]) if r["algorithm"] in order else 99)


def policy_rows(result: dict) -> list[tuple[str, dict]]:
    """(name, metrics) for the base and then each promoted version in promotion order."""
    return sorted(result["policies"].items(), key=lambda item: item[1].get("t") or 0.0)


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def table(results: list[dict]) -> str:
    summary = [
        "| algorithm | promoted | minutes to last | held-out score (base → last) | gain | KL (nats) | length "
        "(base → last) | EOS | RM held-out acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    detail = [
        "| algorithm | policy | minute | feedback events | held-out score | gain | KL (nats) | length | EOS "
        "| RM held-out acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = policy_rows(r)
        base, last = rows[0][1], rows[-1][1]
        summary.append(
            f"| {r['algorithm']} | {len(rows) - 1} | {_num(last['t'] / 60 if len(rows) > 1 else None, '.1f')} "
            f"| {base['score']:.3f} → {last['score']:.3f} | {last['score'] - base['score']:+.3f} | {last['kl']:.2f} "
            f"| {base['length']:.1f} → {last['length']:.1f} | {last['eos']:.2f} "
            f"| {_num(last.get('rm_accuracy'), '.2f')} |"
        )
        for name, p in rows:
            detail.append(
                f"| {r['algorithm']} | {name} | {p['t'] / 60:.1f} | {p['events']} | {p['score']:.3f} ± "
                f"{p['score_se']:.3f} | {p['score'] - base['score']:+.3f} | {p['kl']:.2f} | {p['length']:.1f} "
                f"| {p['eos']:.2f} | {_num(p.get('rm_accuracy'), '.2f')} |"
            )
    first = results[0]
    notes = (
        f"Preference: {first['preference']} (mean VADER compound of the answer for `vader`). Held-out: "
        f"{first['heldout_prompts']} prompts × {first['samples']} answers that no simulated user ever sent, "
        f"T = 0.7, 64 tokens, seed 0, every policy on the same prompts. Score ± its standard error. KL: "
        f"nats per answer to the base on the policy's own samples. Budget {first['budget_s'] / 60:.0f} min or "
        f"{first['generations']} promotions per algorithm; users: {first['users_config']['concurrency']} at "
        f"a time, {first['users_config']['think_time_s']} s mean think time, half comparisons (n=2), noise "
        f"{first['users_config']['noise']}; seed {first['seed']}. RM held-out acc: the run's reward model on "
        "the held-out 10 % of its feedback (PPO's; DPO and KTO runs train one too, for the gate)."
    )
    runs = "\n".join(
        f"- {r['algorithm']}: {len(r['runs'])} run(s): "
        + ", ".join(f"{x['status']}" + (f" ({'; '.join(x['gate_reasons'])})" if x.get("gate_reasons") else "")
                    for x in r["runs"])
        + f"; users: {r['users']}"
        for r in results
    )
    plot_link = "![learning curve](../docs/learning_curve.png)"
    return "\n".join(summary) + "\n\n" + "\n".join(detail) + f"\n\n{notes}\n\n{runs}\n\n{plot_link}\n"


def plot(results: list[dict], path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True)
    for r in results:
        colour = COLOURS.get(r["algorithm"], "tab:gray")
        rows = [p for _, p in policy_rows(r)]
        events = [p["events"] or 0 for p in rows]
        top.errorbar(events, [p["score"] for p in rows], yerr=[p["score_se"] for p in rows], marker="o",
                     color=colour, capsize=3, label=f"{r['algorithm']}: held-out, per promoted version")
        live = [(x["events"], x["live_score"]) for x in r["timeline"] if x["live_score"] is not None]
        if live:
            top.plot(*zip(*live, strict=True), color=colour, alpha=0.3, lw=1,
                     label=f"{r['algorithm']}: live, last 100 answers users saw")
        bottom.plot(events, [p["kl"] for p in rows], marker="o", color=colour, label=r["algorithm"])
    if results:
        base = policy_rows(results[0])[0][1]["score"]
        top.axhline(base + TARGET_GAIN, color="black", ls="--", lw=1, label=f"target: base + {TARGET_GAIN}")
    top.set_ylabel(f"mean {results[0]['preference'] if results else ''} score")
    top.set_title("chatloop learning from simulated users (held-out prompts)")
    top.legend(fontsize=7, loc="lower right")
    bottom.set_ylabel("KL to base (nats / answer)")
    bottom.set_xlabel("feedback events the policy was trained on")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results_dir: Path, command: str) -> None:
    results = load_results(results_dir)
    if not results:
        raise SystemExit(f"no loop-*.json in {results_dir}")
    plot(results)
    machine = f"{results[0]['cores']} cores, CPU only; results from {', '.join(r['date'] for r in results)}."
    write_results(LABEL, table(results), machine, command)


if __name__ == "__main__":
    write_report(Path(__file__).with_name("results"), " ".join(["python -m bench.loop_report", *sys.argv[1:]]))
