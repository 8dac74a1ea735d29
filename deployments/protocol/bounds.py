"""Static bounds shared by both protocols' request types, and the text type that must be valid Unicode.

The bounds are pydantic `Field` constraints, so they appear in `/openapi.json`. Bounds that depend on
the model or the config (the context length, the number of stop strings) are checked at admission
(`deployments.limits`, the engine's `check_request`) and stated in the fields' descriptions.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator

from engine.errors import InvalidRequestError
from engine.types import GREEDY_TEMPERATURE_EPS

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # int64, as vLLM
TOP_K_MAX = 2**31 - 1  # int32; the engine clamps top_k to the vocabulary
MAX_NEW_TOKENS_MAX = 2**20  # static bound; the model's context is the real one, checked at admission
MAX_STOP_SEQUENCES = 1024  # static bound; `limits.max_stop_sequences` (default 16) is the real one
MAX_GUIDED_CHOICES = 1024
GREEDY_TEMPERATURE = GREEDY_TEMPERATURE_EPS  # below this a temperature is greedy: the engine's own bound

SEED_BOUNDS: dict[str, Any] = {"ge": SEED_MIN, "le": SEED_MAX}
SEED_DESCRIPTION = (
    "Seed of this request's sampler: the same seed gives the same tokens. "
    f"An int64, {SEED_MIN} to {SEED_MAX}."
)
TOP_K_DESCRIPTION = (
    f"Keep the k most likely tokens: -1 (or null) = off, else 1 to {TOP_K_MAX}; a k at or above the "
    "model's vocabulary size keeps every token (clamped to the vocabulary)."
)
GREEDY_NOTE = f"0 = greedy; a temperature below {GREEDY_TEMPERATURE:g} is treated as 0 (greedy)."
MAX_TOKENS_NOTE = (
    f"Static bound {MAX_NEW_TOKENS_MAX}; the real limit is the model's context: prompt tokens + this "
    "past the context length is a 400 giving the numbers."
)
STOP_NOTE = (
    f"Static bound {MAX_STOP_SEQUENCES}; the configured limits.max_stop_sequences (default 16) and "
    "limits.max_stop_sequence_chars (default 256) are checked at admission (400)."
)


def greedy_below_epsilon(temperature: float) -> float:
    """Temperatures below GREEDY_TEMPERATURE sample as greedy (as vLLM): 1e-46 underflows float32 to 0
    and 1e-40 is subnormal (inf/NaN logits), so neither could be honoured as a temperature."""
    return 0.0 if temperature < GREEDY_TEMPERATURE else temperature


def require_unicode(text: str) -> str:
    """`text`, or ValueError naming the first lone surrogate (pydantic reports it under the field)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"is not valid Unicode: a lone UTF-16 surrogate ({text[exc.start]!a}) at character "
            f"{exc.start}; send text that encodes to UTF-8"
        ) from None
    return text


def check_unicode(text: str, field: str) -> None:
    """InvalidRequestError (400) naming the field for text that is not valid Unicode; the model server
    checks prompts again before tokenizing (tokenizers fail on a lone surrogate with a TypeError)."""
    try:
        require_unicode(text)
    except ValueError as exc:
        raise InvalidRequestError(f"{field}: {exc}") from None


# A string that must encode to UTF-8: JSON's "\ud800" escapes decode to lone surrogates that no
# tokenizer, grammar compiler or response encoder can handle.
Text = Annotated[str, AfterValidator(require_unicode)]


def _check_json_unicode(value: dict[str, Any]) -> dict[str, Any]:
    """A JSON object (a guided_json schema) whose keys and strings all encode to UTF-8."""
    require_unicode(json.dumps(value, ensure_ascii=False))
    return value


UnicodeJson = Annotated[dict[str, Any], AfterValidator(_check_json_unicode)]
