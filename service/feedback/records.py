"""Votes as training records (common/records.py): the newest vote of each voter on each thing counts, a
ranking gives its pairs, a pick beats each of the others, "both bad" is a thumbs-down for each answer and a
tie says nothing."""

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


def _pair(event: FeedbackEvent, chosen: AnswerRef, rejected: AnswerRef) -> dict:
    return pair_record(
        event.prompt, chosen.text, rejected.text, chosen_id=_answer_id(chosen), rejected_id=_answer_id(rejected),
        chosen_adapter=chosen.adapter, rejected_adapter=rejected.adapter, voter=event.voter, created=event.created,
    )


def _thumb(event: FeedbackEvent, answer: AnswerRef, label: bool) -> dict:
    return thumb_record(
        event.prompt, answer.text, label, answer_id=_answer_id(answer), adapter=answer.adapter, voter=event.voter,
        created=event.created,
    )


def training_records(events: Iterable[FeedbackEvent]) -> list[dict]:
    """Events (oldest first) as pair and thumb records, oldest vote first."""
    records: list[dict] = []
    for event in latest_votes(events):
        if event.kind == "thumb":
            records.append(_thumb(event, event.answers[0], event.rating == 1))
        elif event.verdict == "both_bad":
            records += [_thumb(event, answer, False) for answer in event.answers]
        else:
            records += [_pair(event, event.answers[i], event.answers[j]) for i, j in event.pairs()]
    return records
