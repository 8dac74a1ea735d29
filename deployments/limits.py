"""The app config's `limits:` and `auth:` sections: what one request may ask for, and who may ask.

The body-size limit and the keys are checked on the raw ASGI stream (`deployments.guard`); the other
limits on the parsed request, so every route and protocol shares one set of numbers and one wording.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from engine.errors import InvalidRequestError

API_KEYS_ENV = "LLMSERVE_API_KEYS"  # comma-separated; added to the configured keys


class LimitSettings(BaseModel):
    """The `limits:` section of the app config: what one request may ask for."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(
        4 * 1024**2,
        ge=1024,
        description="Largest request body; a larger one is refused with 413 before it is read whole.",
    )
    max_prompt_chars: int = Field(
        1_000_000,
        ge=1,
        description="Most characters in a prompt (a chat: all messages together); more is a 400.",
    )
    max_stop_sequences: int = Field(16, ge=0, description="Most stop sequences per request; more is a 400.")
    max_stop_sequence_chars: int = Field(
        256, ge=1, description="Longest stop sequence, in characters; longer is a 400."
    )

    def check(self, prompt_texts: Iterable[str], stops: str | list[str] | None) -> None:
        """Raise InvalidRequestError (400) naming the limit and its setting when one is exceeded."""
        num_chars = sum(len(text) for text in prompt_texts)
        if num_chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"the prompt has {num_chars} characters; the limit is {self.max_prompt_chars} "
                "(limits.max_prompt_chars)"
            )
        stop_list = [stops] if isinstance(stops, str) else list(stops or ())
        if len(stop_list) > self.max_stop_sequences:
            raise InvalidRequestError(
                f"{len(stop_list)} stop sequences given; at most {self.max_stop_sequences} are allowed "
                "(limits.max_stop_sequences)"
            )
        longest = max((len(s) for s in stop_list), default=0)
        if longest > self.max_stop_sequence_chars:
            raise InvalidRequestError(
                f"a stop sequence has {longest} characters; at most {self.max_stop_sequence_chars} are "
                "allowed (limits.max_stop_sequence_chars)"
            )


class AuthSettings(BaseModel):
    """The `auth:` section of the app config. No keys (the default) = open, for local use."""

    model_config = ConfigDict(extra="forbid")

    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description=f"Accepted API keys; the env var {API_KEYS_ENV} (comma-separated) adds more.",
    )

    def resolve_keys(self, environ: dict[str, str] | None = None) -> tuple[SecretStr, ...]:
        """The configured keys plus those of the environment (read where the app is built)."""
        from_env = (environ if environ is not None else os.environ).get(API_KEYS_ENV, "")
        keys = [k.get_secret_value().strip() for k in self.api_keys] + [
            k.strip() for k in from_env.split(",")
        ]
        return tuple(SecretStr(k) for k in dict.fromkeys(keys) if k)
