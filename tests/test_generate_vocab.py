"""Tokenizer and model vocabularies paired in a Generator: a model vocabulary padded past the
tokenizer's (common in released checkpoints) generates what the unpadded model generates,
and ids only one side knows are refused with a message that names both sizes."""

from __future__ import annotations

import pytest
import torch

import smoe
from smoe.config import ModelConfig
from smoe.generate import GenerationConfig, Generator

N_TOK, N_PAD = 32000, 32768  # the v1 tokenizer; the model's vocabulary padded to a multiple of 256


@pytest.fixture(scope="module")
def tok():
    tok = smoe.load_tokenizer()
    assert tok.vocab_size == N_TOK
    return tok


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A model on the padded vocabulary whose padding rows outscore every real id (a padded
    id would win every greedy step), and the same weights without the padding rows."""
    padded = smoe.build_model(
        ModelConfig.preset("tiny", n_layers=2, max_seq_len=64, vocab_size=N_PAD), seed=0
    )
    with torch.no_grad():
        w_VD = padded.output.weight
        w_VD[N_TOK:] = 10 * w_VD[: N_PAD - N_TOK]  # id N_TOK + i scores 10x id i
    plain = smoe.build_model(ModelConfig.preset("tiny", n_layers=2, max_seq_len=64, vocab_size=N_TOK), seed=0)
    state = {k: v[:N_TOK] if v.shape[0] == N_PAD else v for k, v in padded.state_dict().items()}
    plain.load_state_dict(state)
    return padded, plain


@pytest.mark.parametrize("cpu_layout", [False, True])
def test_padded_vocab_generates_as_the_unpadded_model(tok, cpu_layout):
    padded, plain = _models()
    for cfg in [
        GenerationConfig(max_new_tokens=8, stop_at_eos=False),
        GenerationConfig(max_new_tokens=8, temperature=0.9, top_k=40, seed=4, stop_at_eos=False),
    ]:
        got = Generator(padded, tok, cpu_layout=cpu_layout).generate(["Hello there", "A cat"], cfg)
        want = Generator(plain, tok, cpu_layout=cpu_layout).generate(["Hello there", "A cat"], cfg)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [r.text for r in got] == [r.text for r in want]
        assert all(t < N_TOK for r in got for t in r.token_ids)


def test_padded_ids_without_tokenizer_are_sampled():
    """Without a tokenizer nothing decodes the ids, so every id of the model stays allowed."""
    padded, _ = _models()
    res = Generator(padded).generate([[1, 5, 9]], GenerationConfig(max_new_tokens=4, stop_at_eos=False))[0]
    assert all(t >= N_TOK for t in res.token_ids)


def test_prompt_id_past_the_tokenizer_is_refused(tok):
    padded, _ = _models()
    gen = Generator(padded, tok)
    with pytest.raises(ValueError, match=f"token id 32100, but the tokenizer .* has only {N_TOK} pieces"):
        gen.generate([[1, 5, 32100]], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match=f"token id 32100, but the tokenizer .* has only {N_TOK} pieces"):
        list(gen.stream([1, 5, 32100], GenerationConfig(max_new_tokens=2)))


def test_tokenizer_larger_than_the_model_is_refused(tok):
    small = smoe.build_model(ModelConfig.preset("tiny", n_layers=1, max_seq_len=64, vocab_size=500), seed=0)
    with pytest.raises(
        ValueError, match=r"32000 pieces .* vocab_size is 500.*tokenizer\.model or tokenizer\.json"
    ):
        Generator(small, tok)
