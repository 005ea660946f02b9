"""Votes as training records (common/records.py): the newest vote of each voter on each thing counts, a
ranking gives its pairs, a pick beats each of the others, "both bad" is a thumbs-down for each answer and a
tie says nothing."""

from collections import defaultdict
from collections.abc import Iterable

from common.records import pair_record, thumb_record
from service.feedback.events import AnswerRef, FeedbackEvent


def latest_votes(events: Iterable[FeedbackEvent]) -> list[FeedbackEvent]:
    """The newest event of each vote key (a re-vote replaces the earlier one), in the order they were cast."""
    latest: dict[str, FeedbackEvent] = {}
    for event in events:
        latest.pop(event.vote_key, None)  # re-inserted below, so the order follows the newest vote
        latest[event.vote_key] = event
    return list(latest.values())


def _answer_id(answer: AnswerRef) -> str:
    return f"{answer.completion_id}:{answer.choice_index}"


def _origin(answer: AnswerRef, prefix: str = "") -> dict:
    """Which version wrote the answer, how it ended and how it was sampled (common/records.py, Origin)."""
    return {f"{prefix}{k}": getattr(answer, k) for k in ("adapter", "finish_reason", "temperature", "top_p")}


def _pair(event: FeedbackEvent, chosen: AnswerRef, rejected: AnswerRef) -> dict:
    return pair_record(
        event.prompt, chosen.text, rejected.text, chosen_id=_answer_id(chosen), rejected_id=_answer_id(rejected),
        **_origin(chosen, "chosen_"), **_origin(rejected, "rejected_"), voter=event.voter, created=event.created,
    )


def _thumb(event: FeedbackEvent, answer: AnswerRef, label: bool) -> dict:
    return thumb_record(
        event.prompt, answer.text, label, answer_id=_answer_id(answer), **_origin(answer), voter=event.voter,
        created=event.created,
    )


def event_records(event: FeedbackEvent) -> list[dict]:
    """One vote as its training records: a ranking of k answers gives k(k-1)/2 pairs."""
    if event.kind == "thumb":
        return [_thumb(event, event.answers[0], event.rating == 1)]
    if event.verdict == "both_bad":
        return [_thumb(event, answer, False) for answer in event.answers]
    return [_pair(event, event.answers[i], event.answers[j]) for i, j in event.pairs()]


def training_records(events: Iterable[FeedbackEvent], window: int = 0, max_per_voter: int = 0) -> list[dict]:
    """Events (oldest first) as pair and thumb records, oldest vote first: the newest `window` of them (0: all),
    with at most `max_per_voter` (0: no cap) from any one voter, their newest, so that no single caller can make
    up a training window however much they vote."""
    kept: list[list[dict]] = []
    per_voter: dict[str, int] = defaultdict(int)
    total = 0
    for event in reversed(latest_votes(events)):  # newest first, then reversed back
        if window and total >= window:
            break
        records = event_records(event)
        if max_per_voter:
            records = records[: max(0, max_per_voter - per_voter[event.voter])]
        per_voter[event.voter] += len(records)
        records = records[: window - total] if window else records
        total += len(records)
        kept.append(records)
    return [record for records in reversed(kept) for record in records]
