"""Random id sequences, rich in byte-fallback pieces (multi-byte characters split across steps,
and invalid byte runs that decode to U+FFFD): the joined deltas must equal the stream's final
text, and that must equal the tokenizer's decode of all the ids. The SentencePiece tokenizer is
checked against sentencepiece's own decode, the tokenizer.json one against the tokenizers
library's (whose byte-fallback decoder turns a whole invalid run into U+FFFD, even bytes of it
that alone were valid text: those must not have been emitted already)."""

from __future__ import annotations

import random

import pytest

import smoe
from smoe.textstream import TextStream
from smoe.tokenizer import default_tokenizer_path


@pytest.fixture(scope="module", params=["sentencepiece", "tokenizer.json"])
def tok(request, tokenizer_json, tmp_path_factory):
    if request.param == "sentencepiece":
        return smoe.load_tokenizer()
    path = tmp_path_factory.mktemp("tokjson") / "tokenizer.json"
    return smoe.load_tokenizer(tokenizer_json(default_tokenizer_path(), ["<unk>", "<s>", "</s>"], path))


def _reference_decode(tok, ids):
    if tok._sp is not None:  # sentencepiece itself, not our wrapper
        return tok._sp.decode([i for i in ids if i not in (tok.bos_id, tok.eos_id)])
    return tok._hf.decode(ids, skip_special_tokens=True)


def test_random_ids_stream_equals_decode(tok):
    sp = smoe.load_tokenizer()._sp
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    rng = random.Random(0)
    for _ in range(400):
        prompt = [tok.bos_id] + [rng.randrange(3, tok.vocab_size) for _ in range(rng.randint(0, 5))]
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(3, tok.vocab_size)
            for _ in range(rng.randint(1, 12))
        ]
        stream = TextStream(tok, prompt)
        deltas = [stream.push(i) for i in ids] + [stream.flush()]
        full, before = _reference_decode(tok, prompt + ids), _reference_decode(tok, prompt)
        assert full.startswith(before)
        assert stream.text == full[len(before) :], (prompt, ids)
        assert "".join(deltas) == stream.text, (prompt, ids, deltas)
