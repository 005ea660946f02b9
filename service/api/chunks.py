"""A streamed chat completion's SSE events: `chat.completion.chunk`s, and tool calls as OpenAI streams them."""

import json

from service.api import tool_calls
from service.engine.requests import TokenLogprob

NO_LOGPROB = -9999.0  # what OpenAI reports for a token that could not be sampled (JSON has no -inf)


def logprob_entries(tokens: list[TokenLogprob]) -> list[dict]:
    """The engine's token log-probabilities as OpenAI's `logprobs.content` entries."""

    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": max(logprob, NO_LOGPROB), "bytes": list(token.encode())}

    return [one(t.token, t.logprob) | {"top_logprobs": [one(*alt) for alt in t.top]} for t in tokens]


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


class ChunkFormat:
    """`chat.completion.chunk` SSE events of one request: the fields every chunk repeats are serialised once,
    so a token costs one string encode and one format, not a dict and a whole json.dumps."""

    def __init__(self, head: dict) -> None:
        self.head = head
        self.prefix = "data: " + json.dumps(head, separators=(",", ":"))[:-1] + ',"choices":[{"index":'

    def content(self, index: int, text: str, logprobs: list[TokenLogprob] | None = None) -> str:
        scores = "null" if logprobs is None else json.dumps({"content": logprob_entries(logprobs), "refusal": None})
        return (f'{self.prefix}{index},"delta":{{"content":{json.dumps(text)}}},"logprobs":{scores},'
                f'"finish_reason":null}}]}}\n\n')

    def chunk(self, index: int, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse({**self.head, "choices": [choice]})


class ChoiceStream:
    """One choice's SSE chunks when it may be tool calls: its text goes through a tool_calls.CallStream, and the
    calls leave as OpenAI streams them (the id and name first, then the arguments in pieces)."""

    def __init__(self, chunks: ChunkFormat, index: int, calls: tool_calls.CallStream) -> None:
        self.chunks, self.index, self.calls = chunks, index, calls

    def push(self, text: str) -> list[str]:
        return self._chunks(self.calls.push(text))

    def finish(self, reason: str) -> tuple[list[str], str]:
        """The last chunks, and the choice's finish_reason: "tool_calls" where it ended after calls."""
        out = self._chunks(self.calls.finish())
        reason = "tool_calls" if self.calls.calls and reason == "stop" else reason
        return [*out, self.chunks.chunk(self.index, {}, reason)], reason

    def _chunks(self, events: list) -> list[str]:
        out = []
        for event in events:
            if isinstance(event, tool_calls.Content):
                out.append(self.chunks.content(self.index, event.text))
            elif isinstance(event, tool_calls.CallStart):
                call = {"index": event.index, "id": tool_calls.new_call_id(), "type": "function",
                        "function": {"name": event.name, "arguments": ""}}
                out.append(self.chunks.chunk(self.index, {"tool_calls": [call]}))
            else:
                call = {"index": event.index, "function": {"arguments": event.fragment}}
                out.append(self.chunks.chunk(self.index, {"tool_calls": [call]}))
        return out
