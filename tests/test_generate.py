"""Generation: greedy equals transformers' generate, batched equals one by one, seeded runs
repeat, limits fail loudly, and the stop conditions end rows."""

from __future__ import annotations

import pytest
import torch

import smoe
from smoe.fast_decode import FastDecodeStep
from smoe.generate import GenerationConfig, Generator

PROMPTS = [[1, 5, 9, 33, 4], [1, 60], [1, 7, 7, 7, 12, 90, 44, 3, 18, 25, 61], [1, 2 + 40, 50, 51]]


def _hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def _ids(gen: Generator, prompts, cfg: GenerationConfig) -> list[list[int]]:
    return [c.token_ids for c in gen.generate(prompts, cfg)]


@pytest.mark.parametrize("window,cpu_layout", [(None, False), (6, False), (None, True)])
def test_greedy_equals_transformers(make_hf, window, cpu_layout):
    """Also with a window shorter than prompt + output (the rolling buffer wraps), a prefill
    chunk shorter than the longest prompt, and the CPU decode weight layout."""
    directory, ref = make_hf(sliding_window=window)
    gen = Generator(smoe.load_model(directory), cpu_layout=cpu_layout)
    cfg = GenerationConfig(max_new_tokens=14, prefill_chunk=4)
    for prompt in PROMPTS:
        expected = _hf_greedy(ref, prompt, 14)
        assert gen.generate([prompt], cfg)[0].token_ids == expected


def test_batched_equals_one_by_one(make_hf, decode_engine):
    directory, _ = make_hf(sliding_window=5)
    gen = Generator(smoe.load_model(directory), cpu_layout=True)
    assert isinstance(gen._decode_step, FastDecodeStep)  # the lean CPU step is in use
    for cfg in [
        GenerationConfig(max_new_tokens=10, prefill_chunk=3),
        GenerationConfig(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=20, seed=11),
    ]:
        batch = _ids(gen, PROMPTS, cfg)
        for b, prompt in enumerate(PROMPTS):
            solo_cfg = cfg if cfg.seed is None else GenerationConfig(**{**cfg.__dict__, "seed": cfg.seed + b})
            assert _ids(gen, [prompt], solo_cfg)[0] == batch[b]


def test_seeded_sampling_repeats(make_hf):
    directory, _ = make_hf()
    gen = Generator(smoe.load_model(directory))
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.2, seed=5, stop_at_eos=False)
    a, b = _ids(gen, PROMPTS[:2], cfg), _ids(gen, PROMPTS[:2], cfg)
    assert a == b
    other = _ids(
        gen, PROMPTS[:2], GenerationConfig(max_new_tokens=12, temperature=1.2, seed=6, stop_at_eos=False)
    )
    assert other != a


class _AlwaysToken(torch.nn.Module):
    """An output head whose argmax is always ``token`` (stands in for a model that says EOS)."""

    def __init__(self, vocab: int, token: int):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x_BTD.shape[:-1], self.vocab)
        logits[..., self.token] = 1.0
        return logits


def test_eos_and_length_end_rows(make_hf):
    directory, _ = make_hf()
    model = smoe.load_model(directory)
    gen = Generator(model)
    free = gen.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=6, stop_at_eos=False))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    assert gen.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=0))[0].token_ids == []
    model.output = _AlwaysToken(97, 2)
    res = gen.generate([[1, 5, 6], [1, 8]], GenerationConfig(max_new_tokens=8))
    assert [r.token_ids for r in res] == [[2], [2]] and res[0].finish_reason == "eos"
    cont = gen.generate([[1, 5, 6]], GenerationConfig(max_new_tokens=3, stop_at_eos=False))[0]
    assert cont.token_ids == [2, 2, 2] and cont.finish_reason == "length"


def test_context_overflow_raises_and_truncate_keeps_newest(make_hf):
    directory, ref = make_hf(max_position_embeddings=32)
    gen = Generator(smoe.load_model(directory))
    prompt = list(range(3, 28))  # 25 tokens
    with pytest.raises(ValueError, match="max_seq_len=32"):
        gen.generate([prompt], GenerationConfig(max_new_tokens=8))
    res = gen.generate([prompt], GenerationConfig(max_new_tokens=8, truncate=True))[0]
    assert res.truncated == 1 and res.prompt_tokens == 24
    assert res.token_ids == gen.generate([prompt[1:]], GenerationConfig(max_new_tokens=8))[0].token_ids


def test_bad_prompts_raise(make_hf):
    directory, _ = make_hf()
    gen = Generator(smoe.load_model(directory))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        gen.generate([[1, 97]], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        gen.generate(["hello"], GenerationConfig(max_new_tokens=2))


def test_tokenizer_larger_than_vocab_raises(make_hf):
    directory, _ = make_hf()
    with pytest.raises(ValueError, match="vocab_size is 97"):
        Generator(smoe.load_model(directory), smoe.load_tokenizer())


@pytest.mark.parametrize("cpu_layout", [False, True])
def test_generator_follows_the_model_to_another_dtype(make_hf, cpu_layout):
    """``model.to(bf16)`` between two generations: the reused Generator must not write into the
    old float32 cache."""
    directory, _ = make_hf()
    model = smoe.load_model(directory)
    gen = Generator(model, cpu_layout=cpu_layout)
    cfg = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    _ids(gen, PROMPTS[:2], cfg)
    model.to(torch.bfloat16)
    assert _ids(gen, PROMPTS[:2], cfg) == _ids(Generator(model, cpu_layout=cpu_layout), PROMPTS[:2], cfg)
