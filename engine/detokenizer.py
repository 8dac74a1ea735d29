"""Incremental, UTF-8 safe detokenization of generated tokens (the TGI/vLLM offsets scheme).

Each step decodes two small windows of ids, `ids[prefix:read]` and `ids[prefix:]`, and releases what
the second adds to the first. Decoding from `prefix` (not from the new token alone) keeps spaces that
tokenizers such as SentencePiece drop at the start of a decode, and text ending in "\ufffd" (a UTF-8
sequence split across tokens) waits until its last byte arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token decoded on its own, special tokens included (for log-prob entries)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into text pieces whose concatenation is the full decode."""

    __slots__ = ("_ids", "_prefix_offset", "_prefix_text", "_read_offset", "_skip_special", "_tokenizer")

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool, context_ids: Sequence[int] = ()
    ) -> None:
        """`context_ids` (the prompt's last few ids) are never released; they give the first generated
        token the context a SentencePiece tokenizer needs to keep its leading space, as vLLM does."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(context_ids)
        self._prefix_offset = 0  # start of the decode window: context for the text being read
        self._read_offset = len(self._ids)  # ids before this have had their text released
        # decode(ids[prefix_offset:read_offset]), kept to save a decode per step
        self._prefix_text = self._decode(self._ids) if self._ids else ""

    def add_token(self, token_id: int) -> str:
        """Append one generated id; return the text it completes (may be "" while bytes are pending)."""
        self._ids.append(token_id)
        return self._release(is_final=False)

    def flush(self) -> str:
        """Release whatever is still held at the end of the request, even an incomplete character."""
        return self._release(is_final=True)

    def _release(self, is_final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) <= len(self._prefix_text):
            return ""  # e.g. a skipped special token: nothing new yet
        if window_text.endswith(_REPLACEMENT_CHAR) and not is_final:
            return ""  # the last character's bytes are not all here yet
        new_text = window_text[len(self._prefix_text) :]
        # Slide the window: the text just released becomes the context for the next tokens.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
