from common.conversations import conversation_id
from common.records import Pair, Thumb
from rlhf.data import build_datasets

PROMPT = [{"role": "user", "content": "hi"}]


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
    train = {conversation_id(p.prompt) for p in data.pairs + data.thumbs}
    held = {conversation_id(p.prompt) for p in data.heldout_pairs + data.heldout_thumbs}
    assert not train & held
    assert 0.12 < len(held) / 400 < 0.28
    assert len(data.prompts) == len(train) and len(data.heldout_prompts) == len(held)
