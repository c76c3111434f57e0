"""Text output: incremental detokenisation with the real Mixtral tokenizer, stop strings, and
streaming through a model on the 32000-token vocabulary."""

from __future__ import annotations

import pytest

import smoe
from smoe.config import ModelConfig
from smoe.generate import GenerationConfig, Generator, generate
from smoe.textstream import TextStream

TEXT = "Héllo wörld, 你好 🙂 tabs\tand  spaces.\n\nUser: stop here"


@pytest.fixture(scope="module")
def tok():
    return smoe.load_tokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig.preset("tiny", n_layers=2, max_seq_len=128)
    return smoe.build_model(cfg, seed=0)


def _push_all(stream: TextStream, ids: list[int]) -> list[str]:
    out = []
    for i in ids:
        out.append(stream.push(i))
        if stream.stopped:
            break
    out.append(stream.flush())
    return out


@pytest.mark.parametrize("prompt", ["", "Say:", "Multi-byte 你"])
def test_deltas_join_to_decoded_text(tok, prompt):
    prompt_ids = tok.encode(prompt)
    ids = tok.encode(TEXT, bos=False)
    deltas = _push_all(TextStream(tok, prompt_ids), ids)
    expected = tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)) :]
    assert "".join(deltas) == expected
    assert all("\ufffd" not in d for d in deltas)  # split characters are held back, not emitted broken


def test_stop_string_cuts_and_is_never_emitted(tok):
    ids = tok.encode(TEXT, bos=False)
    stream = TextStream(tok, [tok.bos_id], stop=["\n\nUser:"])
    deltas = _push_all(stream, ids)
    assert stream.stopped
    assert "".join(deltas) == stream.text == TEXT.split("\n\nUser:")[0]
    assert len(stream.ids) < len(ids)  # it ended before the last token


def test_stream_and_generate_agree(tok, tiny_model):
    gen = Generator(tiny_model, tok)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=3, stop_at_eos=False)
    results: list = []
    pieces = list(gen.stream("The capital of France is", cfg, results))
    whole = gen.generate(["The capital of France is"], cfg)[0]
    assert "".join(pieces) == whole.text == results[0].text
    assert results[0].token_ids == whole.token_ids and len(whole.token_ids) == 12


def test_stop_string_ends_generation(tok, tiny_model):
    gen = Generator(tiny_model, tok)
    cfg = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
    free = gen.generate(["Once upon a time"], cfg)[0]
    text = free.text
    assert len(text) > 6
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    callback: list[tuple[int, str]] = []
    stopped = gen.generate(
        ["Once upon a time"],
        GenerationConfig(max_new_tokens=16, stop=(stop,)),
        on_text=lambda r, d: callback.append((r, d)),
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.find(stop)]
    assert "".join(d for _, d in callback) == stopped.text
    assert free.token_ids[: len(stopped.token_ids)] == stopped.token_ids


def test_convenience_function(tok, tiny_model):
    one = generate(tiny_model, tok, "Hi", max_new_tokens=3, stop_at_eos=False)
    many = generate(tiny_model, tok, ["Hi", "A longer prompt here"], max_new_tokens=3, stop_at_eos=False)
    assert one.token_ids == many[0].token_ids and len(many) == 2


def test_chat_prompt_ids(tok, tiny_model):
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    res = Generator(tiny_model, tok).generate([ids], GenerationConfig(max_new_tokens=2, stop_at_eos=False))[0]
    assert res.prompt_tokens == len(ids) and len(res.token_ids) == 2
