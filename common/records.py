"""The feedback record format: what `chatloop feedback export` writes and the trainer reads, one JSON object a
line, in TRL's conversational forms.

Pairs (reward model, DPO):  {"prompt": [messages], "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}
Thumbs (KTO, pointwise):    {"prompt": [messages], "completion": [{"role": "assistant", "content": ...}], "label": true}

An answer that is tool calls is written as TRL writes one, {"role": "assistant", "content": "", "tool_calls":
[{"type": "function", "function": {"name": ..., "arguments": {...}}}]}, and a tool's result as {"role": "tool",
"content": ...} (common/tool_text.py); reading turns them back into the text the model wrote and saw, exactly.

Records may carry more keys (provenance: which answers, which adapters, who voted, when); readers ignore all of
them but `created`. Every record of one kind that the service writes has the same keys, so a JSONL loader that
infers its columns from the first lines reads the whole file.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from common.conversations import Messages, conversation_id
from common.tool_text import as_message, as_text


def assistant(text: str) -> list[dict]:
    return [as_message({"role": "assistant", "content": text})]


def structured(prompt: Messages) -> list[dict]:
    return [as_message(message) for message in prompt]


def pair_record(prompt: Messages, chosen: str, rejected: str, **provenance) -> dict:
    return {"prompt": structured(prompt), "chosen": assistant(chosen), "rejected": assistant(rejected), **provenance}


def thumb_record(prompt: Messages, answer: str, label: bool, **provenance) -> dict:
    return {"prompt": structured(prompt), "completion": assistant(answer), "label": label, **provenance}


def is_pair(record: dict) -> bool:
    return "chosen" in record


class Origin(NamedTuple):
    """Where a served answer came from: the adapter version that wrote it, how it ended ("stop" at EOS, "length"
    at the token limit) and its sampling settings. Unknown fields are None (imported or older records)."""

    adapter: str | None = None
    finish_reason: str | None = None
    temperature: float | None = None
    top_p: float | None = None


@dataclass(frozen=True)
class Pair:
    prompt: Messages
    chosen: str
    rejected: str
    created: int | None = field(default=None, compare=False)  # when the vote was cast, if the record says
    record_id: str = field(default="", compare=False)  # a hash of the whole line, provenance included
    origins: tuple[Origin, Origin] = field(default=(Origin(), Origin()), compare=False)  # chosen, rejected

    def key(self) -> tuple:
        return ("pair", conversation_id(self.prompt), self.chosen, self.rejected)

    def texts(self) -> list[str]:
        return [self.chosen, self.rejected]


@dataclass(frozen=True)
class Thumb:
    prompt: Messages
    answer: str
    label: bool
    created: int | None = field(default=None, compare=False)
    record_id: str = field(default="", compare=False)
    origin: Origin = field(default=Origin(), compare=False)

    def key(self) -> tuple:
        return ("thumb", conversation_id(self.prompt), self.answer, self.label)

    def texts(self) -> list[str]:
        return [self.answer]


class _Function(BaseModel):
    name: Annotated[str, Field(min_length=1)]
    arguments: dict | str


class _ToolCall(BaseModel):
    type: Literal["function"] = "function"
    function: _Function
    id: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Annotated[str, Field(min_length=1)]
    content: str | None = None  # null or absent only beside tool_calls
    tool_calls: Annotated[list[_ToolCall], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _said_something(self) -> "Message":
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs content or tool_calls")
        return self

    def text(self) -> dict:
        """Role and content in the text form the model sees (tool calls and results written out)."""
        return as_text(self.model_dump(exclude_none=True))


class _AssistantTurn(Message):
    role: Literal["assistant"]


Reply = Annotated[list[_AssistantTurn], Field(min_length=1, max_length=1)]
Prompt = Annotated[list[Message], Field(min_length=1)]


class _PairLine(BaseModel):
    prompt: Prompt
    chosen: Reply
    rejected: Reply
    created: int | None = None


class _ThumbLine(BaseModel):
    prompt: Prompt
    completion: Reply
    label: StrictBool
    created: int | None = None


def _origin(data: dict, prefix: str = "") -> Origin:
    """The provenance fields of one answer, where present and of the right type."""
    def get(name: str, kind: type | tuple[type, ...]):
        value = data.get(prefix + name)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    return Origin(get("adapter", str), get("finish_reason", str), get("temperature", (int, float)),
                  get("top_p", (int, float)))


class MalformedFeedback(ValueError):
    """A line of a feedback file is neither a pair nor a thumb record."""


def _reason(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"{'.'.join(map(str, first['loc'])) or 'record'}: {first['msg']}{more}"
    return str(exc)


def parse_record(data: object) -> Pair | Thumb:
    """One record (a decoded JSON line) as a Pair or a Thumb; ValueError says what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    canonical = json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    record_id = hashlib.sha256(canonical.encode()).hexdigest()[:32]
    if "chosen" in data or "rejected" in data:
        pair = _PairLine.model_validate(data)
        prompt = [m.text() for m in pair.prompt]
        origins = (_origin(data, "chosen_"), _origin(data, "rejected_"))
        chosen, rejected = pair.chosen[0].text()["content"], pair.rejected[0].text()["content"]
        return Pair(prompt, chosen, rejected, pair.created, record_id, origins)
    if "completion" in data or "label" in data:
        thumb = _ThumbLine.model_validate(data)
        prompt = [m.text() for m in thumb.prompt]
        return Thumb(prompt, thumb.completion[0].text()["content"], thumb.label, thumb.created, record_id,
                     _origin(data))
    raise ValueError("neither a pair (prompt, chosen, rejected) nor a thumb (prompt, completion, label)")


def load_records(path: Path) -> list[Pair | Thumb]:
    """Every record of a JSONL file, oldest first as written, or MalformedFeedback naming the first bad line.
    Blank lines are skipped."""
    records = []
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
            if line.strip():
                records.append(parse_record(json.loads(line)))
        except ValueError as exc:  # bad UTF-8, bad JSON and failed validation all are ValueErrors
            raise MalformedFeedback(f"{path}, line {number}: {_reason(exc)}") from None
    return records


def write_jsonl(out: Path, records: Iterable[dict]) -> None:
    """Write next to `out` under a temp name, then rename: a trainer never reads half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
