"""The fixed, external preferences simulated users judge answers by, and the prompts they ask.

A preference stands in for the human taste the loop is meant to learn: it is known exactly, so a
benchmark can say whether the served policy moved towards it (the mean score of its answers rises)
without a person rating anything. Each is a plain function of what a user sees: the answer's text
and whether it ended properly (`finish_reason`).
"""

import hashlib
from pathlib import Path
from typing import Literal, Protocol

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

PROMPTS_PATH = Path(__file__).with_name("prompts.txt")
CONCISE_WORDS = 200  # answers this long or longer score 0 under "concise"

Split = Literal["train", "heldout", "all"]


class Preference(Protocol):
    def __call__(self, answer_text: str, finish_reason: str) -> float: ...


_analyzer: SentimentIntensityAnalyzer | None = None


def vader(answer_text: str, finish_reason: str) -> float:
    """Warmer is better: VADER's compound sentiment of the text, in [-1, 1]. A clear signal a small
    policy can move towards, and one that an answer's correctness does not change."""
    global _analyzer
    if _analyzer is None:  # loading the lexicon takes a moment; do it once, and only when used
        _analyzer = SentimentIntensityAnalyzer()
    return _analyzer.polarity_scores(answer_text)["compound"]


def concise(answer_text: str, finish_reason: str) -> float:
    """Shorter is better, but only for an answer that ended by itself: a cut-off or empty answer scores
    -1, below any finished one, so the policy cannot win by stopping mid-sentence or saying nothing."""
    if finish_reason != "stop" or not answer_text.strip():
        return -1.0
    return 1 - min(len(answer_text.split()), CONCISE_WORDS) / CONCISE_WORDS


PREFERENCES: dict[str, Preference] = {"vader": vader, "concise": concise}


def get_preference(name: str) -> Preference:
    try:
        return PREFERENCES[name]
    except KeyError:
        raise ValueError(f"unknown preference {name!r}; choose one of {', '.join(PREFERENCES)}") from None


def is_heldout(prompt: str, fraction: float) -> bool:
    """A stable hash of the text, so a prompt stays on its side across runs and file edits."""
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def load_prompts(path: Path | None = None, split: Split = "train", heldout_fraction: float = 0.2) -> list[str]:
    """One prompt a line (default: bench/prompts.txt), '#' comments and blank lines skipped. Held-out
    prompts never get feedback, so scoring the policy on them measures what it learned, not what it
    was shown."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, not {split!r}")
    lines = (line.strip() for line in Path(path or PROMPTS_PATH).read_text().splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if split == "all":
        return prompts
    return [p for p in prompts if is_heldout(p, heldout_fraction) == (split == "heldout")]
