"""Feedback as training data: the current votes exported as JSONL in TRL's conversational forms, and such
files imported back as feedback.

Pairs (reward model, DPO):  {"prompt": [messages], "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}
Thumbs (KTO, pointwise):    {"prompt": [messages], "completion": [{"role": "assistant", "content": ...}], "label": true}

Each record also carries a few provenance fields (which answers, which adapters, who voted, when). Every record of
one kind has the same keys, so a JSONL loader that infers its columns from the first lines reads the whole file.
"""

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from redis.asyncio import Redis

from service import feedback_store
from service.completion_log import CompletionRecord, LoggedChoice, log_completion
from service.feedback_events import AnswerRef, FeedbackEvent

Kind = Literal["all", "pairs", "thumbs"]
Progress = Callable[[list], Iterable]  # wraps the work list; the CLI passes a tqdm bar, library callers nothing
IMPORTED = "import"  # owner, adapter and model of imported completions, source of their votes


def latest_votes(events: Iterable[FeedbackEvent]) -> list[FeedbackEvent]:
    """The newest event of each vote key (a re-vote replaces the earlier one), in the order they were cast."""
    latest: dict[str, FeedbackEvent] = {}
    for event in events:
        latest.pop(event.vote_key, None)  # re-inserted below, so the order follows the newest vote
        latest[event.vote_key] = event
    return list(latest.values())


def _answer_id(answer: AnswerRef) -> str:
    return f"{answer.completion_id}:{answer.choice_index}"


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def pair_record(event: FeedbackEvent, chosen: AnswerRef, rejected: AnswerRef) -> dict:
    return {
        "prompt": event.prompt, "chosen": _assistant(chosen.text), "rejected": _assistant(rejected.text),
        "chosen_id": _answer_id(chosen), "rejected_id": _answer_id(rejected),
        "chosen_adapter": chosen.adapter, "rejected_adapter": rejected.adapter,
        "voter": event.voter, "created": event.created,
    }


def thumb_record(event: FeedbackEvent, answer: AnswerRef, label: bool) -> dict:
    return {
        "prompt": event.prompt, "completion": _assistant(answer.text), "label": label,
        "answer_id": _answer_id(answer), "adapter": answer.adapter, "voter": event.voter, "created": event.created,
    }


def training_records(events: Iterable[FeedbackEvent]) -> list[dict]:
    """Events (oldest first) as pair and thumb records; ties say nothing about either answer, so they give none."""
    records: list[dict] = []
    for event in latest_votes(events):
        if event.kind == "thumb":
            records.append(thumb_record(event, event.answers[0], event.rating == 1))
        elif event.verdict == "both_bad":
            records += [thumb_record(event, answer, False) for answer in event.answers]
        else:
            records += [pair_record(event, event.answers[i], event.answers[j]) for i, j in event.pairs()]
    return records


def is_pair(record: dict) -> bool:
    return "chosen" in record


def write_jsonl(out: Path, records: Iterable[dict]) -> None:
    """Write next to `out` under a temp name, then rename: a trainer never reads half an export."""
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


async def export_feedback(redis: Redis, out: Path, kind: Kind = "all", progress: Progress = iter) -> dict[str, int]:
    """Write the current votes as training records; returns the counts of events read and records written."""
    events = [event for _, event in await feedback_store.all_events(redis)]
    records = [r for r in training_records(events) if kind == "all" or is_pair(r) == (kind == "pairs")]
    write_jsonl(out, progress(records))
    pairs = sum(map(is_pair, records))
    return {"events": len(events), "votes": len(latest_votes(events)), "pairs": pairs, "thumbs": len(records) - pairs}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Annotated[str, Field(min_length=1)]
    content: str


class AssistantMessage(Message):
    role: Literal["assistant"]


Reply = Annotated[list[AssistantMessage], Field(min_length=1, max_length=1)]


