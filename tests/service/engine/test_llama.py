"""The lean Llama forward computes what transformers' forward computes, on random and on real weights."""

import asyncio
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from service.engine.batch import Rows
from service.engine.engine import Engine
from service.engine.forward import TransformersForward, make_forward
from service.engine.llama import LlamaForward, packs
from service.engine.model import load_base_model, resolve_base_model
from service.engine.requests import GenerationRequest, SamplingParams
from service.settings import Settings


def lean_logits(model: torch.nn.Module, prompts: list[list[int]], steps: list[list[int]]) -> list[torch.Tensor]:
    """Logits of a padded batch through the lean forward: after the prompts, then after each step's tokens."""
    forward = make_forward(model)
    assert isinstance(forward, LlamaForward)
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    fed = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):  # right-aligned, as the engine feeds them
        ids[row, width - len(p) :], fed[row, width - len(p) :] = torch.tensor(p), True
    rows = Rows.empty(forward, len(prompts))
    with torch.inference_mode():
        out = [rows.feed(ids, fed).float()]
        for tokens in steps:
            out.append(rows.feed(torch.tensor(tokens)[:, None], torch.ones((len(tokens), 1), dtype=torch.bool)).float())
    return out


def reference_logits(model: torch.nn.Module, prompts: list[list[int]], steps: list[list[int]]) -> list[torch.Tensor]:
    """The same logits from transformers, each row alone and unpadded, recomputed from scratch."""
    out = []
    with torch.inference_mode():
        for k in range(len(steps) + 1):
            seqs = [p + [s[row] for s in steps[:k]] for row, p in enumerate(prompts)]
            out.append(torch.stack([model(torch.tensor([s])).logits[0, -1].float() for s in seqs]))
    return out


PROMPTS = [[5, 17, 300, 42, 9, 1000, 77, 8, 12, 600, 3], [400, 2, 33]]
STEPS = [[10, 20], [30, 40], [50, 60]]


def test_lean_forward_matches_transformers_on_random_weights(tiny_model_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = reference_logits(model, PROMPTS, STEPS)
    for got, expected in zip(lean_logits(model, PROMPTS, STEPS), reference, strict=True):
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_lean_forward_in_bf16_is_as_close_to_fp32_as_transformers_in_bf16(tiny_model_dir):
    fp32 = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert packs(bf16.lm_head.weight) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    expected = reference_logits(fp32, PROMPTS, STEPS)
    lean = lean_logits(bf16, PROMPTS, STEPS)
    transformers_bf16 = reference_logits(bf16, PROMPTS, STEPS)
    for got, theirs, exact in zip(lean, transformers_bf16, expected, strict=True):
        assert (got - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-3


def test_other_models_keep_the_transformers_forward(tiny_model_dir, tmp_path):
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.attention_bias = True  # not the maths of the lean forward
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "biased")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "biased").eval()
    assert isinstance(make_forward(model), TransformersForward)


async def engine_greedy(engine: Engine, ids: list[int], max_tokens: int) -> str:
    engine.start()
    try:
        request = engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)))
        return "".join([d.text async for d in request.stream()])
    finally:
        await asyncio.to_thread(engine.stop)


def transformers_greedy(model: torch.nn.Module, ids: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    out = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
    return out


@pytest.mark.parametrize("attention_bias", [False, True])  # the lean forward, then the transformers fallback
def test_greedy_answers_match_transformers_generate(tiny_model_dir, tmp_path, attention_bias):
    model_dir = tiny_model_dir
    if attention_bias:
        config = LlamaConfig.from_pretrained(tiny_model_dir)
        config.attention_bias = True
        torch.manual_seed(0)
        model_dir = tmp_path / "biased"
        LlamaForCausalLM(config).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    base = load_base_model(Settings(base_model=model_dir, data_dir=tmp_path, dtype="float32", device="cpu"))
    assert isinstance(base.forward, TransformersForward) == attention_bias
    engine = Engine(base, max_batch_size=4, max_context=256)
    for text in ("The quick brown fox", "Once upon a time, in a land far away,"):
        ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = transformers_greedy(base.model, ids, 24, engine.eos)
        got = asyncio.run(engine_greedy(engine, ids, 24))
        assert got == base.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.real_model
def test_lean_forward_matches_transformers_on_smollm2(tmp_path_factory):
    path = resolve_base_model(Settings(data_dir=tmp_path_factory.mktemp("real-llama")))
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts, steps = [[1, 504, 3575, 282, 4649, 314], [1, 9690, 28]], [[253, 7], [30, 40]]
    expected = reference_logits(fp32, prompts, steps)
    for got, exact in zip(lean_logits(fp32, prompts, steps), expected, strict=True):
        assert torch.allclose(got, exact, atol=2e-3), (got - exact).abs().max()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    theirs = reference_logits(bf16, prompts, steps)
    for got, their, exact in zip(lean_logits(bf16, prompts, steps), theirs, expected, strict=True):
        error = (their - exact).abs().max()  # what bf16 itself costs, in transformers' own forward
        assert (got - exact).abs().max() <= 1.5 * error
        # The same best token wherever bf16 could not have swapped it: a top two closer than the error (0.02 apart
        # here, against an error of ~0.6) is a coin toss that depends on the CPU's bf16 kernels.
        best = exact.topk(2, dim=-1).values
        clear = best[:, 0] - best[:, 1] > 2 * error
        assert (got.argmax(-1) == exact.argmax(-1))[clear].all()
