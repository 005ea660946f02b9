"""The learning benchmark's plots (docs/learning_curve.png, docs/reward_curve.png) from its results dicts.

The production policy changes only when a version is promoted, so each run's held-out score over time is a step
function: the base's score from minute 0, each promoted version's from its promotion minute. Seeds of one
configuration are averaged at every minute where any of them changed, with their min-max spread as a band.
"""

from pathlib import Path
from statistics import fmean

COLOURS = {"ppo": "tab:blue", "dpo": "tab:orange", "kto": "tab:green"}
MARKERS = {"ppo": "o", "dpo": "s", "kto": "^"}


def step_curve(result: dict) -> list[tuple[float, float]]:
    """(minute, held-out score) at minute 0 (the base) and at every promotion, oldest first."""
    policies = result["policies"]
    return [(0.0, policies["base"]["score"]),
            *((p["t"] / 60, policies[p["version"]]["score"]) for p in result["promotions"])]


def score_at(curve: list[tuple[float, float]], minute: float) -> float:
    """The score of the policy in production at `minute` (the last change at or before it)."""
    return [score for at, score in curve if at <= minute][-1]


def band(results: list[dict]) -> tuple[list[float], list[float], list[float], list[float]]:
    """(minutes, mean, min, max) across seeds of the production policy's held-out score, at minute 0, every minute
    where any seed's production changed and the end of the longest run; each value holds until the next minute."""
    curves = [step_curve(r) for r in results]
    end = max(r.get("elapsed_s", r["budget_s"]) for r in results) / 60
    grid = sorted({at for curve in curves for at, _ in curve} | {end})
    values = [[score_at(curve, minute) for curve in curves] for minute in grid]
    return grid, [fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")  # never a half-written plot under the real name
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def plot_learning_curve(groups: dict[tuple[str, str], list[dict]], path: Path, target_gain: float) -> None:
    """One panel per preference: for each algorithm the mean held-out score across seeds against minutes, the
    min-max spread shaded, each seed's promotions as dots; on `vader`, the target base + target_gain."""
    plt = _pyplot()
    preferences = sorted({p for _, p in groups}, key=lambda p: (p != "vader", p))
    fig, axes = plt.subplots(1, len(preferences), figsize=(6.5 * len(preferences), 4.8), squeeze=False)
    for ax, preference in zip(axes[0], preferences, strict=True):
        bases = []
        for (algorithm, p), results in groups.items():
            if p != preference:
                continue
            colour = COLOURS.get(algorithm, "tab:gray")
            grid, mean, low, high = band(results)
            seeds = ", ".join(str(r["seed"]) for r in results)
            ax.step(grid, mean, where="post", color=colour, lw=2,
                    label=f"{algorithm}: mean of {len(results)} seed(s) ({seeds})")
            if len(results) > 1:
                ax.fill_between(grid, low, high, step="post", color=colour, alpha=0.2,
                                label=f"{algorithm}: spread across seeds (min-max)")
            for r in results:
                promoted = step_curve(r)[1:]
                if promoted:
                    ax.plot(*zip(*promoted, strict=True), MARKERS.get(algorithm, "o"), color=colour, ms=5,
                            alpha=0.7)
            bases += [r["policies"]["base"]["score"] for r in results]
        if preference == "vader":
            ax.axhline(fmean(bases) + target_gain, color="black", ls="--", lw=1,
                       label=f"target: base + {target_gain}")
        ax.set_title(f"{preference} users")
        ax.set_xlabel("minutes of learning (dots: promotions)")
        ax.set_ylabel(f"held-out {preference} score of the production policy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("chatloop learning from simulated users: held-out score, base at minute 0")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_reward_curve(results: list[dict], path: Path, target_accuracy: float, max_votes: int) -> None:
    """Every judged reward model's accuracy on held-out pairs (95 % interval as error bars) against the votes it
    trained on, one line per benchmark run, with the target accuracy and the vote budget it must be reached in."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    plotted = False
    for r in results:
        judged = sorted((m for m in r["reward_models"] if m["pair_accuracy"]["pairs"]), key=lambda m: m["votes"])
        if not judged:
            continue
        plotted = True
        acc = [m["pair_accuracy"] for m in judged]
        ax.errorbar([m["votes"] for m in judged], [a["accuracy"] for a in acc],
                    yerr=[[a["accuracy"] - a["low"] for a in acc], [a["high"] - a["accuracy"] for a in acc]],
                    marker=MARKERS.get(r["algorithm"], "o"), ls="-" if r["preference"] == "vader" else ":",
                    capsize=3, label=r["name"])
    if not plotted:
        ax.text(0.5, 0.5, "no reward model was judged", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(target_accuracy, color="black", ls="--", lw=1, label=f"target: {target_accuracy}")
    ax.axvline(max_votes, color="gray", ls=":", lw=1, label=f"{max_votes:,} votes")
    ax.set_title("Reward model vs the users' preference (held-out base answers)")
    ax.set_xlabel("votes the reward model trained on (pairs + thumbs)")
    ax.set_ylabel("accuracy on pairs > 0.2 apart (95 % interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
