"""Constrained decoding in the engine: a random model, so only the grammar can make its answers valid."""

import asyncio
import json

import jsonschema
import pytest
import torch

from service.engine.engine import Engine
from service.engine.grammar import GrammarError, Grammars, Masks
from service.engine.model import load_base_model
from service.engine.requests import GenerationRequest, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["happy", "sad", "calm"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["mood", "score", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.fixture
def base(tiny_settings):
    return load_base_model(tiny_settings)


@pytest.fixture
async def engine(base):
    engine = Engine(base, max_batch_size=16, max_context=512)
    engine.start()
    yield engine
    await asyncio.to_thread(engine.stop)


def ids(base, text: str) -> list[int]:
    return base.tokenizer(text, add_special_tokens=False)["input_ids"]


async def answers(engine: Engine, prompt: list[int], n: int = 1, **params) -> tuple[list[str], list[str], list]:
    params = {"max_tokens": 120, "temperature": 1.0, "seed": 7} | params
    request = engine.submit(GenerationRequest(prompt, SamplingParams(**params), n=n))
    texts, finishes, scores = [""] * n, [None] * n, [[] for _ in range(n)]
    async for delta in request.stream():
        texts[delta.index] += delta.text
        finishes[delta.index] = delta.finish_reason or finishes[delta.index]
        scores[delta.index] += delta.logprobs or []
    return texts, finishes, scores


async def test_every_choice_of_a_random_model_matches_the_schema(engine, base):
    grammar = engine.grammars.json_schema(SCHEMA)
    texts, finishes, _ = await answers(engine, ids(base, "Describe your day"), n=6, grammar=grammar)
    for text, finish in zip(texts, finishes, strict=True):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1  # each choice samples on its own copy of the matcher


async def test_greedy_rows_follow_the_grammar_too(engine, base):
    grammar = engine.grammars.json_schema(SCHEMA)
    texts, _, _ = await answers(engine, ids(base, "Hello"), temperature=0.0, grammar=grammar)
    jsonschema.validate(json.loads(texts[0]), SCHEMA)


async def test_a_constrained_neighbour_changes_nothing_in_a_free_answer(engine, base):
    free = ids(base, "Tell me a story")
    alone = await answers(engine, free, max_tokens=30)
    grammar = engine.grammars.json_schema(SCHEMA)
    together = await asyncio.gather(
        answers(engine, free, max_tokens=30), answers(engine, ids(base, "JSON please"), n=3, grammar=grammar)
    )
    assert together[0] == alone
    for text in together[1][0]:
        jsonschema.validate(json.loads(text), SCHEMA)


async def test_logprobs_of_a_constrained_answer_come_from_the_masked_distribution(engine, base):
    grammar = engine.grammars.json_schema({"enum": ["yes", "no"]})
    texts, _, scores = await answers(engine, ids(base, "Well?"), grammar=grammar, logprobs=5)
    assert json.loads(texts[0]) in ("yes", "no")
    first = scores[0][0]
    assert first.token == '"' and first.logprob == pytest.approx(0.0, abs=1e-5)  # the only token allowed
    assert all(value == float("-inf") for _, value in first.top[1:])


def test_a_schema_llguidance_cannot_compile_is_a_grammar_error(base):
    grammars = Grammars(base.tokenizer)
    with pytest.raises(GrammarError, match="strin"):
        grammars.json_schema({"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(GrammarError):
        grammars.lark("start: undefined_rule")


def test_masks_set_exactly_the_refused_tokens_to_minus_infinity(base):
    grammars = Grammars(base.tokenizer)
    matcher = grammars.json_schema({"enum": ["yes"]}).matcher()
    vocab = grammars.lltok.vocab_size
    logits = torch.zeros((2, vocab + 5))  # a head wider than the tokenizer: the extra tokens are refused
    Masks(vocab).apply(logits, [1], [matcher])
    assert torch.equal(logits[0], torch.zeros(vocab + 5))  # an unconstrained row is untouched
    allowed = (logits[1] == 0).nonzero().squeeze(-1).tolist()
    assert [base.tokenizer.decode([t]) for t in allowed] == ['"']
    assert bool((logits[1, vocab:] == float("-inf")).all())
