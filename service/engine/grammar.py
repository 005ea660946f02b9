"""Constrained decoding: a grammar per request, applied as a token mask before sampling (llguidance).

llguidance compiles a grammar (a JSON schema, or a Lark grammar that may embed JSON schemas) against the
tokenizer and, at each step, says which tokens may come next. bench/grammar_engines.py compares it with
xgrammar and outlines-core on this tokenizer (bench/RESULTS.md, "Structured outputs").

The API compiles a request's grammar in a worker thread (`Grammars.compile`: a bad schema is a 400 before
anything is queued) and hands the engine a `Grammar`; the engine gives every choice its own copy of the
matcher, masks the logits of the constrained rows each step (so sampling and the reported logprobs see the
same distribution), and advances each matcher with the token it drew. A grammar that is complete allows
only the end of the answer (EOS).
"""

import json
import threading
from dataclasses import dataclass

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase

# A JSON answer has no free whitespace: a small model left to choose would spend tokens on it, or never stop.
JSON_OPTIONS = {"whitespace_flexible": False}
ANY_JSON_OBJECT = {"type": "object"}


class GrammarError(ValueError):
    """The grammar cannot be compiled (the message says why)."""


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar: `matcher()` gives each constrained choice its own state."""

    source: str  # llguidance's serialised grammar
    _prototype: llguidance.LLMatcher

    def matcher(self) -> llguidance.LLMatcher:
        return self._prototype.deep_copy()


class Grammars:
    """Compiles grammars for one tokenizer. The llguidance view of the tokenizer costs ~0.5 s to build, so it
    is built once, on first use; compiling is thread-safe (llguidance releases the GIL while it works)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def lltok(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.hf.from_tokenizer(self._tokenizer)
            return self._lltok

    def json_schema(self, schema: dict) -> Grammar:
        """JSON matching `schema` (GrammarError if the schema is not one llguidance can compile)."""
        try:
            source = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(str(exc)) from exc
        return self.compile(source)

    def lark(self, grammar: str) -> Grammar:
        return self.compile(llguidance.LLMatcher.grammar_from_lark(grammar))

    def compile(self, source: str) -> Grammar:
        matcher = llguidance.LLMatcher(self.lltok, source, log_level=0)
        if matcher.is_error():
            raise GrammarError(_tidy(matcher.get_error()))
        return Grammar(source, matcher)


def _tidy(error: str) -> str:
    """llguidance's message without its internal location prefix, which means nothing to an API caller."""
    return error.split("\n")[0].strip()


class Masks:
    """The token masks of one decode step's constrained rows, applied to their logits in place."""

    def __init__(self, vocab_size: int) -> None:
        self.words = (vocab_size + 31) // 32
        # Bit i of byte b: token 8 * (byte's index) + i (llguidance's int32 words, read as little-endian bytes).
        self._bits = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # (256, 8)
        self._executor = llguidance.LLExecutor(num_threads=1)  # the engine thread is the one to spend

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list[llguidance.LLMatcher]) -> None:
        """Set to -inf the logits (B, V) of every token the row's matcher does not allow next."""
        bitmask = torch.empty((len(rows), self.words), dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(), self.words * 4, len(rows)
        )
        allowed = self._bits[bitmask.view(torch.uint8).long()].view(len(rows), -1)  # (R, 32 * words)
        vocab = logits.shape[-1]
        if allowed.shape[-1] < vocab:  # the model's head is wider than the tokenizer: those tokens never come
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[-1]), value=False)
        refused = ~allowed[:, :vocab]
        if len(rows) == len(logits):
            logits.masked_fill_(refused, float("-inf"))
        else:
            for i, row in enumerate(rows):  # in place, row by row: no gather and scatter of the whole batch
                logits[row].masked_fill_(refused[i], float("-inf"))
