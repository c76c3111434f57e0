"""Incremental detokenisation of one generated sequence, with stop strings.

Decoding token by token and concatenating is wrong for SentencePiece: a piece's leading space
is dropped at the start of a decode, and a multi-byte character split over byte-fallback
tokens decodes to U+FFFD until its last byte arrives. So each step decodes
``context + generated`` (context = the prompt's last tokens) and emits only the new suffix,
holding back a trailing U+FFFD and any tail that could still grow into a stop string.
Hugging Face's byte-fallback decoder (tokenizer.json) also rewrites a whole run of byte tokens
to U+FFFD once a byte of it proves invalid, e.g. ``<0x41>`` "A" then ``<0x80>`` "\ufffd\ufffd", so
with such a decoder the text of a run of byte tokens is held until a non-byte token ends it.

Example, stop string "\\n\\nUser:" and generated text "Sure.\\n\\nUs": "Sure." is emitted and
"\\n\\nUs" held back; if the next token makes it "Sure.\\n\\nUser:", the stream ends with text
"Sure.", otherwise the held-back tail is emitted with the next delta.
"""

from __future__ import annotations

import re
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


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _rewrites_byte_runs(tokenizer: Decoder) -> bool:
    """Whether ``decode`` turns a whole byte-token run with an invalid byte into U+FFFD (Hugging
    Face's ByteFallback: "\U0001d538" + a stray first byte gives five U+FFFD) rather than only
    the invalid bytes (SentencePiece gives "\U0001d538\ufffd"). False when it cannot tell."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None or not hasattr(tokenizer, "id_to_piece"):
        return False
    ids = list(encode("\U0001d538", bos=False))  # four byte tokens where the vocabulary lacks it
    return "\U0001d538" not in tokenizer.decode(ids + ids[-4:-3])


class TextStream:
    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.context, self.context_text = _context(tokenizer, prompt_ids)
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the full text so far (may end in a held-back tail)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False
        self._byte_runs_rewrite = _rewrites_byte_runs(tokenizer)
        self._settled = 0  # characters of ``text`` that no later token can rewrite

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
        if not (self._byte_runs_rewrite and _BYTE_PIECE.fullmatch(self.tokenizer.id_to_piece(token_id))):
            self._settled = len(self.text)  # the text before an open run of byte tokens stays as is
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.flush()
        safe = min(len(self.text) - self._held_back(), self._settled)
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
