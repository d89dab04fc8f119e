"""Incremental detokenization: UTF-8 safe, O(window) per token, stop strings across tokens.

Uses the prefix/read offset method (as in TGI and vLLM): decode a small window of recent tokens
twice, with and without the new ones, and emit the difference once it no longer ends in an
incomplete UTF-8 sequence (rendered as U+FFFD). Decoding in the context of the previous tokens
keeps SentencePiece / byte-level BPE spacing right.
"""
from __future__ import annotations

from typing import Sequence

_CONTEXT = 5  # prompt tokens the first generated token is decoded against


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self._text = ""
        self._sent = 0  # chars already returned by get_delta
        self.stopped: str | None = None
        self.finished = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_tokens(self, token_ids: list[int]) -> str | None:
        if self.stopped is not None:
            return self.stopped
        start = max(len(self._text) - self.holdback, 0)  # a stop may begin in the old tail
        for tid in token_ids:
            self.tokens.append(tid)
            prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
            full = self._decode(self.tokens[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self._text += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return self._check_stop(start) if self.stop else None

    def _check_stop(self, start: int) -> str | None:
        best = None
        for s in self.stop:
            i = self._text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self._text = self._text[:i + len(s)] if self.include_stop else self._text[:i]
        self.stopped = s
        self.finished = True
        return s

    @property
    def output_text(self) -> str:
        return self._text

    def get_delta(self) -> str:
        """Text not returned before; while running, the last chars that could begin a stop string
        are held back so a stop string is never streamed."""
        end = len(self._text) if (self.finished or not self.stop) else max(len(self._text) - self.holdback, self._sent)
        delta = self._text[self._sent:end]
        self._sent = end
        return delta

    def finish(self) -> None:
        self.finished = True

    def decode_token(self, token_id: int) -> str:
        tok = self.tokenizer
        return tok.convert_tokens_to_string(tok.convert_ids_to_tokens([token_id]))
