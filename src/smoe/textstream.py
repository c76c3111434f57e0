"""Incremental detokenisation of one generated sequence, with stop strings.

Decoding token by token and concatenating is wrong for SentencePiece: a piece's leading space
is dropped at the start of a decode, and a multi-byte character split over byte-fallback
tokens decodes to U+FFFD until its last byte arrives. So each step decodes
``context + generated`` (context = the prompt's last tokens) and emits only the new suffix,
holding back a trailing U+FFFD and any tail that could still grow into a stop string.

Example, stop string "\\n\\nUser:" and generated text "Sure.\\n\\nUs": "Sure." is emitted and
"\\n\\nUs" held back; if the next token makes it "Sure.\\n\\nUser:", the stream ends with text
"Sure.", otherwise the held-back tail is emitted with the next delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


CONTEXT_TOKENS = 3  # prompt tokens decoded in front of the generated ones (for spacing)
MAX_CONTEXT_TOKENS = 16


def _context(tokenizer: Decoder, prompt_ids: Sequence[int]) -> tuple[list[int], str]:
    """The prompt's last ``CONTEXT_TOKENS`` tokens and their text, or more tokens if those begin
    inside a character split over byte tokens: Hugging Face's byte-fallback decoder turns a
    whole run of byte tokens into U+FFFD when the run is not valid UTF-8, so orphan bytes in the
    context would also garble the reply's first bytes, which join their run."""
    ids = list(prompt_ids)
    n, most = min(CONTEXT_TOKENS, len(ids)), min(len(ids), MAX_CONTEXT_TOKENS)
    while True:
        context = ids[len(ids) - n :]
        text = tokenizer.decode(context)
        if "\ufffd" not in text or n >= most:
            return context, text
        n += 1


class TextStream:
    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.context, self.context_text = _context(tokenizer, prompt_ids)
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the full text so far (may end in a held-back tail)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def _decode(self) -> str:
        full = self.tokenizer.decode(self.context + self.ids)
        if full.startswith(self.context_text):
            return full[len(self.context_text) :]
        return self.tokenizer.decode(self.ids)  # the context merged with the reply: no prefix to cut

    def push(self, token_id: int) -> str:
        """Add one token; return the newly safe text. Sets ``stopped`` when a stop string ends it."""
        if self.stopped:
            raise RuntimeError("TextStream.push after a stop string ended the stream")
        self.ids.append(int(token_id))
        self.text = self._decode()
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.flush()
        safe = len(self.text) - self._held_back()
        if safe <= self.emitted:
            return ""
        delta = self.text[self.emitted : safe]
        self.emitted = safe
        return delta

    def flush(self) -> str:
        """Everything not yet emitted (call when the sequence ends)."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def _held_back(self) -> int:
        # A trailing U+FFFD is a character still arriving byte by byte: it may complete a stop
        # string, so the stop-string prefix is looked for in front of it and held with it.
        text = self.text.rstrip("\ufffd")
        pending = len(self.text) - len(text)
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return pending + hold
