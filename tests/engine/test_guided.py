"""Guided decoding: the tiny random-weight model's output is noise, so every structure comes from the mask."""

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.errors import InvalidRequestError
from engine.guided import (
    GuidedCompiler,
    GuidedSpec,
    GuideState,
    apply_guides,
    ascii_classes,
    fill_next_token_bitmask,
    unpack_bitmask,
)
from engine.guided_spec import GuideKind

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 5},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "role", "address", "tags", "age"],
    "additionalProperties": False,
}
ARITHMETIC_GBNF = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+'
ARITHMETIC_LARK = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: /[0-9]{1,3}/'
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def compiler(model_and_tokenizer) -> GuidedCompiler:
    model, tokenizer = model_and_tokenizer
    return GuidedCompiler(tokenizer, model.config.vocab_size, {tokenizer.eos_token_id})


def generate(model_and_tokenizer, state: GuideState, seed: int | None = None) -> tuple[str, bool]:
    """Greedy (or seeded sampling) under the guide; returns (text, whether EOS ended it)."""
    model, tokenizer = model_and_tokenizer
    ids = tokenizer("Answer:").input_ids
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    output: list[int] = []
    with torch.inference_mode():
        for _ in range(MAX_TOKENS):
            logits = model(torch.tensor([ids + output])).logits[:, -1].float()  # (1, V)
            logits = apply_guides(logits, [state])
            if generator is None:
                token_id = int(logits.argmax(dim=-1))
            else:
                token_id = int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))
            assert state.accept(token_id), state.error
            if token_id == tokenizer.eos_token_id:
                return tokenizer.decode(output), True
            output.append(token_id)
    return tokenizer.decode(output), False


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_json_output_validates(model_and_tokenizer, compiler, seed):
    state = compiler.compile(GuidedSpec.json_schema(PERSON_SCHEMA)).new_state()
    text, is_eos = generate(model_and_tokenizer, state, seed)
    assert is_eos, text
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert text.startswith('{"name": "')  # properties in schema order, json.dumps layout


@pytest.mark.parametrize(
    "pattern", [r"\d{4}-\d{2}-\d{2}", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)", r"^(yes|no)$"]
)
def test_regex_matches_in_full(model_and_tokenizer, compiler, pattern):
    state = compiler.compile(GuidedSpec.regex(pattern)).new_state()
    text, is_eos = generate(model_and_tokenizer, state, seed=3)
    assert is_eos and re.fullmatch(pattern, text, flags=re.ASCII), text  # \d means [0-9]


def test_choice_returns_exactly_one(model_and_tokenizer, compiler):
    choices = ["positive", "negative", 'neutral "maybe"']
    spec = GuidedSpec.choice(choices)
    for seed in (None, 4, 5):
        text, is_eos = generate(model_and_tokenizer, compiler.compile(spec).new_state(), seed)
        assert is_eos and text in choices


@pytest.mark.parametrize("grammar", [ARITHMETIC_GBNF, ARITHMETIC_LARK], ids=["gbnf", "lark"])
def test_grammar_output_parses(model_and_tokenizer, compiler, grammar):
    state = compiler.compile(GuidedSpec.grammar(grammar)).new_state()
    text, _ = generate(model_and_tokenizer, state, seed=6)
    assert re.fullmatch(r"[0-9]+([+-][0-9]+)*", text), text


def test_finished_structure_allows_only_eos(model_and_tokenizer, compiler):
    _, tokenizer = model_and_tokenizer
    state = compiler.compile(GuidedSpec.choice(["yes", "no"])).new_state()
    for token_id in tokenizer("yes").input_ids:
        assert state.accept(token_id)
    assert state.is_finished()
    allowed = state.allowed_tokens(len(tokenizer))
    assert allowed.nonzero().flatten().tolist() == [tokenizer.eos_token_id]


