"""Guided decoding on llguidance: compile a GuidedSpec once, keep a matcher per request, mask each step.

Flow: `GuidedCompiler.compile(spec)` (thread-safe, cached; may run off the engine thread) ->
`CompiledGuide.new_state()` per request -> each step `apply_guides(logits, states)` before sampling,
then `state.accept(token_id)` for the sampled token. When the structure is complete only EOS is
allowed, so the request ends with finish reason "stop"; max_new_tokens can cut it short ("length").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import llguidance
import llguidance.hf
import numpy as np
import torch

from engine.errors import InvalidRequestError
from engine.guided_spec import GuidedSpec, GuideKind

__all__ = [
    "CompiledGuide",
    "GuideState",
    "GuidedCompiler",
    "GuidedSpec",
    "apply_guides",
    "ascii_classes",
    "unpack_bitmask",
]

_MAX_ERROR_CHARS = 800  # llguidance's reasons can carry a long grammar dump; the start says what is wrong
_DEFAULT_MAX_CACHED = 256  # compiled guides kept (least recently used dropped)

# Fixed JSON layout, as Python's json.dumps writes it (", " and ": ", no newlines): flexible whitespace
# lets weak models emit whitespace until max_new_tokens. A schema's own "x-guidance" options override.
_JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Each kind's text -> an llguidance grammar. "grammar" accepts Lark and GBNF (llama.cpp); llguidance
# detects which and converts GBNF to Lark. "choice" is a Lark alternation of JSON-escaped literals.
_GRAMMAR_BUILDERS: dict[GuideKind, Callable[[str], str]] = {
    GuideKind.JSON: lambda value: llguidance.LLMatcher.grammar_from_json_schema(
        value, defaults=_JSON_DEFAULTS
    ),
    GuideKind.REGEX: lambda value: llguidance.grammar_from("regex", ascii_classes(value)),
    GuideKind.CHOICE: lambda value: llguidance.grammar_from("choice", value),
    GuideKind.GRAMMAR: lambda value: llguidance.grammar_from("grammar", value),
}


# llguidance reads regexes as Rust `regex` does, where \d and \w are Unicode classes (Devanagari
# digits are \d). vLLM's default backend (xgrammar) and JSON schema's ECMAScript patterns mean ASCII.
_ASCII_CLASSES = {"d": "0-9", "w": "0-9A-Za-z_"}
_ASCII_NEGATED = {"D": "[^0-9]", "W": "[^0-9A-Za-z_]"}


def ascii_classes(pattern: str) -> str:
    """Rewrite \\d, \\w (anywhere) and \\D, \\W (outside [...]) to their ASCII meaning."""
    out: list[str] = []
    in_class, i = False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            escaped = pattern[i + 1]
            if escaped in _ASCII_CLASSES:
                ascii_range = _ASCII_CLASSES[escaped]
                out.append(ascii_range if in_class else f"[{ascii_range}]")
            elif escaped in _ASCII_NEGATED and not in_class:
                out.append(_ASCII_NEGATED[escaped])
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if char == "[" and not in_class:
            in_class = True
            # A "]" right after "[" or "[^" is a literal, not the end of the class.
            start = i + 2 if pattern.startswith("[^", i) else i + 1
            if pattern.startswith("]", start):
                out.append(pattern[i : start + 1])
                i = start + 1
                continue
        elif char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


class GuideState:
    """One request's position in its grammar. Used by one thread at a time (the engine's)."""

    __slots__ = ("_matcher", "num_mask_words")

    def __init__(self, matcher: llguidance.LLMatcher, num_mask_words: int) -> None:
        self._matcher = matcher
        self.num_mask_words = num_mask_words  # int32 words per bitmask row: ceil(n_vocab / 32)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (CPU int32, bit t%32 of word t//32 = token t)."""
        fill_next_token_bitmask(self._matcher, bitmask, row)

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: the tokens allowed next. For tests and debugging; the step uses bitmasks."""
        bitmask = torch.zeros((1, self.num_mask_words), dtype=torch.int32)
        self.fill_bitmask(bitmask, 0)
        return unpack_bitmask(bitmask, vocab_size)[0]

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False when the grammar forbids it (the state is then in error)."""
        return bool(self._matcher.consume_token(token_id))

    def is_finished(self) -> bool:
        """The structure is complete and nothing may follow: EOS is the only allowed token."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        message = self._matcher.get_error()
        return message[:_MAX_ERROR_CHARS] if message else None


@dataclass(frozen=True, slots=True)
class CompiledGuide:
    """A compiled spec: a pristine matcher that each request copies (a copy costs ~15 µs)."""

    spec: GuidedSpec
    grammar: str  # the llguidance grammar text (Lark)
    template: llguidance.LLMatcher  # never advanced; only copied
    num_mask_words: int

    def new_state(self) -> GuideState:
        return GuideState(self.template.deep_copy(), self.num_mask_words)


class GuidedCompiler:
    """Compiles GuidedSpecs against one tokenizer; equal specs share one CompiledGuide. Thread-safe."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        eos_token_ids: Iterable[int] | None = None,
        max_cached: int = _DEFAULT_MAX_CACHED,
    ) -> None:
        """`tokenizer`: a transformers fast tokenizer; `vocab_size`: the model's logits width."""
        num_vocab = max(vocab_size, len(tokenizer))  # ids past the tokenizer are never allowed
        eos = sorted(eos_token_ids) if eos_token_ids else None
        # Wrapping the tokenizer walks the whole vocabulary (~0.35 s for 49k tokens): do it once.
        self._ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=num_vocab, eos_token=eos)
        self.num_mask_words = (num_vocab + 31) // 32
        self._max_cached = max_cached
        self._cache: OrderedDict[GuidedSpec, CompiledGuide] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, spec: GuidedSpec) -> CompiledGuide | None:
        """The compiled guide for `spec` if it is in the cache (never compiles: safe on an event loop)."""
        with self._lock:
            return self._cache.get(spec)

    def compile(self, spec: GuidedSpec) -> CompiledGuide:
        """The compiled guide for `spec`; raises InvalidRequestError with the library's reason."""
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
        # Outside the lock: a slow grammar must not hold up other requests' cache hits.
        compiled = _compile(spec, self._ll_tokenizer, self.num_mask_words)
        with self._lock:
            compiled = self._cache.setdefault(spec, compiled)  # a racing twin keeps the first
            self._cache.move_to_end(spec)
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return compiled

    @property
    def num_cached(self) -> int:
        return len(self._cache)


