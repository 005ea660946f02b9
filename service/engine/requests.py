"""What a caller hands the engine and gets back: a request with its sampling parameters, and text deltas.

`Limits` is how the engine shares itself out between callers (engine.py); `deliver` carries the deltas from
the engine thread to the callers' event loops.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from common.models import BASE
from service.engine.forward import Forward
from service.engine.grammar import Grammar
from service.settings import Settings


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: each sampled token's log-probability and the k most likely
    grammar: Grammar | None = None  # constrains the answer (structured outputs, tool calls): grammar.py


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token (decoded on its own), its log-probability, and the most likely tokens' (best first)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Limits:
    """How the engine shares itself out; the settings of the same names document each (service/settings.py)."""

    prefill_chunk: int = 256
    prefix_cache_mb: int = 256
    max_sequences_per_caller: int = 16  # 0: no cap
    max_queued_sequences: int = 256
    max_queued_per_caller: int = 64

    @classmethod
    def from_settings(cls, settings: Settings) -> "Limits":
        return cls(
            prefill_chunk=settings.prefill_chunk_tokens, prefix_cache_mb=settings.prefix_cache_mb,
            max_sequences_per_caller=settings.max_sequences_per_caller,
            max_queued_sequences=settings.max_queued_sequences, max_queued_per_caller=settings.max_queued_per_caller,
        )


@dataclass
class Delta:
    """Text for one choice; `finish_reason` is set on the choice's last event."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # the tokens sampled since the last delta, when asked for


class EngineError(RuntimeError):
    pass


class EngineBusy(RuntimeError):
    """The queue is full (for everyone, or for this caller): try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str = BASE
    n: int = 1
    id: str = ""
    owner: str | None = None  # who asked (an API key, an address): the unit of the per-caller limits
    cancelled: bool = False  # set by the event loop, read by the engine thread between steps
    _queue: asyncio.Queue | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _forward: Forward | None = field(default=None, repr=False)  # the weights it was submitted to

    def cancel(self) -> None:
        self.cancelled = True

    async def stream(self) -> AsyncIterator[Delta]:
        """Events until every choice has finished. Raises EngineError if generation failed."""
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self) -> AsyncIterator[list[Delta]]:
        """The same events, a list of all that had arrived at a time (one engine step delivers them together)."""
        remaining = self.n
        while remaining:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            batch = []
            for item in items:
                if isinstance(item, Exception):
                    raise EngineError(str(item)) from item
                remaining -= item.finish_reason is not None
                batch.append(item)
            yield batch


def deliver(events: list[tuple[GenerationRequest, Delta | Exception]]) -> None:
    """Hand events from the engine thread to their requests' queues: one call onto each event loop involved."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for request, item in events:
        by_loop.setdefault(request._loop, []).append((request._queue, item))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that event loop has closed; nobody is listening
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, Delta | Exception]]) -> None:
    for q, item in items:
        q.put_nowait(item)
