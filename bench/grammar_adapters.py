"""The three grammar engines bench/grammar_engines.py compares, behind one interface: llguidance (the service's),
xgrammar 0.2.8 and outlines-core 0.2.14, each imported lazily so that one not installed can be skipped."""

from __future__ import annotations

import abc
import importlib
import importlib.metadata
import importlib.util
import json
from typing import Any

import torch

VOCAB = 49152  # SmolLM2's tokenizer and its model's head


class Engine(abc.ABC):
    """One grammar engine behind the few calls the benchmark makes; each engine below implements them all."""

    name = ""
    module = ""
    pip = ""
    parallel = False

    @abc.abstractmethod
    def load(self) -> None:
        """Import the engine (ImportError if it is not there)."""

    def version(self) -> str:
        return importlib.metadata.version(self.module.replace("_", "-"))

    @abc.abstractmethod
    def setup(self, tok: Any) -> None:
        """Build the engine's one-off view of the tokenizer."""

    @abc.abstractmethod
    def compile(self, schema: dict) -> None:
        """Compile the schema; `matchers` then gives fresh matchers for it."""

    @abc.abstractmethod
    def matchers(self, n: int) -> list: ...

    @abc.abstractmethod
    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        """Fill row i of the bitmask for matchers[i], one matcher after the other."""

    def fill_par(self, matchers: list, bitmask: torch.Tensor) -> None:
        """Fill the bitmask with the engine's own parallel call; an engine without one (`parallel` False) fills
        sequentially, and the benchmark does not time it twice."""
        self.fill(matchers, bitmask)

    @abc.abstractmethod
    def advance(self, matcher: Any, token: int) -> bool: ...

    @abc.abstractmethod
    def done(self, matcher: Any) -> bool: ...

    def reset(self, matcher: Any) -> None:
        matcher.reset()


class LLGuidance(Engine):
    name, module, pip, parallel = "llguidance", "llguidance", "pip install llguidance==1.9.1", True

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def load(self) -> None:
        self.llg = importlib.import_module("llguidance")
        self.hf = importlib.import_module("llguidance.hf")
        self.lltorch = importlib.import_module("llguidance.torch")

    def setup(self, tok: Any) -> None:
        self.lltok = self.hf.from_tokenizer(tok)
        self.executor = self.llg.LLExecutor(num_threads=self.threads)

    def compile(self, schema: dict) -> None:
        # As service/engine/grammar.py does it.
        options = {"whitespace_flexible": False}
        source = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
        self.prototype = self.llg.LLMatcher(self.lltok, source, log_level=0)
        if self.prototype.is_error():
            raise RuntimeError(self.prototype.get_error())

    def matchers(self, n: int) -> list:
        return [self.prototype.deep_copy() for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            self.lltorch.fill_next_token_bitmask(m, bitmask, i)

    def fill_par(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.lltorch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def advance(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def done(self, matcher: Any) -> bool:
        return matcher.is_stopped() and not matcher.is_error()


class XGrammar(Engine):
    name, module, pip, parallel = "xgrammar", "xgrammar", "pip install xgrammar==0.2.8", True

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def load(self) -> None:
        self.xgr = importlib.import_module("xgrammar")

    def setup(self, tok: Any) -> None:
        self.info = self.xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB)
        self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        self.batch = self.xgr.BatchGrammarMatcher(max_threads=self.threads)

    def compile(self, schema: dict) -> None:
        # The service's JSON: no free whitespace and compact separators, as llguidance's whitespace_flexible=False.
        self.compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=True
        )

    def matchers(self, n: int) -> list:
        return [self.xgr.GrammarMatcher(self.compiled) for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def fill_par(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def done(self, matcher: Any) -> bool:
        return matcher.is_terminated()


def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level BPE alphabet: the printable character each byte is written as."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


class OutlinesCore(Engine):
    """outlines-core's Vocabulary.from_pretrained downloads from the hub, so the vocabulary is built here: each
    token's bytes (byte-level BPE strings decoded through GPT-2's byte alphabet), the added special tokens left
    out (they are not text), EOS given apart. Its Guide has no step for EOS: a finished guide is done."""

    name, module, pip, parallel = "outlines-core", "outlines_core", "pip install outlines-core==0.2.14", False

    def load(self) -> None:
        self.oc = importlib.import_module("outlines_core")

    def setup(self, tok: Any) -> None:
        decoder, special = byte_decoder(), set(tok.added_tokens_decoder)
        self.eos = tok.eos_token_id
        by_bytes: dict[bytes, list[int]] = {}
        for token, i in tok.get_vocab().items():
            if i in special or i == self.eos:
                continue
            by_bytes.setdefault(bytes(decoder[c] for c in token), []).append(i)
        self.vocabulary = self.oc.Vocabulary(self.eos, by_bytes)

    def compile(self, schema: dict) -> None:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        self.index = self.oc.Index(regex, self.vocabulary)

    def matchers(self, n: int) -> list:
        return [self.oc.Guide(self.index) for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        words = bitmask.shape[1]
        base = bitmask.data_ptr()
        for i, g in enumerate(matchers):
            g.write_mask_into(base + 4 * words * i, words, 4)

    def advance(self, matcher: Any, token: int) -> bool:
        if token == self.eos:
            return matcher.is_finished()
        matcher.advance(token, return_tokens=False)
        return True

    def done(self, matcher: Any) -> bool:
        return matcher.is_finished()
