"""The fused head + cross-entropy equals F.cross_entropy(F.linear(...)) and transformers' loss."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

import smoe
from smoe.model import head_loss
from smoe.model.head_loss import linear_cross_entropy


def _inputs(N=11, D=8, V=29, ignored=(2, 7), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[list(ignored)] = -100
    return h, w, t


def _reference(h, w, t, reduction="mean"):
    loss = F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100, reduction=reduction)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss, gh, gw


@pytest.mark.parametrize("rows", [1, 3, 11, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_values_and_gradients_equal_unfused(rows, reduction):
    h, w, t = _inputs()
    ref, ref_gh, ref_gw = _reference(h, w, t, reduction)
    loss = linear_cross_entropy(h, w, t, reduction=reduction, rows=rows)
    gh, gw = torch.autograd.grad(2.5 * loss, (h, w))  # a non-unit upstream gradient
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, 2.5 * ref_gh)
    torch.testing.assert_close(gw, 2.5 * ref_gw)
    assert gh[[2, 7]].abs().max() == 0  # ignored rows get no gradient


def test_no_grad_path_equals_grad_path():
    h, w, t = _inputs(seed=1)
    with torch.no_grad():
        a = linear_cross_entropy(h, w, t, rows=4)
    b = linear_cross_entropy(h, w, t, rows=4)
    assert b.requires_grad and not a.requires_grad
    torch.testing.assert_close(a, b.detach())


def test_large_logits_stay_finite():
    h, w, t = _inputs(seed=2, ignored=())
    h = (h.detach() * 1e3).requires_grad_()  # logits ~1e4: exp overflows without the max shift
    ref, ref_gh, ref_gw = _reference(h, w, t)
    loss = linear_cross_entropy(h, w, t, rows=5)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-4)


def test_all_ignored_is_zero_with_zero_gradients():
    """torch's mean over no targets is NaN with zero gradients; 0 / 0 in the fused loss made
    the gradients NaN as well, so one all-padding micro-batch poisoned an accumulated step. It is
    0 with zero gradients, which adds nothing to a step."""
    h, w, t = _inputs(ignored=range(11))
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = linear_cross_entropy(h, w, t)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()
    assert torch.isnan(F.cross_entropy(F.linear(h, w), t, ignore_index=-100))  # torch's value


def test_bf16_autocast_matches_unfused_autocast():
    h, w, t = _inputs(N=40, D=16, V=50, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_gh, ref_gw = _reference(h, w, t)
        loss = linear_cross_entropy(h, w, t, rows=7)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gh, ref_gh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=2e-3)


def test_bf16_weights_match_float32_within_bf16_tolerance():
    h, w, t = _inputs(N=40, D=16, V=50, seed=4)
    ref, ref_gh, ref_gw = _reference(h, w, t)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    loss = linear_cross_entropy(hb, wb, t, rows=16)
    gh, gw = torch.autograd.grad(loss, (hb, wb))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), ref_gw, rtol=5e-2, atol=5e-3)


def test_bad_inputs_raise():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="expected h"):
        linear_cross_entropy(h, w[:, :4], t)
    with pytest.raises(ValueError, match="expected h"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="float32 but w is torch.float64"):
        linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="rows must be a positive"):
        linear_cross_entropy(h, w, t, rows=-1)


def test_module_example():
    assert doctest.testmod(head_loss, extraglobs={"torch": torch, "F": F}).failed == 0


def test_model_loss_equals_transformers_loss(make_hf):
    """``model(tokens, targets_BT=...)`` against transformers' ``labels=`` loss (which shifts)."""
    directory, ref = make_hf(num_local_experts=4, num_experts_per_tok=2)
    ours = smoe.load_model(directory)
    tokens = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(5))
    labels = tokens.clone()
    labels[1, 9:] = -100  # a padded tail, ignored by both
    expected = ref(tokens, labels=labels).loss
    targets = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    got = ours(tokens, targets_BT=targets)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # and the gradient reaching the head equals the unfused one
    got.backward()
    logits = ours(tokens)
    unfused = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1), ignore_index=-100)
    (g,) = torch.autograd.grad(unfused, ours.output.weight)
    torch.testing.assert_close(ours.output.weight.grad, g, atol=1e-6, rtol=1e-4)


def test_model_rejects_targets_of_another_shape(make_hf):
    directory, _ = make_hf()
    ours = smoe.load_model(directory)
    with pytest.raises(ValueError, match="targets_BT must be"):
        ours(torch.zeros(2, 5, dtype=torch.long), targets_BT=torch.zeros(2, 4, dtype=torch.long))


def test_repeated_backward_accumulates():
    """Backward hands out its stored gradients when the upstream gradient is 1: a retained
    graph's second and third backward must still add the same gradient each time."""
    h, w, t = _inputs(seed=6)
    _, ref_gh, ref_gw = _reference(h, w, t)
    loss = linear_cross_entropy(h, w, t, rows=4)
    for _ in range(2):
        loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(w.grad, 3 * ref_gw)
    torch.testing.assert_close(h.grad, 3 * ref_gh)


@pytest.mark.parametrize("gap", [80.0, 95.0, 200.0])
def test_target_far_below_the_others_keeps_an_exact_loss(gap):
    """On CPU the loss is -log of the softmax's target entry; where that probability leaves
    float32's normal range (gap ~87 and more; 0 at 200, which made the loss inf) the row is
    recomputed from its logits with a log-sum-exp."""
    D, V = 4, 6
    h = torch.zeros(3, D)
    h[:, 0] = 1.0
    w = torch.zeros(V, D)
    w[:, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0, -gap, 0.5])  # logits = this column
    t = torch.tensor([4, 1, 4])  # rows 0 and 2 target the logit far below the others
    h, w = h.requires_grad_(), w.requires_grad_()
    ref = F.cross_entropy(F.linear(h.double(), w.double()), t)
    loss = linear_cross_entropy(h, w, t, rows=2)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, rows=2).double(), ref, rtol=1e-6, atol=0)
    (gh,) = torch.autograd.grad(loss, h)
    (ref_gh,) = torch.autograd.grad(F.cross_entropy(F.linear(h, w), t), h)
    torch.testing.assert_close(gh, ref_gh)


def test_one_pass_cpu_softmax_equals_the_five_pass_form():
    """On CPU the loss takes torch's one-pass softmax; accelerators (and tracing) take the five
    passes. Both must give the same softmax and losses."""
    g = torch.Generator().manual_seed(7)
    h, w = torch.randn(6, 8, generator=g), torch.randn(50, 8, generator=g) * 3
    t = torch.randint(0, 50, (6,), generator=g)
    valid = torch.ones(6, dtype=torch.bool)
    five, one = h @ w.T, h @ w.T
    loss_five = head_loss._softmax_and_loss_(five, t)
    loss_one = head_loss._softmax_and_loss_cpu_(one, t, valid, h, w)
    torch.testing.assert_close(one, five)
    torch.testing.assert_close(loss_one, loss_five)
    torch.testing.assert_close(loss_one, F.cross_entropy(h @ w.T, t, reduction="none"))
