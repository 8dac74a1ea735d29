"""The engine's own check of a request's SamplingParams: what the protocol layer let through must still
be something the sampler can honour for this model. Pure; raises InvalidRequestError naming the field."""

from __future__ import annotations

import dataclasses
import math

from engine.errors import InvalidRequestError
from engine.types import MAX_TOP_LOGPROBS, SamplingParams

SEED_MODULUS = 2**64  # torch generators take seeds in [0, 2**64); any int is reduced into that range


def normalize_params(params: SamplingParams, vocab_size: int) -> SamplingParams:
    """Clamp what has a natural clamp (top_k to the vocabulary, the seed modulo 2**64), refuse the rest."""
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if not math.isfinite(getattr(params, name)):
            raise InvalidRequestError(f"{name} must be a finite number, got {getattr(params, name)}")
    if not 0.0 < params.top_p <= 1.0:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
    if not 0 <= params.num_top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {params.num_top_logprobs}"
        )
    changes: dict[str, object] = {}
    if params.top_k >= vocab_size or params.top_k <= 0:
        changes["top_k"] = -1  # k >= the vocabulary keeps every token: the same as off
    if params.seed is not None and not 0 <= params.seed < SEED_MODULUS:
        changes["seed"] = params.seed % SEED_MODULUS
    return dataclasses.replace(params, **changes) if changes else params
