"""Stop sequences on streamed text, and token-level finishing (EOS, length)."""

from __future__ import annotations

import pytest

from engine.stopping import StopStringMatcher, check_token_finish
from engine.types import FinishReason, SamplingParams


def _run(stops: tuple[str, ...], chunks: list[str], include: bool = False) -> tuple[list[str], bool, str]:
    matcher = StopStringMatcher(stops, include_stop_str_in_output=include)
    released, is_stopped = [], False
    for chunk in chunks:
        text, is_stopped = matcher.feed(chunk)
        released.append(text)
        if is_stopped:
            break
    return released, is_stopped, matcher.flush()


def test_no_stop_sequences_passes_text_straight_through():
    assert _run((), ["Hel", "lo"]) == (["Hel", "lo"], False, "")


def test_empty_stop_strings_are_ignored():
    assert _run(("",), ["Hel", "lo"]) == (["Hel", "lo"], False, "")


def test_stop_split_across_chunks_is_found_and_held_back():
    released, is_stopped, tail = _run(("world",), ["Hel", "lo wor", "ld", "never seen"])
    assert released == ["Hel", "lo ", ""]
    assert is_stopped and tail == ""


def test_include_stop_str_in_output():
    released, is_stopped, _ = _run(("world",), ["Hel", "lo wor", "ld!"], include=True)
    assert "".join(released) == "Hello world" and is_stopped


def test_text_after_the_stop_in_the_same_chunk_is_dropped():
    assert _run(("\n\n",), ["one\n\ntwo"]) == (["one"], True, "")


def test_held_text_is_released_once_it_cannot_start_a_stop():
    released, is_stopped, _ = _run(("world",), ["Hello wo", "rm", "s"])
    assert released == ["Hello ", "worm", "s"] and not is_stopped


def test_held_text_is_released_by_flush():
    released, is_stopped, tail = _run(("world",), ["Hello wor"])
    assert released == ["Hello "] and not is_stopped and tail == "wor"


def test_a_later_partial_does_not_hide_an_earlier_full_match():
    # "b" is complete; "abcd" could still be forming but must not delay the stop.
    assert _run(("abcd", "b"), ["xab"]) == (["xa"], True, "")


@pytest.mark.parametrize(
    ("stops", "expected"),
    [
        (
            ("lo", "Hel"),
            "",
        ),  # "Hel" completes before "lo"
        (("world", "o w"), "Hell"),  # "o w" completes before "world"
        (("llo", "ello"), "H"),  # both end together: the one that starts first wins
    ],
)
def test_the_stop_that_completes_first_wins(stops, expected):
    whole = _run(stops, ["Hello world"])
    char_by_char = _run(stops, list("Hello world"))
    assert "".join(whole[0]) == "".join(char_by_char[0]) == expected
    assert whole[1] and char_by_char[1]


def test_feeding_after_the_stop_releases_nothing():
    matcher = StopStringMatcher(("x",), include_stop_str_in_output=False)
    assert matcher.feed("ax") == ("a", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_repeated_prefix_characters_are_held_correctly():
    # "aab": after "aa", only the last "a" may still start "ab"; the first is safe.
    released, is_stopped, _ = _run(("ab",), ["a", "a", "b"])
    assert released == ["", "a", ""] and is_stopped


def test_eos_stops_unless_ignored():
    params = SamplingParams(max_new_tokens=10)
    assert check_token_finish(2, 1, params, frozenset({2})) is FinishReason.STOP
    assert check_token_finish(3, 1, params, frozenset({2})) is None
    ignoring = SamplingParams(max_new_tokens=10, ignore_eos=True)
    assert check_token_finish(2, 1, ignoring, frozenset({2})) is None


def test_length_finish():
    params = SamplingParams(max_new_tokens=3)
    assert check_token_finish(5, 2, params, frozenset()) is None
    assert check_token_finish(5, 3, params, frozenset()) is FinishReason.LENGTH
    assert check_token_finish(0, 3, params, frozenset({0})) is FinishReason.STOP  # EOS wins over length
