import json

import pytest

from rlhf.data import Pair, Thumb, build_datasets, is_heldout, load_records, parse_record, prompt_key

PROMPT = [{"role": "user", "content": "hi"}]


def pair_record(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "voter": "x"}


def test_parses_both_conversational_forms():
    assert parse_record(pair_record(PROMPT, "a", "b")) == Pair(PROMPT, "a", "b")
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
    path.write_text(json.dumps(pair_record(PROMPT, "a", "b")) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"f.jsonl:3"):
        load_records(path)


def test_deduplicates_and_drops_self_preferences():
    items = [Pair(PROMPT, "a", "b"), Pair(PROMPT, "a", "b"), Pair(PROMPT, "a", "a"), Thumb(PROMPT, "a", True),
             Thumb(PROMPT, "a", True), Thumb(PROMPT, "a", False)]
    data = build_datasets(items, heldout_fraction=0.0)
    assert data.pairs == [Pair(PROMPT, "a", "b")]
    assert data.thumbs == [Thumb(PROMPT, "a", True), Thumb(PROMPT, "a", False)]  # disagreeing users both count


def test_split_by_prompt_never_puts_a_prompt_on_both_sides():
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(400)]
    items = [Pair(p, f"good {j}", f"bad {j}") for p in prompts for j in range(3)]
    items += [Thumb(p, "meh", False) for p in prompts]
    data = build_datasets(items, heldout_fraction=0.2)
    train = {prompt_key(p.prompt) for p in data.pairs + data.thumbs}
    held = {prompt_key(p.prompt) for p in data.heldout_pairs + data.heldout_thumbs}
    assert not train & held
    assert 0.12 < len(held) / 400 < 0.28
    assert len(data.prompts) == len(train) and len(data.heldout_prompts) == len(held)


def test_split_is_stable():
    assert is_heldout(PROMPT, 0.5) == is_heldout([{"role": "user", "content": "hi"}], 0.5)
    assert not is_heldout(PROMPT, 0.0) and is_heldout(PROMPT, 1.0)