class PairRecord(BaseModel):
    # Extra keys (the provenance fields) are ignored; `created`, when present, dates the imported vote.
    prompt: Annotated[list[Message], Field(min_length=1)]
    chosen: Reply
    rejected: Reply
    created: int | None = None

    def texts(self) -> list[str]:
        return [self.chosen[0].content, self.rejected[0].content]


class ThumbRecord(BaseModel):
    prompt: Annotated[list[Message], Field(min_length=1)]
    completion: Reply
    label: StrictBool
    created: int | None = None

    def texts(self) -> list[str]:
        return [self.completion[0].content]


class MalformedFeedback(ValueError):
    """A line of an import file is neither a pair nor a thumb record; nothing was imported."""


def _reason(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"{'.'.join(map(str, first['loc'])) or 'record'}: {first['msg']}{more}"
    return str(exc)


def parse_record(line: str) -> tuple[str, PairRecord | ThumbRecord]:
    """One JSONL line as (synthetic completion id, record); the id is a hash of the record's content."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    if "chosen" in data or "rejected" in data:
        record: PairRecord | ThumbRecord = PairRecord.model_validate(data)
    elif "completion" in data or "label" in data:
        record = ThumbRecord.model_validate(data)
    else:
        raise ValueError("neither a pair (prompt, chosen, rejected) nor a thumb (prompt, completion, label)")
    # Hash the whole record, provenance included: two voters' identical verdicts stay two votes.
    canonical = json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return f"{IMPORTED}-{hashlib.sha256(canonical.encode()).hexdigest()[:32]}", record


def load_records(path: Path) -> list[tuple[str, PairRecord | ThumbRecord]]:
    """Every record of a JSONL file, or MalformedFeedback naming the first bad line. Blank lines are skipped."""
    records = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
            if line.strip():
                records.append(parse_record(line))
        except ValueError as exc:  # bad UTF-8, bad JSON and failed validation all are ValueErrors
            raise MalformedFeedback(f"{path}, line {number}: {_reason(exc)}") from None
    return records


def synthetic_vote(
    completion_id: str, record: PairRecord | ThumbRecord, voter: str, now: int
) -> tuple[CompletionRecord, FeedbackEvent]:
    """The completion an imported record stands for, and the vote on it: chosen is choice 0, rejected choice 1."""
    created = record.created if record.created is not None else now
    messages = [m.model_dump() for m in record.prompt]
    texts = record.texts()
    completion = CompletionRecord.build(
        messages, id=completion_id, created=created, model=IMPORTED, adapter=IMPORTED, params={}, owner=IMPORTED,
        choices=[LoggedChoice(index=i, text=text, finish_reason=None) for i, text in enumerate(texts)],
    )
    answers = [AnswerRef(completion_id=completion_id, choice_index=i, text=t, adapter=IMPORTED)
               for i, t in enumerate(texts)]
    if isinstance(record, PairRecord):
        verdict: dict = {"kind": "comparison", "preferred": 0}
    else:
        verdict = {"kind": "thumb", "rating": 1 if record.label else -1}
    event = FeedbackEvent(
        created=created, voter=voter, prompt=messages, conversation=completion.conversation, answers=answers,
        source=IMPORTED, **verdict,
    )
    return completion, event


async def import_feedback(redis: Redis, path: Path, ttl_s: int, progress: Progress = iter) -> dict[str, int]:
    """Record every pair and thumb of a JSONL file as a vote on a synthetic completion. The whole file is checked
    before anything is written; importing the same file again changes nothing."""
    records = load_records(path)
    voter, now = f"{IMPORTED}:{path.name}", int(time.time())
    counts = dict.fromkeys(["pairs", "thumbs", *feedback_store.RESULTS.values()], 0)
    for completion_id, record in progress(records):
        completion, event = synthetic_vote(completion_id, record, voter, now)
        await log_completion(redis, completion, ttl_s)
        status, _ = await feedback_store.cast_vote(redis, event)
        counts["pairs" if isinstance(record, PairRecord) else "thumbs"] += 1
        counts[status] += 1
    return counts
