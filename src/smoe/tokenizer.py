"""The Mixtral tokenizer, loaded offline, and the Mixtral-Instruct chat format.

By default this is the SentencePiece model that mistral-common ships as
``mistral_common/data/tokenizer.model.v1`` (32000 pieces, BOS 1, EOS 2). A ``tokenizer.model``
(SentencePiece) or ``tokenizer.json`` (Hugging Face tokenizers) inside a checkpoint directory
takes precedence.

Chat format (Mixtral-Instruct, mistral-common's tokenizer v1)::

    <s>[INST] {user 1} [/INST]{assistant 1}</s>[INST] {user 2} [/INST]

Each ``[INST] ... [/INST]`` span and each assistant reply is encoded separately, without BOS,
and the ids are concatenated; system messages are joined and prepended to the first user turn.

Tokenizers v2 and v3 (``tokenizer.model.v3`` of Mixtral-8x7B-Instruct's newer revisions, Mistral
v0.3, Mixtral-8x22B) hold ``[INST]`` and ``[/INST]`` as control tokens, one id each, and
mistral-common writes them with no spaces around, joining the system prompt to the *last* user
turn instead::

    <s>[INST]▁{user 1}[/INST]▁{assistant 1}</s>[INST]▁{system}\\n\\n{user 2}[/INST]

The format follows the vocabulary: if it has both markers as control tokens, they are used.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


def default_tokenizer_path() -> Path:
    path = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mistral-common does not ship tokenizer.model.v1 in this version")
    return path


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer file not found")
        if self.path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(str(self.path))
            # Text is text: "</s>" or "[INST]" typed by a user must be encoded as characters,
            # as SentencePiece does, or a user could end or forge chat turns with control ids.
            # Control tokens enter the ids only where this class puts them (bos, eos, chat).
            self._hf.encode_special_tokens = True
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self.bos_id = self._hf.token_to_id("<s>")
            self.eos_id = self._hf.token_to_id("</s>")
        else:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
            self._hf = None
            self.vocab_size = self._sp.vocab_size()
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        inst, end = self.id_of("[INST]"), self.id_of("[/INST]")
        # None for v1, whose chat markers are plain text.
        self.inst_ids: tuple[int, int] | None = (inst, end) if inst is not None and end is not None else None

    def id_of(self, control: str) -> int | None:
        """The id of a control token such as "[INST]", or None if the vocabulary has it only as
        text (v1 splits it into "▁[", "INST", "]")."""
        if self._sp is not None:
            i = self._sp.piece_to_id(control)
            return i if self._sp.id_to_piece(i) == control and self._sp.is_control(i) else None
        i = self._hf.token_to_id(control)
        added = self._hf.get_added_tokens_decoder().get(i) if i is not None else None
        return i if added is not None and added.special else None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if self._sp is not None:
            ids = self._sp.encode(text)
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + list(ids) + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of many texts, without BOS/EOS. SentencePiece and tokenizers both encode a list
        in native code, which is faster than a Python loop over ``encode``."""
        if self._sp is not None:
            return self._sp.encode(list(texts))
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id)]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        """The raw vocabulary piece (SentencePiece marks a leading space with '▁')."""
        return self._sp.id_to_piece(int(i)) if self._sp is not None else self._hf.id_to_token(int(i))

    def encode_chat(self, messages: Sequence[Message | dict]) -> list[int]:
        """Mixtral-Instruct ids for a conversation that ends with a user turn (ready to
        generate) or with an assistant turn (closed by EOS)."""
        msgs = [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in messages]
        system = "\n\n".join(m.content for m in msgs if m.role == "system")
        turns = [m for m in msgs if m.role != "system"]
        if not turns or turns[0].role != "user":
            raise ValueError("a chat must start with a user message (after any system messages)")
        last_user = max(i for i, m in enumerate(turns) if m.role == "user")
        # v1 prepends the system prompt to the first user turn, v2/v3 to the last.
        system_turn = 0 if self.inst_ids is None else last_user
        ids = [self.bos_id]
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                raise ValueError(f"message {i} has role {m.role!r}; roles must alternate user/assistant")
            if m.role == "user":
                content = f"{system}\n\n{m.content}" if i == system_turn and system else m.content
                if self.inst_ids is None:
                    ids += self.encode(f"[INST] {content} [/INST]", bos=False)
                else:
                    ids += [self.inst_ids[0], *self.encode(content, bos=False), self.inst_ids[1]]
            else:
                ids += self.encode(m.content, bos=False) + [self.eos_id]
        return ids


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """``path`` may be a tokenizer file, a checkpoint directory, or None for the default."""
    if path is None:
        return Tokenizer(default_tokenizer_path())
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (p / name).is_file():
                return Tokenizer(p / name)
        # Mistral's own downloads (mistral-inference) name the SentencePiece file by version,
        # e.g. tokenizer.model.v3 for Mixtral-8x22B: its 32768 ids are not v1's, so the
        # default must not stand in for it.
        versioned = [f for f in p.glob("tokenizer.model.v*") if f.is_file()]
        if versioned:
            return Tokenizer(max(versioned, key=lambda f: [int(n) for n in re.findall(r"\d+", f.name)]))
        tekken = sorted(f.name for f in p.glob("tekken*.json"))
        if tekken:
            raise ValueError(
                f"{p}: holds a Tekken tokenizer ({tekken[0]}), which smoe cannot read; "
                "pass a SentencePiece tokenizer.model or a tokenizer.json"
            )
        return Tokenizer(default_tokenizer_path())
    return Tokenizer(p)
