"""Turning a chat request into an engine request, and engine events into OpenAI responses."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from service.api import metrics
from service.api.schemas import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, Usage
from service.engine.engine import Engine, EngineError, GenerationRequest, SamplingParams
from service.errors import APIError, error_body
from service.serving.arena import MergedRequest
from service.settings import Settings
from service.store.completion_log import LoggedChoice


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    id: str
    created: int
    model: str
    adapter: str
    messages: list[dict]  # as the chat template saw them
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    arrived: float = 0.0  # time.perf_counter() when the request was prepared
    choice_adapters: list[str] | None = None  # the arena: choice i is answered by version i


class Timing:
    """Time to first token and decode speed of one request, into the Prometheus histograms."""

    def __init__(self, arrived: float) -> None:
        self.arrived, self.first = arrived, None

    def text(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            metrics.TTFT.observe(self.first - self.arrived)

    def done(self, tokens: int) -> None:
        metrics.COMPLETION_TOKENS.inc(tokens)
        if self.first is not None and tokens > 1:
            metrics.TOKENS_PER_S.observe(tokens / max(time.perf_counter() - self.first, 1e-6))


OnDone = Callable[[list[LoggedChoice]], Awaitable[None]]


def normalise_messages(body: ChatCompletionRequest) -> list[dict]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise APIError(400, f"messages do not fit the model's chat template: {exc}", "messages") from exc
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prepare(
    body: ChatCompletionRequest, adapter: str, tokenizer: PreTrainedTokenizerBase, settings: Settings,
    max_context: int,
) -> Prepared:
    if body.n > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n}", "n")
    if len(body.stop) > settings.max_stop:
        raise APIError(400, f"at most {settings.max_stop} stop strings are allowed", "stop")
    messages = normalise_messages(body)
    prompt_ids = render_prompt(tokenizer, messages)
    room = max_context - len(prompt_ids)
    if room < 1:
        raise APIError(
            400, f"the prompt is {len(prompt_ids)} tokens; this model's context is {max_context} tokens",
            "messages", "context_length_exceeded",
        )
    limit = body.answer_limit
    if limit is not None and limit > room:
        raise APIError(
            400, f"max_tokens={limit} plus the {len(prompt_ids)}-token prompt exceeds the {max_context}-token "
            f"context (at most {room} here)", "max_tokens", "context_length_exceeded",
        )
    params = SamplingParams(
        max_tokens=limit or min(settings.default_max_tokens, room), temperature=body.temperature,
        top_p=body.top_p, stop=tuple(body.stop), seed=body.seed,
    )
    return Prepared(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, adapter=adapter,
        messages=messages, prompt_ids=prompt_ids, params=params, n=body.n, arrived=time.perf_counter(),
    )


def submit(engine: Engine, prepared: Prepared) -> GenerationRequest | MergedRequest:
    if prepared.choice_adapters:  # one engine request per version, merged into one answer with n choices
        return MergedRequest([
            engine.submit(GenerationRequest(prepared.prompt_ids, prepared.params, adapter=a, n=1, id=prepared.id))
            for a in prepared.choice_adapters
        ])
    return engine.submit(
        GenerationRequest(
            prompt_ids=prepared.prompt_ids, params=prepared.params, adapter=prepared.adapter, n=prepared.n,
            id=prepared.id,
        )
    )


def logged_choices(texts: list[str], finish: list[str | None], adapters: list[str] | None) -> list[LoggedChoice]:
    return [
        LoggedChoice(index=i, text=t, finish_reason=f, adapter=adapters[i] if adapters else None)
        for i, (t, f) in enumerate(zip(texts, finish, strict=True))
    ]


async def complete(request: GenerationRequest | MergedRequest, prepared: Prepared, on_done: OnDone) -> ChatCompletion:
    texts = [""] * prepared.n
    finish: list[str | None] = [None] * prepared.n
    tokens = 0
    timing = Timing(prepared.arrived)
    try:
        async for delta in request.stream():
            if delta.text:
                timing.text()
            texts[delta.index] += delta.text
            if delta.finish_reason:
                finish[delta.index] = delta.finish_reason
                tokens += delta.completion_tokens
    except EngineError as exc:
        raise APIError(500, f"generation failed: {exc}") from exc
    timing.done(tokens)
    await on_done(logged_choices(texts, finish, prepared.choice_adapters))
    prompt = len(prepared.prompt_ids)
    return ChatCompletion(
        id=prepared.id, created=prepared.created, model=prepared.model, system_fingerprint=prepared.adapter,
        choices=[
            Choice(index=i, message=AssistantMessage(content=t), finish_reason=f)
            for i, (t, f) in enumerate(zip(texts, finish, strict=True))
        ],
        usage=Usage(prompt_tokens=prompt, completion_tokens=tokens, total_tokens=prompt + tokens),
    )


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


async def stream_chunks(
    request: GenerationRequest | MergedRequest, prepared: Prepared, include_usage: bool, on_done: OnDone
) -> AsyncIterator[str]:
    """SSE lines: the role first, then content deltas, a finish_reason per choice, usage, [DONE]."""
    head = {
        "id": prepared.id, "object": "chat.completion.chunk", "created": prepared.created,
        "model": prepared.model, "system_fingerprint": prepared.adapter,
    }

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**head, "choices": [choice]})

    tokens = 0
    texts = [""] * prepared.n
    finish: list[str | None] = [None] * prepared.n
    timing = Timing(prepared.arrived)
    metrics.ACTIVE_STREAMS.inc()
    try:
        for i in range(prepared.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for delta in request.stream():
            if delta.text:
                timing.text()
                texts[delta.index] += delta.text
                yield chunk(delta.index, {"content": delta.text})
            if delta.finish_reason:
                tokens += delta.completion_tokens
                finish[delta.index] = delta.finish_reason
                yield chunk(delta.index, {}, delta.finish_reason)
        # Logged before [DONE]: a client that saw the end of the stream can rate the answer at once.
        timing.done(tokens)
        await on_done(logged_choices(texts, finish, prepared.choice_adapters))
        if include_usage:
            prompt = len(prepared.prompt_ids)
            usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
            yield _sse({**head, "choices": [], "usage": usage})
        yield _sse("[DONE]")
    except EngineError as exc:
        yield _sse(error_body(500, f"generation failed: {exc}"))
    finally:
        metrics.ACTIVE_STREAMS.dec()
        request.cancel()  # a no-op if it finished; stops the engine's work if the client went away


async def complete_unless_disconnected(
    request: GenerationRequest | MergedRequest, prepared: Prepared, on_done: OnDone, is_disconnected,
    poll_s: float = 0.05,
) -> ChatCompletion | None:
    """Wait for the whole answer, cancelling generation if the client goes away first."""
    task = asyncio.create_task(complete(request, prepared, on_done))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await is_disconnected():
                return None
    finally:
        request.cancel()
        task.cancel()

