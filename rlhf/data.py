"""Training data from logged feedback: preference pairs, pointwise thumbs and a prompt pool.

Input is what `chatloop feedback export` writes (TRL's conversational forms): pairs
`{"prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [...]}` and thumbs
`{"prompt": [...], "completion": [...], "label": true|false}`; other fields are ignored.
Train and held-out sides are split by a stable hash of the prompt, so a prompt never lands on both.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

Messages = list[dict]


@dataclass(frozen=True)
class Pair:
    prompt: Messages
    chosen: str
    rejected: str

    def key(self) -> tuple:
        return ("pair", prompt_key(self.prompt), self.chosen, self.rejected)


@dataclass(frozen=True)
class Thumb:
    prompt: Messages
    answer: str
    label: bool

    def key(self) -> tuple:
        return ("thumb", prompt_key(self.prompt), self.answer, self.label)


@dataclass
class FeedbackData:
    pairs: list[Pair] = field(default_factory=list)
    thumbs: list[Thumb] = field(default_factory=list)
    heldout_pairs: list[Pair] = field(default_factory=list)
    heldout_thumbs: list[Thumb] = field(default_factory=list)

    @property
    def prompts(self) -> list[Messages]:
        """Unique training-side prompts: the conversations users actually sent (PPO's prompt pool)."""
        return unique_prompts([*self.pairs, *self.thumbs])

    @property
    def heldout_prompts(self) -> list[Messages]:
        return unique_prompts([*self.heldout_pairs, *self.heldout_thumbs])


def prompt_key(prompt: Messages) -> str:
    canonical = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def is_heldout(prompt: Messages, fraction: float) -> bool:
    return int(prompt_key(prompt)[:8], 16) / 16**8 < fraction


def unique_prompts(items: list[Pair | Thumb]) -> list[Messages]:
    seen: dict[str, Messages] = {}
    for item in items:
        seen.setdefault(prompt_key(item.prompt), item.prompt)
    return [seen[k] for k in sorted(seen)]


def _answer_text(turns: list[dict] | str, where: str) -> str:
    if isinstance(turns, str):
        return turns
    if not turns or turns[-1].get("role") != "assistant":
        raise ValueError(f"{where}: expected a list ending in an assistant message")
    return turns[-1]["content"]


def parse_record(record: dict, where: str = "record") -> Pair | Thumb:
    prompt = record.get("prompt")
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m for m in prompt):
        raise ValueError(f"{where}: 'prompt' must be a list of chat messages")
    prompt = [{"role": m["role"], "content": m.get("content", "")} for m in prompt]
    if "chosen" in record and "rejected" in record:
        return Pair(prompt, _answer_text(record["chosen"], where), _answer_text(record["rejected"], where))
    if "completion" in record and "label" in record:
        return Thumb(prompt, _answer_text(record["completion"], where), bool(record["label"]))
    raise ValueError(f"{where}: neither a pair (chosen/rejected) nor a thumb (completion/label)")


def load_records(path: Path) -> list[Pair | Thumb]:
    items = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        items.append(parse_record(record, f"{path}:{number}"))
    return items


def build_datasets(items: list[Pair | Thumb], heldout_fraction: float = 0.1) -> FeedbackData:
    """Deduplicate, drop pairs that prefer an answer to itself, and split by prompt."""
    data = FeedbackData()
    seen = set()
    for item in items:
        key = item.key()
        if key in seen or (isinstance(item, Pair) and item.chosen == item.rejected):
            continue
        seen.add(key)
        heldout = is_heldout(item.prompt, heldout_fraction)
        if isinstance(item, Pair):
            (data.heldout_pairs if heldout else data.pairs).append(item)
        else:
            (data.heldout_thumbs if heldout else data.thumbs).append(item)
    return data
