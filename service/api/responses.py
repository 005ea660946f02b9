"""OpenAI's Responses API over the chat path: a request becomes a one-choice chat request, and the chat answer
(whole, or as its stream of chunks) becomes a `response` object or its stream of events.

Text in, text out, nothing kept but the completion log: `previous_response_id`, stored responses and the
fields that ask for tools or structured output are refused (unsupported.py). The event sequence is OpenAI's
(response.created, .in_progress, .output_item.added, .content_part.added, .output_text.delta..., .output_text.done,
.content_part.done, .output_item.done, then .completed, or .incomplete when max_output_tokens cut the answer),
which is what the `openai` SDK's `responses.stream` helpers assemble.
"""

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from service.api import unsupported
from service.api.schemas import ChatCompletion, ChatCompletionRequest, Role
from service.api.unsupported import UNSUPPORTED, Metadata, refuse_unless

NO_STATE = "chatloop keeps no response state; send the whole conversation as `input`"
TEXT_PARTS = ("input_text", "output_text")


class TextContent(BaseModel):
    """A text part of an input message: the caller's (input_text) or an earlier answer's (output_text)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None  # an earlier answer's, given back as it came
    logprobs: list | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") not in TEXT_PARTS:
            raise PydanticCustomError(UNSUPPORTED, "not supported yet: {what} content (only text)",
                                      {"what": value.get("type")})
        return value


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] | None = None
    role: Role
    content: str | list[TextContent]
    id: str | None = None  # an earlier answer's item, given back as it came
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _messages_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") not in (None, "message"):
            raise PydanticCustomError(UNSUPPORTED, "not supported yet: input items of type {what} (only messages)",
                                      {"what": value.get("type")})
        return value

    def chat_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: unsupported.ResponseFormat = None
    verbosity: unsupported.Null("verbosity") = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_obfuscation: bool | None = None  # no padding is sent; harmless to ignore


class ResponsesRequest(BaseModel):
    """POST /v1/responses. Unknown fields are refused (extra="forbid"), like OpenAI's own API does."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(examples=["chatloop"])] = "chatloop"
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # Harmless to ignore: labels and routing hints that change nothing in the answer.
    metadata: Metadata | None = None
    service_tier: str | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    parallel_tool_calls: bool | None = None  # without tools, nothing to parallelise
    # Not supported (yet): refused unless they ask for nothing.
    store: Annotated[Literal[False] | None, refuse_unless(lambda v: v is not True, f"store: true ({NO_STATE})")] = None
    previous_response_id: unsupported.Null(f"previous_response_id ({NO_STATE})") = None
    conversation: unsupported.Null(f"conversation ({NO_STATE})") = None
    background: Annotated[Literal[False] | None, refuse_unless(lambda v: v is not True, "background")] = None
    text: TextConfig | None = None
    tools: unsupported.Tools = None
    tool_choice: unsupported.ToolChoice = None
    reasoning: unsupported.Null("reasoning options (the model does not reason)") = None
    include: unsupported.Empty("include (extra output such as logprobs)") = None
    top_logprobs: unsupported.TopLogprobs = None
    truncation: Annotated[Literal["disabled"] | None, refuse_unless(
        lambda v: v != "auto", "truncation: auto (an input past the context is a 400)")] = None
    prompt: unsupported.Null("prompt templates") = None

    def messages(self) -> list[dict]:
        turns = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else [
            m.chat_message() for m in self.input]
        return ([{"role": "system", "content": self.instructions}] if self.instructions else []) + turns

    def chat_request(self) -> ChatCompletionRequest:
        """The one-choice chat request that answers this one."""
        return ChatCompletionRequest(
            model=self.model, messages=self.messages(), temperature=self.temperature, top_p=self.top_p, n=1,
            max_tokens=self.max_output_tokens, stream=self.stream, user=self.user,
        )


