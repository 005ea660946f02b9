"""Feedback in and out of Redis as files: the current votes exported as training records (common/records.py),
and such files imported back as votes."""

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from redis.asyncio import Redis

from common.records import Pair, Thumb, is_pair, load_records, write_jsonl
from service.feedback.events import AnswerRef, FeedbackEvent
from service.feedback.records import latest_votes, training_records
from service.store import feedback_store
from service.store.completion_log import CompletionRecord, LoggedChoice, log_completion

Kind = Literal["all", "pairs", "thumbs"]
Progress = Callable[[list], Iterable]  # wraps the work list; the CLI passes a tqdm bar, library callers nothing
IMPORTED = "import"  # owner, adapter and model of imported completions, source of their votes


async def export_feedback(
    redis: Redis, out: Path, kind: Kind = "all", progress: Progress = iter, window: int = 0, max_per_voter: int = 0
) -> dict[str, int]:
    """Write the current votes as training records (the newest `window` of them, at most `max_per_voter` from any one
    voter; 0: no limit); returns the counts of events read and records written."""
    events = [event for _, event in await feedback_store.all_events(redis)]
    records = training_records(events, window, max_per_voter)
    records = [r for r in records if kind == "all" or is_pair(r) == (kind == "pairs")]
    write_jsonl(out, progress(records))
    pairs = sum(map(is_pair, records))
    return {"events": len(events), "votes": len(latest_votes(events)), "pairs": pairs, "thumbs": len(records) - pairs}


def synthetic_vote(record: Pair | Thumb, voter: str, now: int) -> tuple[CompletionRecord, FeedbackEvent]:
    """The completion an imported record stands for, and the vote on it: chosen is choice 0, rejected choice 1.
    The completion's id is the record's hash, provenance included: two voters' identical verdicts stay two votes."""
    completion_id = f"{IMPORTED}-{record.record_id}"
    created = record.created if record.created is not None else now
    texts = record.texts()
    completion = CompletionRecord.build(
        record.prompt, id=completion_id, created=created, model=IMPORTED, adapter=IMPORTED, params={},
        owner=IMPORTED, choices=[LoggedChoice(index=i, text=text, finish_reason=None) for i, text in enumerate(texts)],
    )
    answers = [AnswerRef(completion_id=completion_id, choice_index=i, text=t, adapter=IMPORTED)
               for i, t in enumerate(texts)]
    if isinstance(record, Pair):
        verdict: dict = {"kind": "comparison", "preferred": 0}
    else:
        verdict = {"kind": "thumb", "rating": 1 if record.label else -1}
    event = FeedbackEvent(
        created=created, voter=voter, prompt=record.prompt, conversation=completion.conversation, answers=answers,
        source=IMPORTED, **verdict,
    )
    return completion, event


async def import_feedback(redis: Redis, path: Path, ttl_s: int, progress: Progress = iter) -> dict[str, int]:
    """Record every pair and thumb of a JSONL file as a vote on a synthetic completion. The whole file is checked
    before anything is written (MalformedFeedback names the first bad line); importing the same file again
    changes nothing."""
    records = load_records(path)
    voter, now = f"{IMPORTED}:{path.name}", int(time.time())
    counts = dict.fromkeys(["pairs", "thumbs", *feedback_store.RESULTS.values()], 0)
    for record in progress(records):
        completion, event = synthetic_vote(record, voter, now)
        await log_completion(redis, completion, ttl_s)
        status, _ = await feedback_store.cast_vote(redis, event)
        counts["pairs" if isinstance(record, Pair) else "thumbs"] += 1
        counts[status] += 1
    return counts
