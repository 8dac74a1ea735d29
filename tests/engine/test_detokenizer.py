"""Incremental detokenization: the pieces always add up to the full decode, without broken characters."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer, token_text

CORPUS = [
    "Hello world, héllo café naïve résumé.",
    "日本語のテキストです。東京は大きい。",
    "Emoji 🎉🚀 time 👍🏽 and 🇫🇷 flags!",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé ßtraße — “quotes” and ellipsis…",
]
TEXTS = [
    "é",
    "日本語",
    "🎉",
    "Hello 日本語 🎉 café!",
    "  spaced  out  ",
    "👍🏽🇫🇷",
    "a\nb\tc",
    "naïve — “ok”…",
]


def _train(pre_tokenizer, decoder, vocab_size: int, alphabet: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        if decoder.__class__.__name__ == "ByteLevel"
        else [],
    )
    tokenizer.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def byte_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE: one non-ASCII character often spans several tokens."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return _train(byte_level, decoders.ByteLevel(), 320, alphabet=pre_tokenizers.ByteLevel.alphabet())


@pytest.fixture(scope="module")
def metaspace_bpe() -> PreTrainedTokenizerFast:
    """A SentencePiece (Llama-2) style tokenizer that drops the leading space of a decode."""
    return _train(
        pre_tokenizers.Metaspace(prepend_scheme="first"), decoders.Metaspace(prepend_scheme="first"), 400, []
    )


def _stream(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [detok.add_token(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_text_round_trips_without_broken_characters(byte_bpe, text):
    ids = byte_bpe.encode(text)
    pieces = _stream(byte_bpe, ids)
    assert "".join(pieces) == byte_bpe.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_a_character_split_over_tokens_is_held_back_until_complete(byte_bpe):
    ids = byte_bpe.encode("🎉")
    assert len(ids) > 1  # the fixture's vocabulary has no single token for it
    pieces = _stream(byte_bpe, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == "🎉"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_round_trip(byte_bpe, skip_special_tokens):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(byte_bpe)) for _ in range(rng.randrange(1, 25))]
        pieces = _stream(byte_bpe, ids, skip_special_tokens)
        assert "".join(pieces) == byte_bpe.decode(ids, skip_special_tokens=skip_special_tokens)


def test_flush_releases_an_incomplete_character(byte_bpe):
    ids = byte_bpe.encode("日")[:-1]  # the character's last byte never comes
    detok = IncrementalDetokenizer(byte_bpe, skip_special_tokens=True)
    assert [detok.add_token(i) for i in ids] == [""] * len(ids)
    tail = detok.flush()
    assert tail == byte_bpe.decode(ids) and tail.endswith("\ufffd")
    assert detok.flush() == ""


@pytest.mark.parametrize("text", ["Hello world", " Hello world", "the lazy dog jumps", "café naïve"])
def test_sentencepiece_style_spaces_match_full_decode(metaspace_bpe, text):
    ids = metaspace_bpe.encode(text)
    pieces = _stream(metaspace_bpe, ids)
    assert "".join(pieces) == metaspace_bpe.decode(ids)
    # Word-initial tokens after the first keep their space, though a lone decode of one drops it.
    for i in range(1, len(ids)):
        if metaspace_bpe.convert_ids_to_tokens(ids[i]).startswith("▁"):
            assert pieces[i].startswith(" ") and not metaspace_bpe.decode([ids[i]]).startswith(" ")


def test_sentencepiece_random_ids_round_trip(metaspace_bpe):
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(len(metaspace_bpe)) for _ in range(rng.randrange(1, 20))]
        assert "".join(_stream(metaspace_bpe, ids)) == metaspace_bpe.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped_or_kept(byte_bpe):
    eos = byte_bpe.eos_token_id
    ids = [*byte_bpe.encode("Hi"), eos]
    assert "".join(_stream(byte_bpe, ids, skip_special_tokens=True)) == "Hi"
    assert "".join(_stream(byte_bpe, ids, skip_special_tokens=False)) == "Hi<|endoftext|>"


def test_token_text_decodes_one_token(byte_bpe):
    assert "".join(token_text(byte_bpe, i) for i in byte_bpe.encode(" world")) == " world"
    assert token_text(byte_bpe, byte_bpe.eos_token_id) == "<|endoftext|>"  # special tokens are shown
    assert token_text(byte_bpe, byte_bpe.encode("🎉")[0]) == "\ufffd"  # a lone partial character


def test_prompt_context_keeps_the_leading_space_of_sentencepiece_tokens(metaspace_bpe):
    """With the prompt's last ids as context, the first generated token keeps its space (as in vLLM)."""
    prompt = metaspace_bpe("Hello world").input_ids
    generated = metaspace_bpe(" again and again").input_ids
    detok = IncrementalDetokenizer(metaspace_bpe, skip_special_tokens=True, context_ids=prompt[-4:])
    text = "".join(detok.add_token(t) for t in generated) + detok.flush()
    full = metaspace_bpe.decode(prompt + generated, skip_special_tokens=True)
    assert text == full[len(metaspace_bpe.decode(prompt, skip_special_tokens=True)) :]
    assert text.startswith(" ")
