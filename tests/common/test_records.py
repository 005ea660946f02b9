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
