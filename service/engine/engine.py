"""The generation engine: one per process, owning the model, batching every request in flight.

A single thread runs the decode loop so model code never blocks the event loop. Between decode steps
it admits new requests (one batched prefill per adapter, then their rows join the running batch) and
drops finished or cancelled ones: continuous batching over a KV cache. Sequences are grouped by
adapter; each group is one batch decoded with that adapter's merged weights (lora.py says why).
Results go back to the event loop once per step through asyncio queues.
"""

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from common.models import BASE, eos_token_ids
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.kv_cache import BatchCache
from service.engine.model import BaseModel
from service.engine.sampling import sample
from service.engine.threads import ThreadTuner

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Delta:
    """Text for one choice; `finish_reason` is set on the choice's last event."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


class EngineError(RuntimeError):
    pass


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str = BASE
    n: int = 1
    id: str = ""
    cancelled: bool = False  # set by the event loop, read by the engine thread between steps
    _queue: asyncio.Queue | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    def cancel(self) -> None:
        self.cancelled = True

    async def stream(self) -> AsyncIterator[Delta]:
        """Events until every choice has finished. Raises EngineError if generation failed."""
        remaining = self.n
        while remaining:
            item = await self._queue.get()
            if isinstance(item, Exception):
                raise EngineError(str(item)) from item
            if item.finish_reason is not None:
                remaining -= 1
            yield item


@dataclass
class _Sequence:
    request: GenerationRequest
    index: int
    detok: IncrementalDetokenizer
    generator: torch.Generator
    generated: int = 0


class _Batch:
    """Rows decoded together with one adapter: right-aligned, left-padded, sharing one KV cache.

    Row r's first pad[r] cache columns are padding; its next token goes in column `cache.length` at
    position `cache.length - pad[r]`. The attention mask and positions follow from `pad` in two small
    ops per step, so nothing but the cache grows as the answer does.
    """

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        self.model = model
        self.cache = BatchCache(num_layers)
        self.seqs: list[_Sequence] = []
        self.pad = torch.zeros(0, dtype=torch.long)  # (B,) left-padding columns of each row
        self.last = torch.zeros(0, dtype=torch.long)  # (B,) token to feed next
        self.temperature = torch.zeros(0)  # (B,) sampling parameters, kept in step with the rows
        self.top_p = torch.zeros(0)  # (B,)
        # Without padding transformers drops the mask, and sdpa without one takes its enable_gqa path:
        # 5-10x slower on CPU for a one-token query than the path it takes with a mask (1 stream: 30 vs
        # 47 tokens/s). A ready 4D boolean mask also skips transformers' mask building. Eager attention
        # wants a float mask of its own making, so other kinds get the plain (B, T) one.
        self.mask_4d = model.config._attn_implementation == "sdpa"

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=self.cache,
            use_cache=True, logits_to_keep=1,
        )
        return out.logits[:, -1]  # (B, V)

    def decode_step(self) -> torch.Tensor:
        """Feed every row its last token; the next-token logits (B, V)."""
        length = self.cache.length
        mask = torch.arange(length + 1, device=self.pad.device) >= self.pad[:, None]  # (B, T) True = real token
        if self.mask_4d:
            mask = mask[:, None, None, :]  # (B, 1, 1, T): one query row, shared by all heads
        return self.forward(self.last[:, None], mask, (length - self.pad)[:, None])

    def merge(self, other: "_Batch") -> None:
        if not self.seqs:
            self.cache, self.seqs, self.pad, self.last = other.cache, other.seqs, other.pad, other.last
            self.temperature, self.top_p = other.temperature, other.top_p
            return
        t = max(self.cache.length, other.cache.length)
        self.pad = torch.cat([self.pad + t - self.cache.length, other.pad + t - other.cache.length])
        self.cache.merge(other.cache)
        self.last = torch.cat([self.last, other.last])
        self.temperature = torch.cat([self.temperature, other.temperature])
        self.top_p = torch.cat([self.top_p, other.top_p])
        self.seqs += other.seqs

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.pad.device)
        pad = self.pad[index]
        # Columns that are padding in every remaining row are dead weight: drop them.
        drop = int(pad.min()) if len(rows) else 0
        self.cache.select(index, drop_left=drop)
        self.pad = pad - drop
        self.last, self.temperature, self.top_p = self.last[index], self.temperature[index], self.top_p[index]
        self.seqs = [self.seqs[i] for i in rows]


class Engine:
    def __init__(self, base: BaseModel, max_batch_size: int = 32, max_context: int = 2048) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        self.max_batch_size = max_batch_size
        self.max_context = min(max_context, base.max_positions)
        self.eos = eos_token_ids(base.model, base.tokenizer)
        self.num_layers = base.model.config.num_hidden_layers
        self._weights: dict[str, torch.nn.Module] = {BASE: base.model}
        self._batches: dict[str, _Batch] = {}
        self._inbox: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._waiting: list[GenerationRequest] = []
        self._outbox: list[tuple[GenerationRequest, Delta | Exception]] = []
        self._thread: threading.Thread | None = None
        self._seed = itertools.count(int(time.time_ns() % 2**31))
        self._threads = torch.get_num_threads()  # the most the engine thread uses (see ThreadTuner)
        self.steps = 0  # decode steps run, for metrics and tests

    # ---- called from the event loop / other threads ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chatloop-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def adapters(self) -> list[str]:
        return list(self._weights)

    def add_adapter(self, name: str, model: torch.nn.Module) -> None:
        """Register a model (from BaseModel.with_adapter) under a name; running rows keep theirs."""
        self._weights[name] = model

    def remove_adapter(self, name: str) -> None:
        """New requests can no longer name it; batches already using it finish with it."""
        if name != BASE:
            self._weights.pop(name, None)

    def active_sequences(self) -> int:
        return sum(len(b.seqs) for b in self._batches.values())

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        if request.adapter not in self._weights:
            raise KeyError(request.adapter)
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        request._loop = asyncio.get_running_loop()
        request._queue = asyncio.Queue()
        self._inbox.put(request)
        return request

    # ---- the engine thread ----

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        tuner = ThreadTuner(self._threads)
        with torch.inference_mode():
            while True:
                if not self._batches and not self._waiting:
                    item = self._inbox.get()  # idle: sleep until work arrives
                    if item is None:
                        return
                    self._waiting.append(item)
                if not self._drain_inbox():
                    return
                self._admit()
                rows, started = self.active_sequences(), time.perf_counter()
                for name in list(self._batches):
                    self._guarded(name, self._decode)
                if rows:
                    tuner.observe(time.perf_counter() - started, rows)
                self._flush()

    def _drain_inbox(self) -> bool:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            self._waiting.append(item)

    def _guarded(self, name: str, step) -> None:
        """Run one step for a group; a failure ends that group's requests with an error, not the engine."""
        try:
            step(name)
        except Exception as exc:
            log.exception("generation step failed for adapter %s", name)
            batch = self._batches.pop(name, None)
            for request in {id(s.request): s.request for s in (batch.seqs if batch else [])}.values():
                self._outbox.append((request, exc))

    def _admit(self) -> None:
        room = self.max_batch_size - self.active_sequences()
        admitted: dict[str, list[GenerationRequest]] = {}
        still_waiting = []
        for request in self._waiting:
            if request.cancelled:
                continue
            if request.n <= room or (room == self.max_batch_size and not admitted):
                admitted.setdefault(request.adapter, []).append(request)
                room -= request.n
            else:
                still_waiting.append(request)
        self._waiting = still_waiting
        for adapter, requests in admitted.items():
            try:
                self._prefill(adapter, requests)
            except Exception as exc:
                log.exception("prefill failed for adapter %s", adapter)
                self._outbox.extend((r, exc) for r in requests)

    def _prefill(self, adapter: str, requests: list[GenerationRequest]) -> None:
        model = self._weights.get(adapter) or self._batches[adapter].model
        device = self.base.device
        t = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), t), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(requests), t), dtype=torch.long)
        for row, request in enumerate(requests):
            ids[row, t - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, t - len(request.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        new = _Batch(model, self.num_layers)
        logits = new.forward(ids.to(device), mask.to(device), positions.to(device))  # (R, V)
        # n > 1: every choice shares the prompt's prefill.
        repeats = torch.tensor([r.n for r in requests], device=device)
        new.cache.repeat_rows(repeats)
        choices = [r for r in requests for _ in range(r.n)]
        new.pad = torch.tensor([t - len(r.prompt_ids) for r in choices], dtype=torch.long, device=device)
        new.temperature = torch.tensor([r.params.temperature for r in choices], device=device)
        new.top_p = torch.tensor([r.params.top_p for r in choices], device=device)
        new.seqs = [self._sequence(r, i) for r in requests for i in range(r.n)]
        self._sample_and_emit(new, logits.repeat_interleave(repeats, dim=0))
        if not new.seqs:
            return
        if adapter in self._batches:
            self._batches[adapter].merge(new)
        else:
            self._batches[adapter] = new

    def _sequence(self, request: GenerationRequest, index: int) -> _Sequence:
        seed = request.params.seed + index if request.params.seed is not None else next(self._seed)
        return _Sequence(
            request=request,
            index=index,
            detok=IncrementalDetokenizer(self.tokenizer, list(request.params.stop)),
            generator=torch.Generator().manual_seed(seed),
        )

    def _decode(self, name: str) -> None:
        batch = self._batches[name]
        live = [i for i, s in enumerate(batch.seqs) if not s.request.cancelled]
        if len(live) < len(batch.seqs):
            batch.keep(live)
        if not batch.seqs:
            del self._batches[name]
            return
        logits = batch.decode_step()
        self.steps += 1
        self._sample_and_emit(batch, logits)
        if not batch.seqs:
            del self._batches[name]

    def _sample_and_emit(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Pick the next token of every row, stream its text, and drop rows that finished."""
        tokens = sample(logits, batch.temperature, batch.top_p, [s.generator for s in batch.seqs])  # (B,)
        batch.last = tokens
        keep = []
        for row, (seq, token) in enumerate(zip(batch.seqs, tokens.tolist(), strict=True)):
            finish = None
            if token in self.eos:
                finish, text = "stop", seq.detok.flush()
            else:
                seq.generated += 1
                text = seq.detok.push(token)
                if seq.detok.stopped:
                    finish = "stop"
                elif seq.generated >= seq.request.params.max_tokens or (
                    len(seq.request.prompt_ids) + seq.generated >= self.max_context
                ):
                    finish, text = "length", text + seq.detok.flush()
            if text or finish:
                self._outbox.append((seq.request, Delta(seq.index, text, finish, seq.generated)))
            if finish is None:
                keep.append(row)
        if len(keep) < len(batch.seqs):
            batch.keep(keep)

    def _flush(self) -> None:
        """Hand this step's events to the event loop in one call."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request, item in self._outbox:
            by_loop.setdefault(request._loop, []).append((request._queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that event loop has closed; nobody is listening
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue, Delta | Exception]]) -> None:
    for q, item in items:
        q.put_nowait(item)
