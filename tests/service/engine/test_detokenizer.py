import pytest
from transformers import AutoTokenizer

from service.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def stream(tokenizer, text: str, stop: list[str] | None = None) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        pieces.append(detok.push(token))
        if detok.stopped:
            return pieces, detok
    pieces.append(detok.flush())
    return pieces, detok


TEXTS = ["Hello, world!", "Ça coûte 5 € — d'accord? 😊👍🏽 日本語のテキスト", "  two  spaces\n\nnew"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_full_decode(tokenizer, text):
    pieces, _ = stream(tokenizer, text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_cuts_the_answer_before_it(tokenizer):
    pieces, detok = stream(tokenizer, "The answer is 42. Question: next one", stop=["Question:"])
    assert detok.stopped
    assert "".join(pieces) == "The answer is 42. "


def test_stop_string_split_across_tokens_is_never_shown(tokenizer):
    assert len(tokenizer("hello STOPPER tail", add_special_tokens=False)["input_ids"]) > 3
    pieces, detok = stream(tokenizer, "hello STOPPER tail", stop=["STOPPER"])
    assert detok.stopped and "".join(pieces) == "hello "
    assert all("ST" not in p for p in pieces)


def test_held_back_prefix_is_released_when_no_stop_follows(tokenizer):
    pieces, detok = stream(tokenizer, "wait for it: STOP", stop=["STOPPED"])
    assert not detok.stopped
    assert "".join(pieces) == "wait for it: STOP"


def test_earliest_of_several_stops_wins(tokenizer):
    pieces, _ = stream(tokenizer, "one two three four", stop=["four", "two"])
    assert "".join(pieces) == "one "
