"""Prompts passed in the wrong shape get a clear error instead of silently
generating per character (a str) or a TypeError (a flat id list); the greedy loop returns the
steps decoded so far."""

from __future__ import annotations

import pytest
import torch

import smoe
from smoe.cache import KVCache
from smoe.config import ModelConfig
from smoe.decode_loop import GreedyDecodeLoop
from smoe.generate import GenerationConfig, Generator


@pytest.fixture(scope="module")
def tiny():
    return smoe.build_model(ModelConfig.preset("tiny", n_layers=1, max_seq_len=64), seed=0)


def test_str_passed_as_prompt_list_is_rejected(tiny):
    """``Generator.generate("Hello", cfg)`` used to run one prompt per character."""
    gen = Generator(tiny, smoe.load_tokenizer())
    with pytest.raises(ValueError, match="list of prompts"):
        gen.generate("Hello", GenerationConfig(max_new_tokens=1))


def test_flat_id_list_passed_as_prompt_list_is_rejected(tiny):
    gen = Generator(tiny)
    with pytest.raises(ValueError, match="list of prompts"):
        gen.generate([1, 5, 7], GenerationConfig(max_new_tokens=1))


def test_truncate_error_does_not_advise_truncate(tiny):
    """max_new_tokens fills the whole context: truncate=True cannot help, so the error must not
    tell the user to pass it."""
    gen = Generator(tiny)
    with pytest.raises(ValueError, match="max_new_tokens") as e:
        gen.generate([[1, 5]], GenerationConfig(max_new_tokens=64, truncate=True))
    assert "pass truncate=True" not in str(e.value)


def test_greedy_loop_run_returns_the_steps_so_far(tiny):
    cache = KVCache.for_model(tiny, 2, 16)
    loop = GreedyDecodeLoop(tiny, cache, max_steps=8)
    loop.start(torch.tensor([5, 9]), torch.zeros(2, dtype=torch.long))
    assert loop.run(3).shape == (2, 3)
    out = loop.run(2)
    assert out.shape == (2, 5)


def test_seed_near_the_top_of_torch_range_samples_every_row(tiny):
    """Row b samples with seed + b: a seed of 2**64 - 1 overflowed torch's range for row 1
    ("Overflow when unpacking long"); it wraps now. Seeds outside torch's range are refused."""
    gen = Generator(tiny)
    cfg = GenerationConfig(max_new_tokens=3, temperature=1.0, seed=2**64 - 1, stop_at_eos=False)
    rows = gen.generate([[1, 5], [1, 7]], cfg)
    assert [len(r.token_ids) for r in rows] == [3, 3]
    solo = gen.generate(
        [[1, 7]], GenerationConfig(max_new_tokens=3, temperature=1.0, seed=0, stop_at_eos=False)
    )
    assert rows[1].token_ids == solo[0].token_ids  # row 1's seed wrapped to 0
    for bad in (2**64, -(2**63) - 1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            GenerationConfig(seed=bad)