def new_ids() -> tuple[str, str]:
    """A response id (logged as the completion id, so feedback names it) and its message's id."""
    return f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"


def _usage(prompt: int, completion: int) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


class ResponseBuilder:
    """The `response` object of one request, at each stage of its life."""

    def __init__(self, body: ResponsesRequest, response_id: str, message_id: str, created: int) -> None:
        self.body, self.id, self.message_id, self.created = body, response_id, message_id, created

    def message(self, text: str, status: str) -> dict:
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status,
                "content": [self.part(text)] if status != "in_progress" or text else []}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def response(self, status: str, output: list[dict], usage: dict | None = None, error: dict | None = None) -> dict:
        b = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": b.model,
            "output": output, "parallel_tool_calls": bool(b.parallel_tool_calls), "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": b.temperature,
            "text": {"format": {"type": "text"}}, "tool_choice": b.tool_choice or "auto", "tools": [],
            "top_p": b.top_p, "truncation": "disabled", "usage": usage, "user": b.user, "metadata": b.metadata or {},
        }

    def finished(self, text: str, finish_reason: str | None, usage: dict) -> dict:
        """The whole response: `incomplete` when the answer reached max_output_tokens (OpenAI's status for it)."""
        status = "incomplete" if finish_reason == "length" else "completed"
        return self.response(status, [self.message(text, status)], usage)


def from_chat(builder: ResponseBuilder, chat: ChatCompletion) -> dict:
    choice = chat.choices[0]
    return builder.finished(choice.message.content, choice.finish_reason,
                            _usage(chat.usage.prompt_tokens, chat.usage.completion_tokens))


def _chat_events(sse: str) -> list[dict | str]:
    """The JSON payloads (or "[DONE]") of a piece of completions.stream_chunks' output."""
    events = []
    for line in sse.split("\n"):
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def stream_events(builder: ResponseBuilder, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Responses API events from a one-choice chat stream (with usage). The chat stream logs the answer before its
    end, so a client that saw response.completed can rate it at once. Ends with `data: [DONE]`, which the SDKs
    read as the end of the stream, as they do for chat."""
    sequence = 0

    def event(kind: str, **fields) -> str:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    item = {"item_id": builder.message_id, "output_index": 0}
    text, finish, usage = "", None, None
    # Closing the chat stream cancels the generation: a client that leaves at any yield, the first included,
    # stops the engine's work on its answer.
    async with contextlib.aclosing(chunks):
        yield (event("response.created", response=builder.response("in_progress", []))
               + event("response.in_progress", response=builder.response("in_progress", []))
               + event("response.output_item.added", output_index=0, item=builder.message("", "in_progress"))
               + event("response.content_part.added", **item, content_index=0, part=builder.part("")))
        async for piece in chunks:
            out = []
            for chunk in _chat_events(piece):
                if chunk == "[DONE]":
                    continue
                if "error" in chunk:
                    error = {"code": "server_error", "message": chunk["error"]["message"]}
                    out.append(event("response.failed", response=builder.response("failed", [], error=error)))
                    continue
                if chunk.get("usage"):
                    usage = _usage(chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"])
                for choice in chunk["choices"]:
                    delta = choice["delta"].get("content")
                    if delta:
                        text += delta
                        out.append(event("response.output_text.delta", **item, content_index=0, delta=delta,
                                         logprobs=[]))
                    finish = choice["finish_reason"] or finish
            if out:
                yield "".join(out)
    if usage is None:  # the chat stream failed (response.failed went out) or was cut short
        yield "data: [DONE]\n\n"
        return
    done = builder.finished(text, finish, usage)
    message = done["output"][0]
    yield (event("response.output_text.done", **item, content_index=0, text=text, logprobs=[])
           + event("response.content_part.done", **item, content_index=0, part=builder.part(text))
           + event("response.output_item.done", output_index=0, item=message)
           + event(f"response.{done['status']}", response=done)
           + "data: [DONE]\n\n")
