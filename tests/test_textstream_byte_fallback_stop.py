"""A stop string that ends in a character split over byte-fallback tokens.
While its bytes arrive the text ends in U+FFFD, and the start of the stop string before it must
still be held back: it was emitted, so the stream leaked part of the stop string and differed
from the final text."""

from __future__ import annotations

import pytest

import smoe
from smoe.textstream import TextStream


@pytest.fixture(scope="module")
def tok():
    return smoe.load_tokenizer()


@pytest.mark.parametrize(
    "text, stop", [("Answer: \U0001d538 done", ": \U0001d538"), ("ok x\U0001d538y", "x\U0001d538")]
)
def test_stop_string_ending_in_byte_fallback_char_is_not_leaked(tok, text, stop):
    ids = tok.encode(text, bos=False)
    s = TextStream(tok, tok.encode("Say:"), (stop,))
    out = []
    for i in ids:
        out.append(s.push(i))
        if s.stopped:
            break
    out.append(s.flush())
    full = TextStream(tok, tok.encode("Say:"))
    for i in ids:
        full.push(i)
    assert s.stopped
    assert s.text == full.text[: full.text.find(stop)]
    assert "".join(out) == s.text  # the stream is the final text: nothing of the stop string leaked
