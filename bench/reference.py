"""What the serving benchmark compares chatloop with, measured in the same run on the same cores.

transformers' `generate()` in bf16 on the base model (the issue's reference): C prompts as one left-padded
batch, sampled at temperature 1 with top_k and top_p off, up to 128 new tokens; a row's tokens count up to
its end of sequence. And llama.cpp on the same GGUF, one stream, when llama-cpp-python is installed.
"""

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.sse_client import Sample
from common.models import eos_token_ids
from service.engine.model import default_gguf_path, resolve_base_model
from service.settings import Settings


def chat_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [
        tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=False), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]


def generate_reference(settings: Settings, prompts: list[str], concurrency: int, max_tokens: int,
                       seconds: float) -> tuple[list[Sample], float]:
    """Batches of `concurrency` prompts through generate() until `seconds` passed (two batches at least).

    Returns one Sample per row (no per-token stamps: generate() hands everything back at the end) and the
    wall time.
    """
    path = resolve_base_model(settings)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    eos = eos_token_ids(model, tokenizer)
    ids = chat_ids(tokenizer, prompts)
    with torch.inference_mode():
        _generate(model, tokenizer, ids[:2], 8, eos, 0)  # first call: allocations, kernel choices
        samples, started, batches = [], time.perf_counter(), 0
        while batches < 2 or time.perf_counter() - started < seconds:
            rows = [ids[(batches * concurrency + i) % len(ids)] for i in range(concurrency)]
            samples += _generate(model, tokenizer, rows, max_tokens, eos, seed=batches)
            batches += 1
    return samples, time.perf_counter() - started


def _generate(model, tokenizer, rows: list[list[int]], max_tokens: int, eos: set[int], seed: int) -> list[Sample]:
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    torch.manual_seed(seed)
    started = time.perf_counter()
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=True, temperature=1.0,
        top_k=0, top_p=1.0, pad_token_id=pad,
    )
    ended = time.perf_counter()
    samples = []
    for row in out[:, width:].tolist():
        tokens = next((i for i, t in enumerate(row) if t in eos), len(row))
        samples.append(Sample(started=started, stamps=[ended], tokens=tokens))
    return samples


def llama_cpp_reference(settings: Settings, prompts: list[str], max_tokens: int, seconds: float) -> list[Sample] | None:
    """One stream through llama.cpp on the same GGUF and chat-templated tokens; None without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(settings))
    ids = chat_ids(tokenizer, prompts)
    llm = Llama(model_path=str(default_gguf_path()), n_threads=2, n_ctx=1024, verbose=False)
    eos = {llm.token_eos(), *tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])}

    def stream(i: int, limit: int) -> Sample:
        llm.reset()  # no prefix reuse between requests
        llm.set_seed(i)
        sample = Sample(started=time.perf_counter())
        for token in llm.generate(ids[i % len(ids)], temp=1.0, top_k=0, top_p=1.0, min_p=0.0):
            if token in eos:
                break
            sample.stamps.append(time.perf_counter())
            if len(sample.stamps) == limit:
                break
        sample.tokens = len(sample.stamps)
        return sample

    stream(0, 16)  # the first call allocates buffers and pages the weights in
    samples, started = [], time.perf_counter()
    while len(samples) < 2 or time.perf_counter() - started < seconds:
        samples.append(stream(len(samples), max_tokens))
    return samples
