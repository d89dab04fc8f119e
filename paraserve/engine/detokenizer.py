"""Incremental detokenization: UTF-8 safe, O(window) per token, stop strings across tokens.

Uses the prefix/read offset method (as in TGI and vLLM): decode a small window of recent tokens
twice, with and without the new ones, and emit the difference once it no longer ends in an
incomplete UTF-8 sequence (rendered as U+FFFD). Decoding in the context of the previous tokens
keeps SentencePiece / byte-level BPE spacing right, which decoding a token alone does not.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_CONTEXT = 5  # prompt tokens the first generated token is decoded against


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        # a stop string can begin at most this many chars before the end of the text seen so far
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        # only the prompt's tail is kept: it is context for the first token, never emitted
        self.tokens: list[int] = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = len(self.tokens)  # tokens before this are already in the text
        self._text = ""
        self._sent = 0  # chars already returned by get_delta
        self.stopped: str | None = None
        self.finished = False

    def add_tokens(self, token_ids: Sequence[int]) -> str | None:
        """Appends generated tokens; returns the stop string that matched, or None."""
        if self.stopped is not None:
            return self.stopped
        search_from = max(len(self._text) - self.holdback, 0)  # a stop may begin in the old tail
        for tid in token_ids:
            self.tokens.append(tid)
            self._read_new_text()
        return self._check_stop(search_from) if self.stop else None

    def _read_new_text(self) -> None:
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        # "\ufffd" at the end: the last token(s) hold only part of a multi-byte char; wait for the
        # rest (the window then grows by a few tokens, no more)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _check_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self._text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):  # earliest wins; ties: listed first
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
        """All generated text so far; an incomplete trailing multi-byte char is not included."""
        return self._text

    def get_delta(self) -> str:
        """Text not returned before. While running, the last chars that could begin a stop string
        are held back, so no part of a stop string is ever streamed."""
        if self.finished:
            end = len(self._text)
        else:
            end = max(len(self._text) - self.holdback, self._sent)
        delta = self._text[self._sent:end]
        self._sent = end
        return delta

    def finish(self) -> None:
        """The request ended (length, eos, stop token): release the held-back tail to get_delta."""
        self.finished = True

    def decode_token(self, token_id: int) -> str:
        """One token's text alone (logprobs' decoded_token); keeps its leading space."""
        tok = self.tokenizer
        return tok.convert_tokens_to_string(tok.convert_ids_to_tokens([token_id]))
