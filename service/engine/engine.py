"""The generation engine: one per process, owning the model, batching every request in flight.

A single thread runs the loop so model code never blocks the event loop. Each turn of the loop it spends at
most `prefill_chunk` prompt tokens on prefill (requests that start like a recent prompt or answer continue
from its cached keys and values, prefix_cache.py; a long prompt is prefilled a chunk per turn), then runs one
decode step for every group of rows, then hands the new text to the event loop: continuous batching over a KV
cache, where a long prompt joining delays running streams by one chunk at most. Rows are grouped by the
weights that serve them (forward.py; lora.py says why each adapter has its own merged weights).

Fairness: a caller (GenerationRequest.owner) gets at most `max_sequences_per_caller` rows at once, others
are admitted past its waiting requests; the queue of waiting sequences is bounded, overall and per caller,
and `submit` refuses (EngineBusy) rather than queue past it.
"""

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import llguidance
import torch

from common.models import BASE, eos_token_ids
from service.engine.batch import Rows
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.forward import Forward, make_forward
from service.engine.grammar import Grammars, Masks
from service.engine.logprobs import sampled_logprobs
from service.engine.model import BaseModel
from service.engine.prefill import Cohort, plan_cohorts
from service.engine.prefix_cache import PrefixCache
from service.engine.requests import Delta, EngineBusy, GenerationRequest, Limits, TokenLogprob, deliver
from service.engine.sampling import sample
from service.engine.threads import ThreadTuner
from service.settings import get_settings

log = logging.getLogger(__name__)

# While rows decode, a turn's prefill is sized to take about this long at the measured prefill rate, so a
# running stream waits about this plus one decode step for its next token, however loaded the machine is.
CHUNK_TARGET_S = 0.06
MIN_CHUNK = 16


@dataclass
class _Sequence:
    request: GenerationRequest
    index: int
    detok: IncrementalDetokenizer
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # sampled so far; all but the last are in the cache
    logprobs: list[TokenLogprob] = field(default_factory=list)  # sampled since the last delta, when asked for
    matcher: llguidance.LLMatcher | None = None  # the request's grammar, where it has one (grammar.py)


