"""Votes to training records, by hand: rankings, picks, re-votes, ties, both-bad and thumbs."""

from common.conversations import conversation_id
from service.feedback.events import AnswerRef, FeedbackEvent
from service.feedback.records import training_records

PROMPT = [{"role": "user", "content": "Name a colour"}]
COLOURS = ["red", "green", "blue"]


def event(texts: list[str], voter: str = "key:a", created: int = 100, cid: str = "c1", **vote) -> FeedbackEvent:
    answers = [AnswerRef(completion_id=cid, choice_index=i, text=t, adapter="v1") for i, t in enumerate(texts)]
    kind = "thumb" if "rating" in vote else "comparison"
    return FeedbackEvent(kind=kind, created=created, voter=voter, prompt=PROMPT, conversation=conversation_id(PROMPT),
                         answers=answers, **vote)


def texts_of(records: list[dict]) -> list[tuple]:
    """Each record as (chosen, rejected) texts, or (completion text, label)."""
    return [(r["chosen"][0]["content"], r["rejected"][0]["content"]) if "chosen" in r
            else (r["completion"][0]["content"], r["label"]) for r in records]


def test_ranking_of_three_gives_its_three_ordered_pairs():
    records = training_records([event(COLOURS, ranking=[2, 0, 1])])
    assert texts_of(records) == [("blue", "red"), ("blue", "green"), ("red", "green")]
    assert records[0] == {
        "prompt": PROMPT, "chosen": [{"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "assistant", "content": "red"}], "chosen_id": "c1:2", "rejected_id": "c1:0",
        "chosen_adapter": "v1", "rejected_adapter": "v1", "voter": "key:a", "created": 100,
    }


def test_one_pick_out_of_three_beats_each_of_the_others():
    assert texts_of(training_records([event(COLOURS, preferred=1)])) == [("green", "red"), ("green", "blue")]


def test_a_revote_replaces_the_earlier_one():
    events = [event(COLOURS[:1], rating=1), event(COLOURS[:1], voter="key:b", rating=1),
              event(COLOURS[:1], rating=-1, created=200)]
    records = training_records(events)
    assert [(r["voter"], r["label"], r["created"]) for r in records] == [("key:b", True, 100), ("key:a", False, 200)]


def test_a_tie_gives_nothing():
    assert training_records([event(COLOURS[:2], verdict="tie")]) == []


def test_both_bad_gives_a_thumbs_down_for_each_answer():
    records = training_records([event(COLOURS[:2], verdict="both_bad")])
    assert texts_of(records) == [("red", False), ("green", False)]
    assert [r["answer_id"] for r in records] == ["c1:0", "c1:1"]


def test_thumbs_become_labels():
    records = training_records([event(["red"], rating=1), event(["green"], cid="c2", rating=-1)])
    assert texts_of(records) == [("red", True), ("green", False)]
    assert set(records[0]) == {"prompt", "completion", "label", "answer_id", "adapter", "voter", "created"}
