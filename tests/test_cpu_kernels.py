"""The numba kernels of the CPU decode step (smoe.cpu_kernels) against torch. The whole step is
checked against the model and transformers in test_generate_fast_decode.py; here the pieces,
on shapes that step does not reach."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
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


def _scratch(B, E, D, F_, k):
    """expert_A, weight_A, logits_BE, then h_BD, h_AD, u_AX, g_AF, o_AD for feed_forward."""
    A = B * k
    shapes = [(B, E), (B, D), (A, D), (A, 2 * F_), (A, F_), (A, D)]
    return [np.empty(A, np.int64), np.empty(A, np.float32)] + [np.empty(s, np.float32) for s in shapes]


@pytest.mark.parametrize("B,E,top_k", [(1, 8, 2), (6, 8, 2), (7, 5, 3), (3, 4, 1), (9, 2, 2)])
def test_feed_forward_equals_reference(B, E, top_k):
    g = torch.Generator().manual_seed(B * 100 + E)
    D, F_ = 24, 40
    x_BD = torch.randn(B, D, generator=g)
    norm_D = torch.rand(D, generator=g) + 0.5
    gate_ED = torch.randn(E, D, generator=g)
    w13_EXD, w2_EDF = torch.randn(E, 2 * F_, D, generator=g) / 5, torch.randn(E, D, F_, generator=g) / 6
    expected = _moe_reference(x_BD, norm_D, gate_ED, w13_EXD, w2_EDF, top_k)
    args = [t.numpy() for t in (norm_D, gate_ED, w13_EXD, w2_EDF)]
    args = (args[0], 1e-5, *args[1:], top_k, False, *_scratch(B, E, D, F_, top_k))
    assert not cpu_kernels.feed_forward(x_BD.numpy(), *args)  # no tie
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
    gate = torch.empty(0, D).numpy()
    args = (norm_D.numpy(), 1e-5, gate, w13_EXD.numpy(), w2_EDF.numpy(), 2, False, *_scratch(B, 1, D, F_, 1))
    assert not cpu_kernels.feed_forward(x_BD.numpy(), *args)
    torch.testing.assert_close(x_BD, expected, atol=1e-4, rtol=1e-5)


def test_feed_forward_reports_a_tie_and_runs_the_routing_it_is_given():
    """Logits tied at the k-th place: the kernel leaves x alone and says so (the caller then
    routes with torch.topk, as the model); with ``routed`` it runs the experts it is given."""
    g = torch.Generator().manual_seed(2)
    B, E, D, F_ = 2, 4, 8, 12
    x_BD, norm_D = torch.randn(B, D, generator=g), torch.ones(D)
    w13_EXD, w2_EDF = torch.randn(E, 2 * F_, D, generator=g), torch.randn(E, D, F_, generator=g)
    before = x_BD.clone()
    scratch = _scratch(B, E, D, F_, 2)
    args = (norm_D.numpy(), 1e-5, torch.zeros(E, D).numpy(), w13_EXD.numpy(), w2_EDF.numpy(), 2)
    assert cpu_kernels.feed_forward(x_BD.numpy(), *args, False, *scratch)  # every logit is 0
    assert torch.equal(x_BD, before) and (scratch[2] == 0).all()  # x untouched; logits_BE
    picks = [[(3, 0.25), (1, 0.75)], [(0, 0.5), (2, 0.5)]]
    scratch[0][:] = [e for row in picks for e, _ in row]
    scratch[1][:] = [w for row in picks for _, w in row]
    assert not cpu_kernels.feed_forward(x_BD.numpy(), *args, True, *scratch)
    h = F.rms_norm(before, (D,), norm_D, 1e-5)
    expected = before.clone()
    for b, row in enumerate(picks):
        for e, w in row:
            u = w13_EXD[e] @ h[b]
            expected[b] += w * (w2_EDF[e] @ (F.silu(u[:F_]) * u[F_:]))
    torch.testing.assert_close(x_BD, expected, atol=1e-4, rtol=1e-5)


def test_kernels_keep_torchs_thread_count():
    """Starting numba's OpenMP pool sets the OpenMP runtime torch shares to numba's pool size;
    ``torch.set_num_threads(1)`` must survive the first kernel call, and the kernels follow
    it. A fresh process: the pool starts once per process."""
    script = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "import numba\n"
        "from smoe import cpu_kernels\n"
        "cpu_kernels.match_torch_threads()\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n"
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]
