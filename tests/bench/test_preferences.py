"""The simulated users' preferences against hand-checked values, and the prompt file and its split."""

from pathlib import Path

import pytest

from bench.preferences import concise, get_preference, is_heldout, load_prompts, vader


def test_vader_prefers_warm_answers():
    assert vader("I love this, it is wonderful!", "stop") > 0.8
    assert vader("The meeting moved to 3pm.", "stop") == 0.0
    assert vader("This is terrible and I hate it.", "stop") < -0.5
    assert vader("", "stop") == 0.0


def test_concise_prefers_short_answers_that_end():
    assert concise("one two three four five six seven eight nine ten", "stop") == pytest.approx(0.95)
    assert concise("one two three four five six seven eight nine ten", "length") == -1.0
    assert concise("", "stop") == -1.0
    assert concise(" \n\t", "stop") == -1.0
    assert concise("word " * 300, "stop") == 0.0  # long answers bottom out at 0, still above a cut-off one


def test_get_preference_names_the_valid_ones():
    assert get_preference("vader") is vader and get_preference("concise") is concise
    with pytest.raises(ValueError, match="vader, concise"):
        get_preference("kindness")


def test_heldout_by_hand_computed_hash():
    # sha256("What is the capital of Australia?") starts bad9ea43: 0xbad9ea43 / 16**8 = 0.72989
    prompt = "What is the capital of Australia?"
    assert is_heldout(prompt, 0.7299) and not is_heldout(prompt, 0.7298)


def test_split_is_disjoint_complete_stable_and_near_the_fraction():
    everything = load_prompts(split="all")
    train, heldout = load_prompts(split="train"), load_prompts(split="heldout")
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(everything)
    assert load_prompts(split="heldout") == heldout
    assert 0.12 < len(heldout) / len(everything) < 0.28
    assert load_prompts(split="heldout", heldout_fraction=0.0) == []
    assert load_prompts(split="train", heldout_fraction=1.0) == []


def test_comments_and_blank_lines_are_skipped(tmp_path: Path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n\nHow do tides work?\n   \n  Why is the sky blue?  \n#another\n")
    assert load_prompts(path, "all") == ["How do tides work?", "Why is the sky blue?"]
    with pytest.raises(ValueError, match="split"):
        load_prompts(path, "test")


def test_the_prompt_file_is_large_unique_short_and_neutral():
    prompts = load_prompts(split="all")
    assert len(prompts) >= 250
    assert len(set(prompts)) == len(prompts)
    assert max(map(len, prompts)) <= 120
    # a warm question invites a warm answer; the sentiment should come from the policy
    assert [p for p in prompts if abs(vader(p, "stop")) >= 0.3] == []
