"""Turning a chat request into an engine request, and engine events into OpenAI responses.

Templating and tokenising a conversation (up to the body limit, 1 MB) is CPU work: `prepare_async` runs it
in a worker thread so the event loop keeps streaming to everyone else meanwhile. Streamed chunks (formatted by
service/api/chunks.py) leave one write per engine step: every event that step handed over.
"""

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from service.api import metrics, tool_calls
from service.api.chunks import NO_LOGPROB, ChoiceStream, ChunkFormat, logprob_entries, sse
from service.api.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    FunctionCall,
    ToolCall,
    Usage,
)
from service.api.tool_calls import CallStream
from service.engine.engine import Engine
from service.engine.grammar import ANY_JSON_OBJECT, Grammar, GrammarError, Grammars
from service.engine.requests import Delta, EngineBusy, EngineError, GenerationRequest, SamplingParams, TokenLogprob
from service.errors import APIError, error_body
from service.serving.arena import MergedRequest
from service.settings import Settings
from service.store.completion_log import LoggedChoice

ToolMode = Literal["auto", "forced"]


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
    owner: str | None = None  # the caller, for the engine's per-caller limits
    tool_calls: ToolMode | None = None  # the answer may be tool calls: "auto" (or prose), "forced" (only calls)
    tool_names: frozenset[str] | None = None  # the functions a call may name

    def call_stream(self) -> CallStream:
        """A reader of one choice's text as tool calls, as strict as the request's tool_choice."""
        return CallStream(strict=self.tool_calls == "forced", names=self.tool_names)


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
    """The conversation as the chat template sees it: plain role and content, tool calls and results written in
    the model's text form (tool_calls.py), and the tools the model may call described in the system message."""
    messages = tool_calls.render_messages([
        {"role": "system" if m.role == "developer" else m.role, "content": m.text(),
         "tool_calls": [c.model_dump() for c in getattr(m, "tool_calls", None) or []]}
        for m in body.messages
    ])
    if body.tools and body.tool_choice != "none":
        tools = tool_calls.tools_system_text([t.model_dump(exclude_none=True) for t in body.tools])
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{tools}"}
        else:
            messages.insert(0, {"role": "system", "content": tools})
    return messages


