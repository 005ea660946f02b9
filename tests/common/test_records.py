"""The feedback record format: strict parsing of both forms, the bad line named, atomic writes."""

import json

import pytest

from common.records import Pair, Thumb, load_records, pair_record, parse_record, write_jsonl

PROMPT = [{"role": "user", "content": "hi"}]


def test_parses_both_conversational_forms():
    assert parse_record(pair_record(PROMPT, "a", "b", voter="x")) == Pair(PROMPT, "a", "b")
    thumb = {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "c"}], "label": False}
    assert parse_record(thumb) == Thumb(PROMPT, "c", False)


@pytest.mark.parametrize(
    "record", [{"prompt": "text"}, {"prompt": PROMPT}, {"prompt": PROMPT, "chosen": [], "rejected": []}]
)
def test_rejects_malformed_records(record):
    with pytest.raises(ValueError):
        parse_record(record)


def test_load_records_names_the_bad_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(pair_record(PROMPT, "a", "b", voter="x")) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"f.jsonl, line 3"):
        load_records(path)


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    out = tmp_path / "feedback.jsonl"
    out.write_text("old\n")

    def records():
        yield {"a": 1}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(out, records())
    assert out.read_text() == "old\n" and list(tmp_path.iterdir()) == [out]


def test_provenance_is_read_where_present_and_of_the_right_type():
    from common.records import Origin

    record = pair_record(PROMPT, "a", "b", chosen_adapter="v3", chosen_finish_reason="stop", chosen_temperature=0.7,
                         chosen_top_p=1, rejected_adapter=7, rejected_temperature="hot")
    pair = parse_record(record)
    assert pair.origins == (Origin("v3", "stop", 0.7, 1), Origin(None, None, None, None))
    thumb = parse_record({"prompt": PROMPT, "completion": [{"role": "assistant", "content": "c"}], "label": True,
                          "adapter": "base", "finish_reason": "length", "temperature": True})
    assert thumb.origin == Origin("base", "length", None, None)  # a bool is not a temperature
