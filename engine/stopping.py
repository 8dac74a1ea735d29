"""When a request stops: EOS and length on tokens, stop sequences on the decoded text."""

from __future__ import annotations

from engine.types import FinishReason, SamplingParams


def check_token_finish(
    token_id: int, num_generated: int, params: SamplingParams, eos_token_ids: frozenset[int]
) -> FinishReason | None:
    """The finish reason the newest token causes, if any; `num_generated` counts that token."""
    if token_id in eos_token_ids and not params.ignore_eos:
        return FinishReason.STOP
    if num_generated >= params.max_new_tokens:
        return FinishReason.LENGTH
    return None


class StopStringMatcher:
    """Finds stop sequences in streamed text, holding back text that may still begin one."""

    __slots__ = ("_held", "_include_stop", "_stops", "is_stopped")

    def __init__(self, stop_sequences: tuple[str, ...], include_stop_str_in_output: bool) -> None:
        self._stops = tuple(s for s in stop_sequences if s)  # "" would match everywhere
        self._include_stop = include_stop_str_in_output
        self._held = ""  # released text never contains a match, so searches start here
        self.is_stopped = False

    def feed(self, new_text: str) -> tuple[str, bool]:
        """Add newly decoded text; return (text safe to release now, whether a stop sequence matched)."""
        if self.is_stopped:
            return "", True
        if not self._stops:
            return new_text, False
        text = self._held + new_text
        match = _first_match(text, self._stops)
        if match is not None:
            start, stop = match
            self.is_stopped = True
            self._held = ""
            end = start + len(stop) if self._include_stop else start
            return text[:end], True
        num_held = _longest_partial_suffix(text, self._stops)
        self._held = text[len(text) - num_held :]
        return text[: len(text) - num_held], False

    def flush(self) -> str:
        """Release the held-back text when the request ends for another reason (EOS, length)."""
        held, self._held = self._held, ""
        return "" if self.is_stopped else held


def _first_match(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The stop sequence that completes first in `text` (as if streamed one character at a time);
    on a tie, the one that starts first. Returns (start index, stop sequence)."""
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        candidate = (start + len(stop), start, stop)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return None if best is None else (best[1], best[2])


def _longest_partial_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper beginning of some stop sequence."""
    max_len = min(len(text), max(len(s) for s in stops) - 1)
    for length in range(max_len, 0, -1):
        tail = text[len(text) - length :]
        if any(stop.startswith(tail) for stop in stops):
            return length
    return 0
