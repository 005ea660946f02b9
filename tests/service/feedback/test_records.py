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
        "chosen_adapter": "v1", "chosen_finish_reason": None, "chosen_temperature": None, "chosen_top_p": None,
        "rejected_adapter": "v1", "rejected_finish_reason": None, "rejected_temperature": None,
        "rejected_top_p": None, "voter": "key:a", "created": 100,
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
    assert set(records[0]) == {"prompt", "completion", "label", "answer_id", "adapter", "finish_reason", "temperature",
                               "top_p", "voter", "created"}


def test_the_window_keeps_the_newest_records_and_caps_each_voter():
    events = [event(["r"], cid=f"c{i}", rating=1, created=i) for i in range(6)]  # key:a, oldest first
    events += [event(["g"], voter="key:b", cid=f"d{i}", rating=-1, created=10 + i) for i in range(3)]
    assert [r["created"] for r in training_records(events, window=4)] == [5, 10, 11, 12]
    capped = training_records(events, max_per_voter=2)
    assert [(r["voter"], r["created"]) for r in capped] == [("key:a", 4), ("key:a", 5), ("key:b", 11), ("key:b", 12)]
    # A ranking's pairs count against its voter's cap and the window like any other records.
    ranked = [*events, event(COLOURS, voter="key:c", created=20, ranking=[2, 0, 1])]
    assert len(training_records(ranked, window=5)) == 5
    assert [r["voter"] for r in training_records(ranked, max_per_voter=2)][-2:] == ["key:c", "key:c"]