def fill_next_token_bitmask(matcher: llguidance.LLMatcher, bitmask: torch.Tensor, row: int) -> None:
    """`llguidance.torch.fill_next_token_bitmask`, the one thing used of that module, without importing
    it: it applies `@torch.compile` at import, which loads torch._dynamo and inductor; a model replica's
    imports took 7.3 s of CPU with it, 6.1 s without (2 cores, 2026-12-05). The matcher writes the mask
    straight into the row."""
    if bitmask.dtype != torch.int32 or not bitmask.is_cpu or bitmask.dim() != 2:
        raise ValueError(f"the bitmask must be a 2-D int32 CPU tensor, not {bitmask.dtype} {bitmask.shape}")
    words = bitmask[row]
    if not words.is_contiguous():
        raise ValueError("the bitmask's rows must be contiguous")
    matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())


def _compile(spec: GuidedSpec, ll_tokenizer: llguidance.LLTokenizer, num_mask_words: int) -> CompiledGuide:
    try:
        grammar = _GRAMMAR_BUILDERS[spec.kind](spec.value)
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if not matcher.is_error():
            # The first mask surfaces errors found lazily (lexer limits) and warms the template.
            fill_next_token_bitmask(matcher, torch.zeros((1, num_mask_words), dtype=torch.int32), 0)
    except Exception as e:  # the library reports bad grammars with ValueError and its own errors
        raise _invalid(spec, str(e)) from e
    if matcher.is_error():
        raise _invalid(spec, matcher.get_error())
    return CompiledGuide(spec, grammar, matcher, num_mask_words)


def _invalid(spec: GuidedSpec, reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"invalid guided_{spec.kind}: {reason.strip()[:_MAX_ERROR_CHARS]}")


# ---------------------------------------------------------------------------------------------
# The per-step masking. On CPU it runs in numpy: single-threaded, so it never competes with torch's
# OpenMP threads (a torch masked_fill of 16 x 49k took 3 to 16 ms on a busy 2-core machine).

_BIT_TO_BIAS = np.array([-np.inf, 0.0], dtype=np.float32)  # disallowed -> -inf, allowed -> 0


def _unpack_bits(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """CPU (G, W) int32 bitmask -> (G, vocab_size) uint8 0/1; ids past 32*W are 0. ~0.05 ms for 16 x 49k."""
    # Bit t % 32 of word t // 32 is token t: little-endian bytes, least significant bit first.
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")  # (G, 32 W)
    if vocab_size <= bits.shape[1]:
        return bits[:, :vocab_size]
    return np.pad(bits, ((0, 0), (0, vocab_size - bits.shape[1])))


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(G, W) int32 bitmask -> (G, vocab_size) bool on the bitmask's device; ids past 32*W are False."""
    if bitmask.device.type == "cpu":
        return torch.from_numpy(_unpack_bits(bitmask, vocab_size).view(np.bool_))
    num_rows, num_words = bitmask.shape
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().view(num_rows, num_words * 32)
    if vocab_size <= num_words * 32:
        return allowed[:, :vocab_size]
    return torch.cat([allowed, allowed.new_zeros((num_rows, vocab_size - num_words * 32))], dim=1)


def apply_guides(logits: torch.Tensor, states: list[GuideState | None]) -> torch.Tensor:
    """Set each guided row's disallowed tokens to -inf; rows whose state is None are left untouched.

    Out of place (returns `logits` itself when no row is guided). logits: (B, V) any float dtype."""
    rows = [i for i, state in enumerate(states) if state is not None]
    if not rows:
        return logits
    guided = [states[i] for i in rows]
    bitmask = torch.empty((len(rows), guided[0].num_mask_words), dtype=torch.int32)  # (G, W)
    for row, state in enumerate(guided):
        state.fill_bitmask(bitmask, row)
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return _apply_cpu(logits, rows, bitmask)
    if logits.device.type != "cpu":  # ship the small bitmask (W = V/32 words), unpack on the device
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    allowed = unpack_bitmask(bitmask, logits.shape[-1])  # (G, V) bool
    if len(rows) == len(states):
        return logits.masked_fill(~allowed, float("-inf"))
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    masked = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))  # (G, V)
    return logits.index_copy(0, index, masked)


def _apply_cpu(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """apply_guides for float32 CPU logits: add a 0 / -inf bias to the guided rows, in numpy."""
    bias = np.take(_BIT_TO_BIAS, _unpack_bits(bitmask, logits.shape[-1]))  # (G, V) float32
    source = logits.detach().numpy()  # (B, V), shares memory: never written
    if len(rows) == source.shape[0]:
        return torch.from_numpy(source + bias)
    masked = source.copy()
    masked[rows] += bias
    return torch.from_numpy(masked)