def constraint(body: ChatCompletionRequest, grammars: Grammars) -> tuple[Grammar | None, ToolMode | None]:
    """The grammar the answer must follow (structured outputs, forced tool calls) and whether it may be tool calls.
    Compiling is CPU work of up to ~1 s for a large schema: this runs in prepare's worker thread."""
    choice = body.tool_choice
    if choice is not None and not body.tools and choice != "none":
        raise APIError(400, "tool_choice needs tools", "tool_choice")
    if body.tools and choice != "none":
        if body.response_format is not None and body.response_format.type != "text":
            raise APIError(400, "response_format together with tools is not supported yet: send one or the other "
                                "(or tool_choice: none)", "response_format")
        if body.logprobs:
            raise APIError(400, "logprobs together with tools is not supported yet", "logprobs")
        if choice in (None, "auto"):
            return None, "auto"
        name = None if choice == "required" else choice.function.name
        if name is not None and name not in {t.function.name for t in body.tools}:
            raise APIError(400, f"tool_choice names '{name}', which is not among the tools", "tool_choice")
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
        try:
            grammar = tool_calls.call_grammar(tools, name or choice, body.parallel_tool_calls is not False)
            return grammars.lark(grammar), "forced"
        except ValueError as exc:  # GrammarError too
            raise APIError(400, f"the tools cannot constrain an answer: {exc}", "tools") from exc
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None, None
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else ANY_JSON_OBJECT
    try:
        return grammars.json_schema(schema), None
    except GrammarError as exc:
        raise APIError(400, f"the JSON schema cannot be compiled: {exc}", "response_format.json_schema.schema") from exc


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise APIError(400, f"messages do not fit the model's chat template: {exc}", "messages") from exc
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prepare(
    body: ChatCompletionRequest, adapter: str, tokenizer: PreTrainedTokenizerBase, settings: Settings,
    max_context: int, *, grammars: Grammars, owner: str | None = None,
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
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    grammar, tool_mode = constraint(body, grammars)
    params = SamplingParams(
        max_tokens=limit or min(settings.default_max_tokens, room), temperature=body.temperature,
        top_p=body.top_p, stop=tuple(body.stop), seed=body.seed,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None, grammar=grammar,
    )
    return Prepared(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, adapter=adapter,
        messages=messages, prompt_ids=prompt_ids, params=params, n=body.n, arrived=time.perf_counter(),
        owner=owner, tool_calls=tool_mode,
        tool_names=frozenset(t.function.name for t in body.tools) if tool_mode else None,
    )


async def prepare_async(
    body: ChatCompletionRequest, adapter: str, tokenizer: PreTrainedTokenizerBase, settings: Settings,
    max_context: int, *, grammars: Grammars, owner: str | None = None,
) -> Prepared:
    """`prepare` in a worker thread; the arrival time is taken before it, so TTFT includes it."""
    arrived = time.perf_counter()
    prepared = await asyncio.to_thread(
        functools.partial(prepare, grammars=grammars, owner=owner), body, adapter, tokenizer, settings, max_context
    )
    prepared.arrived = arrived
    return prepared


def submit(engine: Engine, prepared: Prepared) -> GenerationRequest | MergedRequest:
    """Queue the request; 429 with Retry-After when the engine's queue is full (nothing is queued then)."""
    try:
        if prepared.choice_adapters:  # one engine request per version, merged into one answer with n choices
            return MergedRequest(engine.submit_all([
                GenerationRequest(prepared.prompt_ids, prepared.params, adapter=a, n=1, id=prepared.id,
                                  owner=prepared.owner)
                for a in prepared.choice_adapters
            ]))
        return engine.submit(
            GenerationRequest(
                prompt_ids=prepared.prompt_ids, params=prepared.params, adapter=prepared.adapter, n=prepared.n,
                id=prepared.id, owner=prepared.owner,
            )
        )
    except EngineBusy as exc:
        raise APIError(429, f"the server is busy: {exc}", code="engine_busy",
                       headers={"Retry-After": str(exc.retry_after_s)}) from exc


def logged_choices(
    texts: list[str], finish: list[str | None], adapters: list[str] | None,
    logprobs: list[list[TokenLogprob]] | None = None,
) -> list[LoggedChoice]:
    """What the completion log keeps of each choice: with logprobs asked for, the sampled tokens' log-probabilities
    too (the behaviour policy's, for training on served answers)."""
    return [
        LoggedChoice(index=i, text=t, finish_reason=f, adapter=adapters[i] if adapters else None,
                     logprobs=[max(x.logprob, NO_LOGPROB) for x in logprobs[i]] if logprobs is not None else None)
        for i, (t, f) in enumerate(zip(texts, finish, strict=True))
    ]


def answer_message(text: str, finish: str | None, prepared: Prepared) -> tuple[AssistantMessage, str | None]:
    """A whole choice as OpenAI's message: tool calls where the request allowed them and the text is calls (read
    as the stream reads them: a forced answer cut short at max_tokens keeps its calls, the last as far as it got)."""
    calls = None
    if prepared.tool_calls:
        stream = prepared.call_stream()
        stream.push(text)
        stream.finish()
        calls = stream.calls
    if not calls:
        return AssistantMessage(content=text), finish
    made = [ToolCall(id=tool_calls.new_call_id(), function=FunctionCall(name=name, arguments=arguments))
            for name, arguments in calls]
    return AssistantMessage(content=None, tool_calls=made), "tool_calls" if finish == "stop" else finish


async def complete(request: GenerationRequest | MergedRequest, prepared: Prepared, on_done: OnDone) -> ChatCompletion:
    texts = [""] * prepared.n
    finish: list[str | None] = [None] * prepared.n
    logprobs: list[list[TokenLogprob]] | None = None if prepared.params.logprobs is None else [[] for _ in texts]
    tokens = 0
    timing = Timing(prepared.arrived)
    try:
        async for delta in request.stream():
            if delta.text:
                timing.text()
            texts[delta.index] += delta.text
            if logprobs is not None and delta.logprobs:
                logprobs[delta.index] += delta.logprobs
            if delta.finish_reason:
                finish[delta.index] = delta.finish_reason
                tokens += delta.completion_tokens
    except EngineError as exc:
        raise APIError(500, f"generation failed: {exc}") from exc
    timing.done(tokens)
    answers = [answer_message(t, f, prepared) for t, f in zip(texts, finish, strict=True)]
    await on_done(logged_choices(texts, [f for _, f in answers], prepared.choice_adapters, logprobs))
    prompt = len(prepared.prompt_ids)
    return ChatCompletion(
        id=prepared.id, created=prepared.created, model=prepared.model, system_fingerprint=prepared.adapter,
        choices=[
            Choice(index=i, message=message, finish_reason=f,
                   logprobs={"content": logprob_entries(logprobs[i])} if logprobs is not None else None)
            for i, (message, f) in enumerate(answers)
        ],
        usage=Usage(prompt_tokens=prompt, completion_tokens=tokens, total_tokens=prompt + tokens),
    )


async def _steps(request: GenerationRequest | MergedRequest) -> AsyncIterator[list[Delta]]:
    """The request's events, grouped as they arrived: all that one engine step delivered come together."""
    if isinstance(request, GenerationRequest):
        async for batch in request.batches():
            yield batch
        return
    async for delta in request.stream():
        yield [delta]


async def stream_chunks(
    request: GenerationRequest | MergedRequest, prepared: Prepared, include_usage: bool, on_done: OnDone
) -> AsyncIterator[str]:
    """SSE lines: the role first, then content deltas, a finish_reason per choice, usage, [DONE]."""
    head = {
        "id": prepared.id, "object": "chat.completion.chunk", "created": prepared.created,
        "model": prepared.model, "system_fingerprint": prepared.adapter,
    }
    chunks = ChunkFormat(head)
    tokens = 0
    texts = [""] * prepared.n
    finish: list[str | None] = [None] * prepared.n
    logprobs: list[list[TokenLogprob]] | None = None if prepared.params.logprobs is None else [[] for _ in texts]
    timing = Timing(prepared.arrived)
    metrics.ACTIVE_STREAMS.inc()
    try:
        yield "".join(chunks.chunk(i, {"role": "assistant", "content": ""}) for i in range(prepared.n))
        calls = ([ChoiceStream(chunks, i, prepared.call_stream()) for i in range(prepared.n)]
                 if prepared.tool_calls else None)
        async for batch in _steps(request):
            out = []
            for delta in batch:
                if delta.text:
                    timing.text()
                    texts[delta.index] += delta.text
                if calls is not None:
                    out += calls[delta.index].push(delta.text) if delta.text else []
                elif delta.text or delta.logprobs:  # tokens whose text is held back come with the text they make
                    if logprobs is not None:
                        logprobs[delta.index] += delta.logprobs or []
                    out.append(chunks.content(delta.index, delta.text, delta.logprobs))
                if delta.finish_reason:
                    tokens += delta.completion_tokens
                    finish[delta.index] = delta.finish_reason
                    if calls is not None:
                        last, finish[delta.index] = calls[delta.index].finish(delta.finish_reason)
                        out += last
                    else:
                        out.append(chunks.chunk(delta.index, {}, delta.finish_reason))
            if out:
                yield "".join(out)
        # Logged before [DONE]: a client that saw the end of the stream can rate the answer at once.
        timing.done(tokens)
        await on_done(logged_choices(texts, finish, prepared.choice_adapters, logprobs))
        tail = []
        if include_usage:
            prompt = len(prepared.prompt_ids)
            usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
            tail.append(sse({**head, "choices": [], "usage": usage}))
        yield "".join([*tail, sse("[DONE]")])
    except EngineError as exc:
        yield sse(error_body(500, f"generation failed: {exc}"))
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

