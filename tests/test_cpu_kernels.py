"""The numba kernels of the CPU decode step (smoe.cpu_kernels) against torch. The whole step is
checked against the model and transformers in test_generate_fast_decode.py; here the pieces,
on shapes that step does not reach."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smoe import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="numba is not installed")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13])
def test_rows_times_wt_equals_torch(rows):
    """Every remainder of the four-row groups, an odd inner size and outputs not a multiple of
    the threads."""
    g = torch.Generator().manual_seed(rows)
    x_RK, w_NK = torch.randn(rows, 37, generator=g), torch.randn(101, 37, generator=g)
    out_RN = torch.full((rows, 101), float("nan"))
    cpu_kernels.rows_times_wt(x_RK.numpy(), w_NK.numpy(), out_RN.numpy())
    torch.testing.assert_close(out_RN, x_RK @ w_NK.t(), atol=1e-4, rtol=1e-5)


def test_rms_norm_equals_torch():
    g = torch.Generator().manual_seed(0)
    x_BD, w_D = torch.randn(5, 64, generator=g) * 30, torch.rand(64, generator=g) + 0.5
    out = torch.empty_like(x_BD)
    cpu_kernels.rms_norm(x_BD.numpy(), w_D.numpy(), 1e-5, out.numpy())
    torch.testing.assert_close(out, F.rms_norm(x_BD, (64,), w_D, 1e-5), atol=1e-5, rtol=1e-5)


def _moe_reference(x_BD, norm_D, gate_ED, w13_EXD, w2_EDF, top_k):
    """x + sum over the top-k experts of softmax(top-k logits) * SwiGLU, written plainly."""
    F_ = w2_EDF.shape[2]
    h = F.rms_norm(x_BD, (x_BD.shape[1],), norm_D, 1e-5)
    top, ids = torch.topk(h @ gate_ED.t(), top_k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    out = x_BD.clone()
    for b in range(x_BD.shape[0]):
        for w, e in zip(weights[b], ids[b]):
            u = w13_EXD[e] @ h[b]
            out[b] += w * (w2_EDF[e] @ (F.silu(u[:F_]) * u[F_:]))
    return out


@pytest.mark.parametrize("B,E,top_k", [(1, 8, 2), (6, 8, 2), (7, 5, 3), (3, 4, 1), (9, 2, 2)])
def test_feed_forward_equals_reference(B, E, top_k):
    g = torch.Generator().manual_seed(B * 100 + E)
    D, F_ = 24, 40
    x_BD = torch.randn(B, D, generator=g)
    norm_D = torch.rand(D, generator=g) + 0.5
    gate_ED = torch.randn(E, D, generator=g)
    w13_EXD, w2_EDF = torch.randn(E, 2 * F_, D, generator=g) / 5, torch.randn(E, D, F_, generator=g) / 6
    expected = _moe_reference(x_BD, norm_D, gate_ED, w13_EXD, w2_EDF, top_k)
    A = B * top_k
    scratch = [torch.empty(s).numpy() for s in [(B, D), (A, D), (A, 2 * F_), (A, F_), (A, D)]]
    arrays = [t.numpy() for t in (norm_D, gate_ED, w13_EXD, w2_EDF)]
    cpu_kernels.feed_forward(x_BD.numpy(), arrays[0], 1e-5, *arrays[1:], top_k, *scratch)
    torch.testing.assert_close(x_BD, expected, atol=1e-4, rtol=1e-5)


def test_feed_forward_dense():
    """No router (0 gate rows): one expert with weight 1, a Mistral feed-forward."""
    g = torch.Generator().manual_seed(1)
    B, D, F_ = 3, 16, 24
    x_BD, norm_D = torch.randn(B, D, generator=g), torch.rand(D, generator=g) + 0.5
    w13_EXD, w2_EDF = torch.randn(1, 2 * F_, D, generator=g) / 4, torch.randn(1, D, F_, generator=g) / 5
    h = F.rms_norm(x_BD, (D,), norm_D, 1e-5)
    u = h @ w13_EXD[0].t()
    expected = x_BD + (F.silu(u[:, :F_]) * u[:, F_:]) @ w2_EDF[0].t()
    scratch = [torch.empty(s).numpy() for s in [(B, D), (B, D), (B, 2 * F_), (B, F_), (B, D)]]
    gate = torch.empty(0, D).numpy()
    cpu_kernels.feed_forward(
        x_BD.numpy(), norm_D.numpy(), 1e-5, gate, w13_EXD.numpy(), w2_EDF.numpy(), 2, *scratch
    )
    torch.testing.assert_close(x_BD, expected, atol=1e-4, rtol=1e-5)
