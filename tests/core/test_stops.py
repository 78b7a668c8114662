"""Stop strings over streamed text: the deltas join to the whole-text answer."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hd4k_tools.runtime.stops import StopFilter, cut_at_stops


def _stream(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    f = StopFilter(stops)
    out = "".join(f.feed(p) for p in pieces) + f.finish()
    return out, f.stopped


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("  hello world  ", [], ("hello world", False)),
        ("answer: 42\nQuestion: next", ["\nQuestion:"], ("answer: 42", True)),
        ("a STOP b STOP", ["STOP"], ("a", True)),
        ("no stop here", ["xyz"], ("no stop here", False)),
        ("early x late y", ["y", "x"], ("earl", True)),
    ],
)
def test_cut_at_stops(text: str, stops: list[str], expected: tuple[str, bool]) -> None:
    assert cut_at_stops(text, stops) == expected


def test_partial_stop_is_held_back_until_decided() -> None:
    f = StopFilter(["END"])
    assert f.feed("abc E") == "abc"  # " E" might start "END"
    assert f.feed("N") == ""
    assert f.feed("X more") == " ENX more"
    assert f.finish() == ""
    g = StopFilter(["END"])
    assert g.feed("abc EN") == "abc"
    assert g.feed("D tail") == ""
    assert g.stopped and g.finish() == ""


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    text=st.text(alphabet="ab \nXY", max_size=40),
    stops=st.lists(st.text(alphabet="abXY\n", min_size=1, max_size=3), max_size=2),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_any_split_into_deltas_gives_the_whole_text_answer(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert _stream(pieces, stops) == cut_at_stops(text, stops)


def test_deltas_as_the_chat_models_see_them() -> None:
    def run(deltas: list[str], stop: list[str]) -> tuple[list[str], str]:
        f = StopFilter(stop)
        pieces = [f.feed(d) for d in deltas]
        pieces.append(f.finish())
        return [p for p in pieces if p], "".join(pieces)

    assert run(["  Hel", "lo wor", "ld  \n"], []) == (["Hel", "lo wor", "ld"], "Hello world")
    # A stop sequence split over deltas is held back, then cut with the whitespace before it.
    assert run(["Hello ", "wo", "rld ", "STO", "P more"], ["STOP"])[1] == "Hello world"
    assert run(["abcSTOPdef"], ["STOP", "cS"])[1] == "ab"
    assert run(["ST", "x"], ["STOP"])[1] == "STx"
    assert run(["\n\n", "  "], ["x"])[1] == ""