def test_length_limit_leaves_output_incomplete(model_and_tokenizer, compiler):
    _, tokenizer = model_and_tokenizer
    state = compiler.compile(GuidedSpec.json_schema(PERSON_SCHEMA)).new_state()
    for token_id in tokenizer('{"name": "').input_ids:  # max_new_tokens could end generation here
        assert state.accept(token_id)
    assert not state.is_finished()


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (GuidedSpec.json_schema({"type": "nope"}), "Invalid type"),
        (GuidedSpec.regex("(abc"), "unclosed group"),
        (GuidedSpec.grammar("root ::= [0-9"), "guided_grammar"),
    ],
)
def test_bad_spec_gives_invalid_request_with_reason(compiler, spec, reason):
    with pytest.raises(InvalidRequestError, match=re.escape(reason)):
        compiler.compile(spec)


@pytest.mark.parametrize(
    "fields",
    [{"guided_json": "{not json"}, {"guided_choice": []}, {"guided_regex": "a", "guided_choice": ["a"]}],
)
def test_bad_fields_give_invalid_request(fields):
    with pytest.raises(InvalidRequestError):
        GuidedSpec.from_fields(**fields)


def test_from_fields_canonical_json():
    spec = GuidedSpec.from_fields(guided_json='{"type":  "object", "properties": {"b": {}, "a": {}}}')
    assert spec == GuidedSpec(GuideKind.JSON, '{"type":"object","properties":{"b":{},"a":{}}}')
    assert GuidedSpec.from_fields() is None


def test_cache_returns_same_compiled_object(compiler):
    first = compiler.compile(GuidedSpec.json_schema(PERSON_SCHEMA))
    again = compiler.compile(GuidedSpec.json_schema(json.dumps(PERSON_SCHEMA, indent=2)))
    assert again is first
    with ThreadPoolExecutor(4) as pool:  # compile is called off the engine thread
        compiled = list(pool.map(compiler.compile, [GuidedSpec.regex("[0-9]{3}x")] * 8))
    assert all(c is compiled[0] for c in compiled)


def test_unguided_rows_untouched_and_padded_vocab_masked(model_and_tokenizer, compiler):
    _, tokenizer = model_and_tokenizer
    width = len(tokenizer) + 37  # the model's logits may be wider than the tokenizer
    logits = torch.randn(3, width)
    state = compiler.compile(GuidedSpec.choice(["yes", "no"])).new_state()
    masked = apply_guides(logits, [None, state, None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    assert torch.isinf(masked[1, len(tokenizer) :]).all()
    assert 0 < int(torch.isfinite(masked[1]).sum()) < 10
    assert apply_guides(logits, [None, None, None]) is logits
    # Other dtypes (and devices) take the torch path; the mask must be the same.
    halves = apply_guides(logits.bfloat16(), [None, state, None])
    assert torch.equal(halves[0], logits[0].bfloat16())
    assert torch.equal(torch.isfinite(halves), torch.isfinite(masked))


def test_unpack_bitmask_matches_shifts():
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, 5), dtype=torch.int32)
    expected = torch.tensor([[(int(w) >> b) & 1 for w in row for b in range(32)] for row in bitmask]).bool()
    assert torch.equal(unpack_bitmask(bitmask, 150), expected[:, :150])
    assert not unpack_bitmask(bitmask, 170)[:, 160:].any()


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"\d{4}-\d{2}", "[0-9]{4}-[0-9]{2}"),
        (r"[\d.]+\w", "[0-9.]+[0-9A-Za-z_]"),
        (r"\\d[^\d]\D", r"\\d[^0-9][^0-9]"),
        (r"[]\D]x", r"[]\D]x"),  # a leading "]" is literal; \D inside a class is left alone
    ],
)
def test_ascii_classes(pattern, expected):
    assert ascii_classes(pattern) == expected


def test_guided_decoding_leaves_llguidance_torch_unimported() -> None:
    """llguidance.torch applies @torch.compile at import (torch._dynamo and inductor, ~1 s of a model
    replica's start); engine/guided.py fills bitmasks without it."""
    code = "import sys, engine.guided; print('llguidance.torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert done.stdout.strip() == "False"


def test_a_bitmask_that_is_not_int32_is_refused() -> None:
    with pytest.raises(ValueError, match="int32"):
        fill_next_token_bitmask(None, torch.zeros((1, 4), dtype=torch.int64), 0)
