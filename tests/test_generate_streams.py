"""Interleaved generations on one Generator: each stream owns its KV cache, so starting stream B
(or a ``generate`` call) while stream A is paused must not change A's tokens."""

from __future__ import annotations

import pytest

import smoe
from smoe.config import ModelConfig
from smoe.generate import GenerationConfig, Generator

# Same length, so that both streams ask for a cache of the same shape (the shared-cache case).
PROMPT_A = [1, 5, 9, 33, 4, 71]
PROMPT_B = [1, 60, 7, 812, 12, 90]
CFG = GenerationConfig(max_new_tokens=10, stop_at_eos=False)


@pytest.fixture(scope="module")
def tok():
    return smoe.load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return smoe.build_model(ModelConfig.preset("tiny", n_layers=2, max_seq_len=64), seed=0)


def _solo(model, tok, prompt, cpu_layout):
    return Generator(model, tok, cpu_layout=cpu_layout).generate([prompt], CFG)[0].token_ids


@pytest.mark.parametrize("step", ["model", "cpu_layout", "graph_step"])
def test_interleaved_streams_keep_their_own_tokens(model, tok, step):
    """Every decode step: the model's forward, the lean CPU step, and the CUDA-graph protocol
    (run without a graph on CPU), which captures per cache."""
    cpu_layout = step == "cpu_layout"
    gen = Generator(model, tok, cpu_layout=cpu_layout, graph_step=step == "graph_step")
    solo_a, solo_b = _solo(model, tok, PROMPT_A, cpu_layout), _solo(model, tok, PROMPT_B, cpu_layout)
    assert solo_a != solo_b  # otherwise a mix-up could not show
    res_a: list = []
    stream_a = gen.stream(PROMPT_A, CFG, res_a)
    first = next(stream_a)  # A has prefilled and decoded at least one token, then pauses
    res_b: list = []
    rest_b = list(gen.stream(PROMPT_B, CFG, res_b))  # B runs to the end meanwhile
    rest_a = list(stream_a)
    assert res_a[0].token_ids == solo_a
    assert res_b[0].token_ids == solo_b
    assert first + "".join(rest_a) == res_a[0].text and "".join(rest_b) == res_b[0].text


@pytest.mark.parametrize("cpu_layout", [False, True])
def test_generate_while_a_stream_is_open(model, tok, cpu_layout):
    gen = Generator(model, tok, cpu_layout=cpu_layout)
    res_a: list = []
    stream_a = gen.stream(PROMPT_A, CFG, res_a)
    next(stream_a)
    assert gen.generate([PROMPT_B], CFG)[0].token_ids == _solo(model, tok, PROMPT_B, cpu_layout)
    list(stream_a)
    assert res_a[0].token_ids == _solo(model, tok, PROMPT_A, cpu_layout)


def test_two_stream_steps_alternating(model, tok):
    """Token by token in lockstep, the tightest interleaving."""
    gen = Generator(model, tok, cpu_layout=True)
    a = gen.stream_ids([PROMPT_A], CFG)
    b = gen.stream_ids([PROMPT_B], CFG)
    ids_a, ids_b = [], []
    for step_a, step_b in zip(a, b):
        ids_a += step_a.tokens
        ids_b += step_b.tokens
    assert ids_a == _solo(model, tok, PROMPT_A, True)
    assert ids_b == _solo(model, tok, PROMPT_B, True)


def test_sequential_generations_reuse_one_cache(model, tok):
    """The fix must not cost an allocation per call: a finished generation's cache is reused."""
    gen = Generator(model, tok)
    gen.generate([PROMPT_A], CFG)
    cache = gen._cache
    gen.generate([PROMPT_B], CFG)
    assert cache is not None and gen._cache is cache
