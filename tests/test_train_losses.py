"""Router losses against transformers' Mixtral ``load_balancing_loss_func`` and closed forms."""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from smoe.train.losses import load_balancing_loss, router_z_loss


def _logits(L=3, B=2, S=5, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B * S, E, generator=g) * 2 for _ in range(L)]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_balance_equals_transformers(top_k):
    logits = _logits()
    ours = load_balancing_loss(logits, top_k)
    ref = load_balancing_loss_func(tuple(logits), num_experts=8, top_k=top_k)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_balance_gradient_equals_transformers():
    logits = [x.requires_grad_() for x in _logits()]
    ours = torch.autograd.grad(load_balancing_loss(logits, 2), logits)
    ref = torch.autograd.grad(load_balancing_loss_func(tuple(logits), num_experts=8, top_k=2), logits)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_balance_with_mask_equals_transformers():
    logits = _logits(B=2, S=5)
    mask_BS = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ours = load_balancing_loss(logits, 2, mask_T=mask_BS)
    ref = load_balancing_loss_func(tuple(logits), num_experts=8, top_k=2, attention_mask=mask_BS)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_padding_is_masked():
    """Padding rows with wild logits change nothing: the loss equals that of the real rows alone."""
    real = _logits(L=2, B=1, S=6, seed=1)
    junk = [torch.full((4, 8), -50.0).index_fill(1, torch.tensor([0]), 80.0) for _ in real]
    padded = [torch.cat([r, j]) for r, j in zip(real, junk)]
    mask = torch.tensor([1] * 6 + [0] * 4)
    for per_layer in (False, True):
        torch.testing.assert_close(
            load_balancing_loss(padded, 2, mask, per_layer=per_layer),
            load_balancing_loss(real, 2, per_layer=per_layer),
        )
    torch.testing.assert_close(router_z_loss(padded, mask), router_z_loss(real))
    # Without the mask the junk does count, so the test above can fail.
    assert not torch.allclose(load_balancing_loss(padded, 2), load_balancing_loss(real, 2))


@pytest.mark.parametrize("E,top_k", [(4, 2), (8, 2), (8, 1), (6, 3)])
def test_perfect_balance_gives_top_k(E, top_k):
    """Token t prefers experts t..t+K-1 (mod E) equally: every expert gets K/E of the
    assignments and mean probability 1/E, so E * sum(K/E * 1/E) = K exactly."""
    logits_TE = torch.zeros(E, E)
    for t in range(E):
        for j in range(top_k):
            logits_TE[t, (t + j) % E] = 3.0
    for per_layer in (False, True):
        loss = load_balancing_loss([logits_TE, logits_TE], top_k, per_layer=per_layer)
        assert loss.item() == pytest.approx(top_k, abs=1e-6)
    ref = load_balancing_loss_func((logits_TE,), num_experts=E, top_k=top_k)
    assert ref.item() == pytest.approx(top_k, abs=1e-6)


def test_total_collapse_gives_E():
    """All tokens routed to the same K experts with all probability on them: f_e = 1 on each
    of those K and their P_e sum to 1, so E * sum_e f_e P_e = E."""
    E, K = 8, 2
    logits_TE = torch.full((10, E), -1e4)
    logits_TE[:, :K] = 0.0
    assert load_balancing_loss([logits_TE], K).item() == pytest.approx(E, rel=1e-6)


def test_per_layer_is_mean_of_single_layer_losses():
    logits = _logits(L=3)
    per = load_balancing_loss(logits, 2, per_layer=True)
    singles = [load_balancing_loss_func((x,), num_experts=8, top_k=2) for x in logits]
    torch.testing.assert_close(per, torch.stack(singles).mean(), rtol=1e-6, atol=1e-6)
    # Pooling differs from averaging when layers are unbalanced in opposite directions.
    a = torch.zeros(6, 4)
    a[:, 0] = 5.0
    b = torch.zeros(6, 4)
    b[:, 1] = 5.0
    assert load_balancing_loss([a, b], 1).item() < load_balancing_loss([a, b], 1, per_layer=True).item()


@pytest.mark.parametrize("E", [2, 8, 64])
def test_z_loss_of_zero_logits(E):
    z = router_z_loss([torch.zeros(7, E), torch.zeros(7, E)])
    assert z.item() == pytest.approx(math.log(E) ** 2, rel=1e-6)


def test_z_loss_closed_form():
    logits = _logits(L=2)
    expected = torch.cat([torch.logsumexp(x, -1) ** 2 for x in logits]).mean()
    torch.testing.assert_close(router_z_loss(logits), expected)


def test_bad_inputs_fail_loudly():
    with pytest.raises(ValueError, match="empty"):
        load_balancing_loss([], 2)
    with pytest.raises(ValueError, match="mask has 3 entries"):
        load_balancing_loss(_logits(), 2, mask_T=torch.ones(3))
    with pytest.raises(ValueError, match="no tokens"):
        router_z_loss(_logits(), mask_T=torch.zeros(10))


@pytest.mark.parametrize("top_k", [1, 3])
def test_balance_with_mask_value_and_gradient_equal_transformers(top_k):
    """The masked loss and its gradient, pooled over layers and per layer (the mean of
    transformers' loss on each layer alone), for a bool mask padding the ends of the rows."""
    logits = [x.requires_grad_() for x in _logits(B=3, S=4, seed=5)]
    mask_BS = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)

    def ref_fn(layers):
        return load_balancing_loss_func(
            tuple(layers), num_experts=8, top_k=top_k, attention_mask=mask_BS.long()
        )

    cases = [
        (load_balancing_loss(logits, top_k, mask_T=mask_BS), ref_fn(logits)),
        (
            load_balancing_loss(logits, top_k, mask_T=mask_BS, per_layer=True),
            torch.stack([ref_fn([x]) for x in logits]).mean(),
        ),
    ]
    for ours, ref in cases:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        for a, b in zip(torch.autograd.grad(ours, logits), torch.autograd.grad(ref, logits)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