class Engine:
    def __init__(
        self, base: BaseModel, max_batch_size: int = 32, max_context: int = 2048, limits: Limits | None = None
    ) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        self.max_batch_size = max_batch_size
        self.max_context = min(max_context, base.max_positions)
        self.limits = limits or Limits.from_settings(get_settings())
        self.eos = eos_token_ids(base.model, base.tokenizer)
        self._base_forward = base.forward or make_forward(base.model)
        self._forwards: dict[str, Forward] = {BASE: self._base_forward}
        self.prefixes = PrefixCache(self.limits.prefix_cache_mb * 2**20)
        self.grammars = Grammars(self.tokenizer)
        self._masks: Masks | None = None  # made on the first constrained step
        self._groups: dict[int, Rows] = {}  # forward serial -> the rows decoding with it
        self._prefilling: list[Cohort] = []  # prompts part-way through a chunked prefill, oldest first
        self._inbox: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._waiting: list[GenerationRequest] = []
        self._queued = Counter()  # owner -> sequences submitted and not yet admitted ("" counts everyone)
        self._queue_lock = threading.Lock()
        self._outbox: list[tuple[GenerationRequest, Delta | Exception]] = []
        self._thread: threading.Thread | None = None
        self._seed = itertools.count(int(time.time_ns() % 2**31))
        self._threads = torch.get_num_threads()  # the most the engine thread uses (see ThreadTuner)
        self.steps = 0  # decode steps run, for metrics and tests
        self._prefill_rate: float | None = None  # prompt tokens per second, a moving average

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
        return list(self._forwards)

    def add_adapter(self, name: str, model: torch.nn.Module) -> None:
        """Serve a model (from BaseModel.with_adapter) under a name; rows already running keep their weights."""
        forward = getattr(model, "chatloop_forward", None) or make_forward(model, self._base_forward)
        self.remove_adapter(name)
        self._forwards[name] = forward

    def remove_adapter(self, name: str) -> None:
        """New requests can no longer name it; rows already using it finish with it."""
        if name != BASE and (forward := self._forwards.pop(name, None)) is not None:
            self.prefixes.drop(forward.serial)

    def active_sequences(self) -> int:
        return sum(len(rows) for rows in list(self._groups.values()))  # a copy: the engine thread changes it

    def queued_sequences(self) -> int:
        return self._queued[""]

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Queue a request; KeyError for an unknown adapter, EngineBusy when the queue is full."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """Queue every request or none (EngineBusy when they do not all fit the queue's limits)."""
        for request in requests:
            if request.adapter not in self._forwards:
                raise KeyError(request.adapter)
            if not request.prompt_ids:
                raise ValueError("empty prompt")
        wanted = Counter()
        for request in requests:
            wanted[""] += request.n
            if request.owner is not None:
                wanted[request.owner] += request.n
        with self._queue_lock:
            for owner, n in wanted.items():
                limit = self.limits.max_queued_sequences if owner == "" else self.limits.max_queued_per_caller
                if self._queued[owner] + n > limit:
                    who = "sequences are" if owner == "" else "of your sequences are"
                    raise EngineBusy(f"{self._queued[owner]} {who} waiting; try again shortly", 1)
            self._queued.update(wanted)
        loop = asyncio.get_running_loop()
        for request in requests:
            request._forward = self._forwards[request.adapter]
            request._loop, request._queue = loop, asyncio.Queue()
            self._inbox.put(request)
        return requests

    # ---- the engine thread ----

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        tuner = ThreadTuner(self._threads)
        with torch.inference_mode():
            while True:
                if not self._groups and not self._waiting and not self._prefilling:
                    item = self._inbox.get()  # idle: sleep until work arrives
                    if item is None:
                        return
                    self._waiting.append(item)
                if not self._drain_inbox():
                    return
                self._prefill()
                rows, started = self.active_sequences(), time.perf_counter()
                for serial in list(self._groups):
                    self._guarded_decode(serial)
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

    def _guarded_decode(self, serial: int) -> None:
        """One decode step for a group; a failure ends that group's requests with an error, not the engine."""
        try:
            self._decode(serial)
        except Exception as exc:
            log.exception("decode step failed")
            rows = self._groups.pop(serial, None)
            for request in {id(s.request): s.request for s in (rows.seqs if rows else [])}.values():
                self._outbox.append((request, exc))

    def _dequeue(self, request: GenerationRequest) -> None:
        with self._queue_lock:
            self._queued[""] -= request.n
            if request.owner is not None:
                self._queued[request.owner] -= request.n
                if self._queued[request.owner] <= 0:
                    del self._queued[request.owner]

    def _in_flight(self) -> Counter:
        """Sequences admitted and not finished, per owner ("" counts everyone)."""
        counts = Counter()
        requests = [s.request for rows in self._groups.values() for s in rows.seqs]
        requests += [r for c in self._prefilling for r in c.requests for _ in range(r.n)]
        for request in requests:
            counts[""] += 1
            if request.owner is not None:
                counts[request.owner] += 1
        return counts

    def _admissible(self, request: GenerationRequest, counts: Counter) -> bool:
        """Whether `request` may take rows now: room in the batch, and its owner under the per-caller cap.

        A request that could never fit (n over a cap) goes in alone when nothing else holds the rows.
        """
        room = request.n <= self.max_batch_size - counts[""] or counts[""] == 0
        cap = self.limits.max_sequences_per_caller
        mine = counts[request.owner] if request.owner is not None else 0
        fair = request.owner is None or not cap or request.n <= cap - mine or mine == 0
        return room and fair

    def _chunk(self) -> int:
        """This turn's prefill budget: the whole chunk when nothing decodes, else what fits CHUNK_TARGET_S."""
        if not self._groups or self._prefill_rate is None:
            return self.limits.prefill_chunk
        return int(min(self.limits.prefill_chunk, max(MIN_CHUNK, self._prefill_rate * CHUNK_TARGET_S)))

    def _prefill(self) -> None:
        """Spend at most one chunk of prompt tokens: on prompts part-way through first (half the chunk when
        others wait, so a long prompt does not hold up every short one behind it), then on new ones."""
        budget = self._chunk()
        continuing = budget // 2 if self._waiting else budget
        for cohort in list(self._prefilling):
            if all(r.cancelled for r in cohort.requests):
                self._prefilling.remove(cohort)
            elif continuing > 0:
                cost = self._feed(cohort, continuing)
                continuing, budget = continuing - cost, budget - cost
        if budget <= 0 or not self._waiting:
            return
        counts, admitted, waiting = self._in_flight(), [], []
        for request in self._waiting:
            if request.cancelled:
                self._dequeue(request)
            elif self._admissible(request, counts):
                admitted.append(request)
                counts[""] += request.n
                if request.owner is not None:
                    counts[request.owner] += request.n
            else:
                waiting.append(request)
        cohorts, left = plan_cohorts(admitted, self.prefixes, budget)
        self._waiting = left + waiting  # admitted but past this turn's budget: first in line next turn
        for cohort in cohorts:
            for request in cohort.requests:
                self._dequeue(request)
            self._prefilling.append(cohort)
            budget -= self._feed(cohort, budget)

    def _feed(self, cohort: Cohort, budget: int) -> int:
        """One chunk of `cohort`'s prompts (at most `budget` tokens); returns the tokens it cost. A failure ends
        the cohort's requests with an error, not the engine."""
        try:
            started = time.perf_counter()
            logits, cost = cohort.feed(budget)
            if cost >= MIN_CHUNK:
                rate = cost / max(time.perf_counter() - started, 1e-6)
                self._prefill_rate = rate if self._prefill_rate is None else 0.5 * (self._prefill_rate + rate)
            if logits is not None:
                self._prefilling.remove(cohort)
                self._start_decoding(cohort, logits)
            return cost
        except Exception as exc:
            log.exception("prefill failed")
            if cohort in self._prefilling:
                self._prefilling.remove(cohort)
            self._outbox.extend((r, exc) for r in cohort.requests)
            return budget

    def _start_decoding(self, cohort: Cohort, logits: torch.Tensor) -> None:
        """A cohort's prompts are in: remember them, sample every choice's first token, join the group."""
        rows, requests = cohort.rows, cohort.requests
        for i, request in enumerate(requests):
            self.prefixes.store(rows.forward.serial, request.prompt_ids, rows.history(i))
        repeats = [r.n for r in requests]
        rows.repeat(repeats)  # n > 1: every choice shares the prompt's prefill
        rows.seqs = [self._sequence(r, i) for r in requests for i in range(r.n)]
        rows.temperature = torch.tensor([s.request.params.temperature for s in rows.seqs])
        rows.top_p = torch.tensor([s.request.params.top_p for s in rows.seqs])
        counts = torch.tensor(repeats)
        exact = rows.forward.exact
        if exact is not None:
            exact = (exact[0].repeat_interleave(counts, dim=0), exact[1])
        self._sample_and_emit(rows, logits.repeat_interleave(counts, dim=0), exact)
        if not rows.seqs:
            return
        serial = rows.forward.serial
        if serial in self._groups:
            self._groups[serial].merge(rows)
        else:
            self._groups[serial] = rows

    def _sequence(self, request: GenerationRequest, index: int) -> _Sequence:
        seed = request.params.seed + index if request.params.seed is not None else next(self._seed)
        grammar = request.params.grammar
        return _Sequence(
            request=request,
            index=index,
            detok=IncrementalDetokenizer(self.tokenizer, list(request.params.stop)),
            generator=torch.Generator().manual_seed(seed),
            matcher=grammar.matcher() if grammar is not None else None,
        )

    def _decode(self, serial: int) -> None:
        rows = self._groups[serial]
        live = [i for i, s in enumerate(rows.seqs) if not s.request.cancelled]
        if len(live) < len(rows.seqs):
            rows.keep(live)
        if not rows.seqs:
            del self._groups[serial]
            return
        logits = rows.feed(rows.last[:, None], torch.ones((len(rows), 1), dtype=torch.bool))
        self.steps += 1
        self._sample_and_emit(rows, logits, rows.forward.exact)
        if not rows.seqs:
            del self._groups[serial]

    def _sample_and_emit(self, rows: Rows, logits: torch.Tensor, exact=None) -> None:
        """Pick the next token of every row, stream its text, and drop rows that finished."""
        self._constrain(rows, logits)
        tokens = sample(logits, rows.temperature, rows.top_p, [s.generator for s in rows.seqs], exact)  # (B,)
        rows.last = tokens
        requested = [s.request.params.logprobs for s in rows.seqs]
        token_logprobs = sampled_logprobs(logits, rows.temperature, rows.top_p, tokens, requested, self.tokenizer)
        keep = []
        for row, (seq, token) in enumerate(zip(rows.seqs, tokens.tolist(), strict=True)):
            seq.tokens.append(token)
            if row in token_logprobs and token not in self.eos:
                seq.logprobs.append(token_logprobs[row])
            finish = None
            if seq.matcher is not None and (seq.matcher.is_error() or not seq.matcher.consume_token(token)):
                self._outbox.append((seq.request, RuntimeError(f"the grammar failed: {seq.matcher.get_error()}")))
                seq.request.cancel()  # its other choices end with it
                continue
            if token in self.eos:
                finish, text = "stop", seq.detok.flush()
            elif seq.matcher is not None and seq.matcher.is_stopped():  # complete: only EOS could follow
                finish, text = "stop", seq.detok.push(token) + seq.detok.flush()
            else:
                text = seq.detok.push(token)
                generated = len(seq.tokens)
                if seq.detok.stopped:
                    finish = "stop"
                elif generated >= seq.request.params.max_tokens or (
                    len(seq.request.prompt_ids) + generated >= self.max_context
                ):
                    finish, text = "length", text + seq.detok.flush()
            if text or finish:
                count = len(seq.tokens) - (token in self.eos)
                asked = seq.request.params.logprobs is not None
                delta = Delta(seq.index, text, finish, count, seq.logprobs if asked else None)
                self._outbox.append((seq.request, delta))
                seq.logprobs = []
            if finish is None:
                keep.append(row)
            else:
                self._remember(rows, row, seq)
        if len(keep) < len(rows.seqs):
            rows.keep(keep)

    def _constrain(self, rows: Rows, logits: torch.Tensor) -> None:
        """Mask the logits of the rows that follow a grammar. A row whose grammar failed (past llguidance's
        limits) is left unmasked: `_sample_and_emit` ends its request with the error and drops the row."""
        matchers = {row: s.matcher for row, s in enumerate(rows.seqs) if s.matcher is not None}
        live = {row: m for row, m in matchers.items() if not m.is_error()}
        if live:
            if self._masks is None:
                self._masks = Masks(self.grammars.lltok.vocab_size)
            self._masks.apply(logits, list(live), list(live.values()))

    def _remember(self, rows: Rows, row: int, seq: _Sequence) -> None:
        """Keep a finished answer's keys and values: the next turn of its conversation starts with it."""
        fed = int(rows.pos[row])  # the last token sampled was never fed
        ids = (seq.request.prompt_ids + seq.tokens)[:fed]
        if fed == len(ids):
            self.prefixes.store(rows.forward.serial, ids, rows.history(row))

    def _flush(self) -> None:
        """Hand this step's events to the event loop in one call."""
        if self._outbox:
            events, self._outbox = self._outbox, []
            deliver(events)
