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


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call>'
TOOL_CONVERSATION = [
    {"role": "system", "content": "# Tools\n..."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": CALL},
    {"role": "tool", "content": '<tool_response>\n{"sky": "clear"}\n</tool_response>'},
    {"role": "user", "content": "And in Rome, and the time?"},
]
TWO_CALLS = CALL.replace("Paris", "Rome") + '\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


def test_tool_calls_are_exported_in_trls_form_and_read_back_as_the_text_the_model_wrote():
    record = pair_record(TOOL_CONVERSATION, TWO_CALLS, "I do not know.")
    assert record["chosen"] == [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        {"type": "function", "function": {"name": "get_time", "arguments": {}}},
    ]}]
    assert record["rejected"] == [{"role": "assistant", "content": "I do not know."}]
    assert record["prompt"][2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert record["prompt"][3] == {"role": "tool", "content": '{"sky": "clear"}'}
    pair = parse_record(json.loads(json.dumps(record)))
    assert (pair.prompt, pair.chosen, pair.rejected) == (TOOL_CONVERSATION, TWO_CALLS, "I do not know.")


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',  # not the compact form
    CALL + " and some prose",
    '<tool_call>{"name": "get_weather", "arguments": {"city":"Par',  # cut off
])
def test_a_call_not_written_as_the_model_writes_one_stays_text(text):
    record = pair_record([{"role": "user", "content": "Hi"}], text, "no")
    assert record["chosen"] == [{"role": "assistant", "content": text}]
    assert parse_record(record).chosen == text


def test_a_tool_call_written_by_hand_is_read_as_text():
    hand = {"prompt": [{"role": "user", "content": "Hi"}], "label": True, "completion": [
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"a": 1}'}}]}]}
    assert parse_record(hand).answer == '<tool_call>{"name": "f", "arguments": {"a":1}}</tool_call>'
    with pytest.raises(ValueError):
        parse_record({"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "x"}],
                      "label": True})
