"""Router precision and jitter, and the capacity rule at its edges (T = 0, T = 1, a factor that
is not a positive number, every token to one expert).

Legend: B batch, T tokens, D model dim, E experts, K chosen experts per token.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import smoe
from smoe.dispatch.capacity import apply_capacity, expert_capacity


def tiny_moe(dtype=torch.float32, **overrides):
    cfg = smoe.ModelConfig.preset("tiny", n_layers=1, vocab_size=101, **overrides)
    return cfg, smoe.build_model(cfg, dtype=dtype, seed=0).layers[0].feed_forward


def test_router_is_float32_under_bf16_autocast():
    """Training in bf16 runs the model under autocast, which would turn the router's F.linear
    into a bf16 product; the router must still give float32 logits equal to the plain ones."""
    cfg, moe = tiny_moe()
    x_TD = torch.randn(6, cfg.dim, generator=torch.Generator().manual_seed(0))
    want = moe.gate(x_TD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe.gate(x_TD)
    assert got.logits_TE.dtype == got.weights_TK.dtype == torch.float32
    torch.testing.assert_close(got.logits_TE, want.logits_TE)
    torch.testing.assert_close(got.weights_TK, want.weights_TK)


def test_router_of_bf16_model_matches_float32_arithmetic():
    cfg, moe = tiny_moe(dtype=torch.bfloat16)
    x_TD = torch.randn(6, cfg.dim, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = moe.gate(x_TD)
    want_TE = x_TD.double() @ moe.gate.weight.double().t()
    assert got.logits_TE.dtype == got.weights_TK.dtype == torch.float32
    torch.testing.assert_close(got.logits_TE.double(), want_TE, atol=1e-5, rtol=1e-5)


def test_jitter_only_while_training_and_not_rounded_away_in_bf16():
    """jitter=0.002 multiplies the router input by U(0.998, 1.002). In bf16 every such factor
    rounds to 1.0, so the noise must be drawn in float32 (where the router works)."""
    cfg, moe = tiny_moe(dtype=torch.bfloat16, router_jitter=0.002)
    x_TD = torch.randn(64, cfg.dim, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    moe.eval()
    clean = moe.gate(x_TD).logits_TE
    assert torch.equal(moe.gate(x_TD).logits_TE, clean)  # no noise in eval mode
    moe.train()
    torch.manual_seed(0)
    noisy = moe.gate(x_TD).logits_TE
    assert not torch.equal(noisy, clean)
    # Small noise: a relative change of at most the jitter on each input, so on each logit at
    # most jitter * sum |x_d w_ed|.
    bound_TE = 0.002 * (x_TD.float().abs() @ moe.gate.weight.float().abs().t())
    assert torch.all((noisy - clean).abs() <= bound_TE * 1.01 + 1e-6)


@pytest.mark.parametrize("factor", [0.0, -0.5, float("nan"), float("inf")])
def test_capacity_factor_that_is_not_a_positive_number_is_refused(factor):
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(factor, 10, 2, 8)
    with pytest.raises(ValueError, match="capacity_factor"):
        apply_capacity(torch.zeros(10, 2, dtype=torch.long), 8, factor)


def test_capacity_factor_accepts_numpy_and_int():
    # The exact arithmetic is on the float's shortest repr: 1.1, not np.float64(1.1).
    assert expert_capacity(np.float64(1.1), 100, 2, 4) == 55
    assert expert_capacity(np.float32(0.5), 4, 2, 2) == 2
    assert expert_capacity(1, 10, 2, 8) == 3


def test_capacity_with_no_tokens_and_one_token():
    cfg, moe = tiny_moe(capacity_factor=0.5)
    y_BTD, routing = moe(torch.randn(1, 0, cfg.dim))
    assert y_BTD.shape == (1, 0, cfg.dim) and routing.dropped_TK.shape == (0, cfg.top_k)
    assert routing.dropped_fraction().item() == 0.0  # nothing to drop, not 0/0
    assert routing.tokens_per_expert().sum().item() == 0
    # One token: capacity = ceil(0.5 * 1 * 2 / 8) = 1 >= its single assignment to each expert.
    y_BTD, routing = moe(torch.randn(1, 1, cfg.dim))
    assert not routing.dropped_TK.any() and routing.dropped_fraction().item() == 0.0
    assert routing.tokens_per_expert().sum().item() == cfg.top_k


def test_capacity_when_every_token_picks_the_same_experts():
    """T=10, K=2, E=8, factor 0.5 -> capacity ceil(0.5 * 10 * 2 / 8) = 2: expert 0 keeps tokens
    0, 1 (first choices), expert 1 keeps tokens 0, 1 (second choices); 16 of 20 dropped."""
    ids_TK = torch.tensor([[0, 1]] * 10)
    assert expert_capacity(0.5, 10, 2, 8) == 2
    kept_TK, dropped_TK = apply_capacity(ids_TK, 8, 0.5)
    want_TK = torch.arange(10)[:, None].expand(10, 2) >= 2
    assert torch.equal(dropped_TK, want_TK)
    assert torch.equal(kept_TK, ids_TK.masked_fill(want_TK, 8))
    # A factor so small that ceil(...) < 1 row is still 1 row: the first token keeps both.
    assert expert_capacity(0.01, 10, 2, 8) == 1
    assert apply_capacity(ids_TK, 8, 0.01)[1].sum().item() == 18


def test_dropped_fraction_and_counts_per_layer_in_the_model():
    """Each layer's RouterOutput reports its own dropped count / (T * K); tokens_per_expert counts
    the router's assignments before the drop, and with the drop removed the kept ones."""
    cfg = smoe.ModelConfig.preset("tiny", n_layers=2, vocab_size=101, capacity_factor=0.5)
    model = smoe.build_model(cfg, seed=0)
    tokens_BT = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(4))
    _, routings = model(tokens_BT, return_router=True)
    T, K, E = 22, cfg.top_k, cfg.num_experts
    capacity = math.ceil(0.5 * T * K / E)
    for r in routings:
        dropped = int(r.dropped_TK.sum())
        assert r.dropped_fraction().item() == pytest.approx(dropped / (T * K))
        counts_E = r.tokens_per_expert()
        assert counts_E.sum().item() == T * K
        kept_E = smoe.dispatch.tokens_per_expert(r.expert_ids_TK.masked_fill(r.dropped_TK, E), E)
        assert torch.equal(kept_E, counts_E.clamp(max=capacity))
        assert kept_E.sum().item() == T * K - dropped
