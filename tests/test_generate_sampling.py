"""Sampling: filters equal transformers' warpers, draws follow the filtered distribution, bad
values fail loudly, and each row's draws depend only on its own seed."""

from __future__ import annotations

import pytest
import torch

from smoe.generate import GenerationConfig
from smoe.sampling import SamplingConfig, argmax_rows, filter_logits, make_generators, sample


@pytest.mark.parametrize(
    "top_k,top_p", [(5, 1.0), (0, 0.9), (0, 0.3), (7, 0.8), (1, 1.0), (0, 1e-6), (40, 1.0)]
)
def test_filters_equal_transformers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 33, generator=torch.Generator().manual_seed(top_k)) * 3
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    kept = ~torch.isinf(got)
    assert torch.equal(got[kept], logits[kept])


def test_draws_follow_filtered_distribution():
    """Closed form: top_k=3 over logits log([.5, .3, .15, .05]) -> probs .5/.95, .3/.95, .15/.95."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(1, 4)
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    gens = make_generators([123], "cpu")
    n = 4000
    counts = torch.bincount(torch.cat([sample(logits, cfg, gens) for _ in range(n)]), minlength=4).float()
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert counts[3] == 0
    torch.testing.assert_close(counts / n, expected, atol=0.03, rtol=0)


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    gens = make_generators([0], "cpu")
    cold = torch.cat([sample(logits, SamplingConfig(temperature=0.05), gens) for _ in range(300)])
    assert (cold == 0).all()
    assert sample(logits, SamplingConfig()).item() == 0  # greedy needs no generator


def test_rows_draw_independently():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=1.0, top_p=0.95)
    batch = sample(logits, cfg, make_generators([7, 8, 9], "cpu"))
    for b, seed in enumerate([7, 8, 9]):
        assert sample(logits[b : b + 1], cfg, make_generators([seed], "cpu")).item() == batch[b].item()


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("inf")), "temperature"),  # uniform sampling, never meant
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=True), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(prefill_chunk=0), "prefill_chunk"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_bad_values_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**bad)


def test_sampling_without_generators_raises():
    with pytest.raises(ValueError, match="generator per row"):
        sample(torch.zeros(2, 5), SamplingConfig(temperature=1.0))


def _argmax_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1024, generator=g)
    x[1] = 0.5  # a constant row: the first index wins
    x[2, [700, 3, 300]] = 9.0  # ties in different blocks
    x[3, 900], x[3, 5] = float("nan"), 100.0  # NaN beats everything, as in torch.argmax
    x[4] = float("-inf")
    x[5, [260, 600]] = float("nan")  # two NaNs: the first
    wide = torch.randn(3, 2, 512, generator=g)[:, 1]  # rows with a stride of 1024
    return [x, wide, torch.randn(4, 1000, generator=g), torch.randn(1, 512, generator=g), x.half()]


@pytest.mark.parametrize("i", range(5))
def test_argmax_rows_equals_argmax(i):
    x = _argmax_cases()[i]
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.9)])
def test_tiny_temperature_is_greedy(top_k, top_p):
    """logits / 1e-45 overflowed to inf and the softmax to NaN (every draw then token 0)."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 5
    cfg = SamplingConfig(temperature=1e-45, top_k=top_k, top_p=top_p)
    got = sample(logits, cfg, make_generators(range(4), "cpu"))
    assert torch.equal(got, logits.argmax(dim=-1))


@pytest.mark.parametrize("V", [8, 32000])
def test_top_p_ties_keep_the_lowest_ids(V):
    """Tied logits across the top-p boundary: the nucleus takes the lowest ids among them (the
    rule argmax uses), in any batch, not whatever order an unstable sort left them in."""
    logits_BV = torch.zeros(3, V)
    logits_BV[1, -1] = 100.0  # a row unlike the others in the same batch
    kept_BV = ~torch.isinf(filter_logits(logits_BV, 0, 0.5))
    assert kept_BV[0].nonzero().flatten().tolist() == list(range(V // 2))
    assert kept_BV[1].nonzero().flatten().tolist() == [V - 1]
    assert torch.equal(kept_BV[2], kept_BV[0])
