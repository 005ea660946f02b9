"""Token ids to streamed text, with stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character can span tokens), and decoding
the whole answer every step is quadratic. As vLLM does, decode a short window twice (with and without
the newest tokens) and emit the difference once it no longer ends in a partial character. Text that
could be the start of a stop string is held back until it is known not to be.
"""

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything decoded so far
        self.emitted = 0  # how much of self.text went out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that can be shown now ('' if none yet).

        After a stop string appears, `stopped` is True and the text up to (not including) it is out.
        """
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.text += after[len(before) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            search_from = max(0, self.emitted - self.holdback)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._emit(len(self.text))
        return self._emit(max(self.emitted, len(self.text) - self.holdback))

    def flush(self) -> str:
        """The answer ended (EOS or length): release whatever was held back."""
        return "" if self.stopped else self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
