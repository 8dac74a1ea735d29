"""What a guided-decoding request asks for, as a small hashable value (no grammar library needed here)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from engine.errors import InvalidRequestError


class GuideKind(StrEnum):
    JSON = "json"  # a JSON schema: the output parses and validates
    REGEX = "regex"  # the whole output matches the regex
    CHOICE = "choice"  # the output is exactly one of the strings
    GRAMMAR = "grammar"  # a context-free grammar, Lark or GBNF (llama.cpp) notation


@dataclass(frozen=True, slots=True)
class GuidedSpec:
    """One request's output constraint; (kind, value) is also the compile-cache key.

    `value` is canonical text: a JSON schema and a choice list are serialized compactly with their key
    order kept (property order decides the order of keys in the output, so it is part of the schema)."""

    kind: GuideKind
    value: str

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str | bool) -> GuidedSpec:
        """A schema object (or its JSON text); `true` / `{}` mean any JSON value."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"guided_json is not valid JSON: {e}") from e
        if not isinstance(schema, Mapping | bool):
            raise InvalidRequestError("guided_json must be a JSON schema object")
        return cls(GuideKind.JSON, _canonical_json(schema))

    @classmethod
    def regex(cls, pattern: str) -> GuidedSpec:
        if not pattern:
            raise InvalidRequestError("guided_regex is empty")
        return cls(GuideKind.REGEX, pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> GuidedSpec:
        if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise InvalidRequestError("guided_choice must be a non-empty list of non-empty strings")
        return cls(GuideKind.CHOICE, _canonical_json(list(dict.fromkeys(choices))))

    @classmethod
    def grammar(cls, text: str) -> GuidedSpec:
        if not text.strip():
            raise InvalidRequestError("guided_grammar is empty")
        return cls(GuideKind.GRAMMAR, text)

    @classmethod
    def from_fields(
        cls,
        guided_json: Mapping[str, Any] | str | bool | None = None,
        guided_regex: str | None = None,
        guided_choice: Sequence[str] | None = None,
        guided_grammar: str | None = None,
    ) -> GuidedSpec | None:
        """The spec of an LLM Engine / vLLM style request; None when no field is set."""
        fields = {
            "guided_json": (guided_json, cls.json_schema),
            "guided_regex": (guided_regex, cls.regex),
            "guided_choice": (guided_choice, cls.choice),
            "guided_grammar": (guided_grammar, cls.grammar),
        }
        chosen = [(name, value, make) for name, (value, make) in fields.items() if value is not None]
        if len(chosen) > 1:
            names = ", ".join(name for name, _, _ in chosen)
            raise InvalidRequestError(
                f"at most one of guided_json, guided_regex, guided_choice, "
                f"guided_grammar may be set; got {names}"
            )
        if not chosen:
            return None
        _, value, make = chosen[0]
        return make(value)


def _canonical_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
