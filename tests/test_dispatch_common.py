"""Helpers imported by the other test_dispatch_* files: random MoE problems, and the comparison
of an engine with the reference loop (output and gradients w.r.t. x, routing weights and all
three expert weights).

Legend: T tokens, D model dim, E experts, F expert hidden dim, K chosen experts per token.
"""

from __future__ import annotations

import torch

from smoe.dispatch.reference import reference_dispatch


def make_problem(T, D, F, E, K, dtype=torch.float32, seed=0, ids_TK=None):
    """Random inputs; expert ids are a top-k of random logits, so duplicate-free per token."""
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=gen)
    logits_TE = torch.randn(T, E, generator=gen)
    top_TK, topi_TK = torch.topk(logits_TE, K, dim=-1)
    weights_TK = torch.softmax(top_TK, dim=-1)  # float32, as the router gives it
    w1 = torch.randn(E, F, D, generator=gen) / D**0.5
    w2 = torch.randn(E, D, F, generator=gen) / F**0.5
    w3 = torch.randn(E, F, D, generator=gen) / D**0.5
    ids_TK = topi_TK if ids_TK is None else ids_TK
    return x_TD.to(dtype), ids_TK, weights_TK, w1.to(dtype), w2.to(dtype), w3.to(dtype)


def run_with_grads(engine, x_TD, ids_TK, weights_TK, w1, w2, w3, seed=1, views=None):
    """Output and gradients of sum(y * g) for a fixed random g; absent gradients read as zeros.
    ``views`` maps the leaves (x, weights, w1, w2, w3) to what the engine is given."""
    leaves = [t.detach().clone().requires_grad_() for t in (x_TD, weights_TK, w1, w2, w3)]
    # enable_grad: another test may have switched gradients off process-wide.
    with torch.enable_grad():
        x, wts, a, b, c = views(*leaves) if views is not None else leaves
        y_TD = engine(x, ids_TK, wts, a, b, c)
        assert y_TD.shape == x_TD.shape and y_TD.dtype == x_TD.dtype, (y_TD.shape, y_TD.dtype)
        g_TD = torch.randn(y_TD.shape, generator=torch.Generator().manual_seed(seed))
        g_TD = g_TD.to(device=y_TD.device, dtype=y_TD.dtype)  # drawn on the CPU: the same g everywhere
        if y_TD.requires_grad:
            grads = torch.autograd.grad((y_TD * g_TD).sum(), leaves, allow_unused=True)
        else:
            assert x_TD.shape[0] == 0, "only an empty batch may give an output without a graph"
            grads = [None] * len(leaves)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    return [y_TD.detach(), *grads]


NAMES = ["y", "dx", "dweights", "dw1", "dw2", "dw3"]


def assert_matches_reference(engine, problem, atol=1e-5, rtol=1e-4, scale_tol=None, views=None):
    """Compare with the reference. ``scale_tol`` (bf16): max error <= scale_tol * max |reference|.
    ``views`` (see run_with_grads) applies to the engine only; the reference gets plain tensors."""
    got = run_with_grads(engine, *problem, views=views)
    want = run_with_grads(reference_dispatch, *problem)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != reference {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        if scale_tol is not None:
            err = (g.float() - w.float()).abs().max().item() if g.numel() else 0.0
            bound = scale_tol * max(w.float().abs().max().item() if w.numel() else 0.0, 1e-3)
            assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
        else:
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def test_comparison_catches_a_wrong_engine():
    """The checks above must be able to fail: an engine that forgets one expert is caught."""
    import pytest

    def wrong(x_TD, ids_TK, weights_TK, w1, w2, w3):
        return reference_dispatch(x_TD, ids_TK.masked_fill(ids_TK == 0, w1.shape[0]), weights_TK, w1, w2, w3)

    with pytest.raises(AssertionError):
        assert_matches_reference(wrong, make_problem(T=6, D=8, F=12, E=3, K=2))
