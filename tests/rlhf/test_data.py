from common.conversations import conversation_id
from common.records import Origin, Pair, Thumb
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


def test_served_keeps_the_answers_one_version_served_at_the_trainers_sampling_newest_last():
    mine = Origin("v2", "stop", 0.7, 1.0)
    items = [
        Pair(PROMPT, "a", "b", created=1, origins=(mine, Origin("v1", "stop", 0.7, 1.0))),  # only "a" is v2's
        Thumb(PROMPT, "c", True, created=3, origin=Origin("v2", "length", 0.7, None)),  # cut off: no EOS
        Thumb(PROMPT, "d", False, created=2, origin=Origin("v2", "stop", 1.0, 1.0)),  # another temperature
        Thumb(PROMPT, "e", False, created=4, origin=Origin("v2", "stop", 0.7, 0.9)),  # a nucleus cut
        Thumb(PROMPT, "a", False, created=5, origin=mine),  # the same answer again: once
        Thumb(PROMPT, "f", True, created=0, origin=Origin()),  # imported: unknown origin
    ]
    data = build_datasets(items, heldout_fraction=0.0)
    served = data.served("v2", 0.7, limit=2)
    assert [(s.text, s.ended, s.vote, s.on_policy) for s in served] == [
        ("c", False, 1.0, True), ("a", True, -1.0, True)]
    assert [s.text for s in data.served("v2", 0.7, limit=1)] == ["a"]  # newest vote
    assert data.served("v2", 0.7, limit=0) == []


def test_served_fills_up_with_other_versions_answers_newest_first():
    """A version just promoted has served few answers: the newest of the other versions' (at the same sampling
    settings) fill the batch, its own always in it."""
    def thumb(text: str, created: int, adapter: str | None, temperature: float = 0.7) -> Thumb:
        return Thumb(PROMPT, text, True, created=created, origin=Origin(adapter, "stop", temperature, None))

    items = [thumb("old", 1, "base"), thumb("mine", 2, "v1"), thumb("ab", 3, "v2"), thumb("hot", 4, "base", 1.0),
             thumb("unknown", 5, None), thumb("new", 6, "base")]
    data = build_datasets(items, heldout_fraction=0.0)
    served = data.served("v1", 0.7, limit=3)
    assert [(s.text, s.on_policy) for s in served] == [("ab", False), ("new", False), ("mine", True)]
    assert [s.text for s in data.served("v1", 0.7, limit=10)] == ["old", "ab", "new", "mine"]
    assert [s.text for s in data.served("v1", 0.7, limit=1)] == ["mine"]


def test_served_without_thumbs_keeps_the_answers_of_comparisons_only():
    """A thumb's vote on an answer that was also in a comparison does not count either: the comparison's does."""
    mine = Origin("v1", "stop", 0.7, 1.0)
    items = [
        Pair(PROMPT, "a", "b", created=1, origins=(mine, mine)),
        Thumb(PROMPT, "a", False, created=2, origin=mine),  # newer than the comparison, but a thumb
        Thumb(PROMPT, "c", True, created=3, origin=mine),
    ]
    data = build_datasets(items, heldout_fraction=0.0)
    assert [(s.text, s.vote) for s in data.served("v1", 0.7, limit=10, thumbs=False)] == [("a", 1.0), ("b", -1.0)]
    assert [(s.text, s.vote) for s in data.served("v1", 0.7, limit=10)] == [("b", -1.0), ("a", -1.0), ("c", 1.0)]
