"""Expert SwiGLUs over rows sorted by expert, one expert at a time, with a hand-written
backward. The sorted engine's path where torch._grouped_mm is not the better choice (CPU,
accelerator dtypes it lacks), and the gather engine's on CPU.

Legend: A sorted rows, D model dim, E experts, F expert hidden dim, N rows of one expert.

Why not plain autograd through ``w1_EFD[e]``: the backward of each such view writes a full
(E, F, D) zero tensor for one expert's gradient, E times per weight. Here each expert's
gradient goes straight into its slice of one (E, F, D) tensor, and experts without rows get
zeros from one fill.

Why rows one by one for small N: on this CPU build (MKL, AVX2 on AMD EPYC) with two threads
and the cores shared with other processes, a product with 2 <= N <= 16 rows costs about the
same as with 32 (12-16 ms for a 3584 x 1024 weight at load ~3, about 40 ms at load ~8:
the OpenMP threads wait for a descheduled partner), while a single row (matrix-vector) costs
about 1 ms. On an idle machine the whole product wins from about 4 rows (2 ms vs 2.4 ms for
4 rows); this path is only taken for skewed routing, where the robust choice is kept. Up to
ROW_BY_ROW_MAX rows of a large weight we therefore use one matrix-vector product per row,
unless the product splits into one block per intra-op thread (``split_rows``, faster on a
quiet machine from 1 row up; a process sharing its cores should run one thread, which also
turns the split off). The weight-gradient products (N as the
reduction dimension) do not show the problem and stay whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoe.dispatch import split_rows
from smoe.dispatch.grouped_experts import silu_mul_backward

ROW_BY_ROW_MAX = 16
ROW_BY_ROW_MIN_WEIGHT = 1 << 20  # elements; for small weights the Python loop costs more


def row_by_row(num_rows: int, w_MK: torch.Tensor) -> bool:
    return num_rows <= ROW_BY_ROW_MAX and w_MK.numel() >= ROW_BY_ROW_MIN_WEIGHT and w_MK.device.type == "cpu"


def _rows_times_wt(x_ND: torch.Tensor, w_MK: torch.Tensor, out_NM: torch.Tensor) -> None:
    """out = x @ w^T: few rows through a large weight on every thread where the product splits
    into one block per thread (``split_rows``), else row by row (see the module docstring)."""
    if split_rows.blocks(x_ND, w_MK.shape[0]) > 1:
        if w_MK.is_contiguous():
            split_rows.rows_times_wt(x_ND, w_MK, out=out_NM)
            return
        if w_MK.t().is_contiguous():  # the transpose of a stored weight (backward)
            split_rows.rows_times_w(x_ND, w_MK.t(), out=out_NM)
            return
    if row_by_row(x_ND.shape[0], w_MK):
        for i in range(x_ND.shape[0]):
            torch.mv(w_MK, x_ND[i], out=out_NM[i])
    else:
        torch.mm(x_ND, w_MK.t(), out=out_NM)


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _empty_runs(counts: list[int]):
    """(first, last + 1) of each run of consecutive experts without rows."""
    start = None
    for e, n in enumerate([*counts, 1]):  # the sentinel closes a final run
        if n == 0 and start is None:
            start = e
        elif n and start is not None:
            yield start, e
            start = None


class LoopExperts(torch.autograd.Function):
    """x_AD (rows sorted by expert, ``counts`` rows per expert, host list) -> o_AD; rows past
    sum(counts) (dropped assignments) come out as zeros."""

    @staticmethod
    def forward(ctx, x_AD, w1_EFD, w2_EDF, w3_EFD, counts: list[int]):
        A, D, F_ = x_AD.shape[0], x_AD.shape[1], w1_EFD.shape[1]
        h1_AF, h3_AF = x_AD.new_zeros(A, F_), x_AD.new_zeros(A, F_)
        o_AD = x_AD.new_zeros(A, D)
        for e, s, t in _segments(counts):
            _rows_times_wt(x_AD[s:t], w1_EFD[e], h1_AF[s:t])
            _rows_times_wt(x_AD[s:t], w3_EFD[e], h3_AF[s:t])
        g_AF = F.silu(h1_AF).mul_(h3_AF)
        for e, s, t in _segments(counts):
            _rows_times_wt(g_AF[s:t], w2_EDF[e], o_AD[s:t])
        ctx.save_for_backward(x_AD, w1_EFD, w2_EDF, w3_EFD, h1_AF, h3_AF)
        ctx.counts = counts
        return o_AD

    @staticmethod
    def backward(ctx, do_AD):
        x_AD, w1_EFD, w2_EDF, w3_EFD, h1_AF, h3_AF = ctx.saved_tensors
        counts = ctx.counts
        do_AD = do_AD.contiguous()
        dg_AF = torch.zeros_like(h1_AF)
        for e, s, t in _segments(counts):
            _rows_times_wt(do_AD[s:t], w2_EDF[e].t(), dg_AF[s:t])
        dh1_AF, dh3_AF, g_AF = silu_mul_backward(h1_AF, h3_AF, dg_AF)
        dx_AD = torch.zeros_like(x_AD) if ctx.needs_input_grad[0] else None
        dws = [
            x_AD.new_empty(w.shape) if need else None
            for w, need in zip((w1_EFD, w2_EDF, w3_EFD), ctx.needs_input_grad[1:4])
        ]
        # Experts without rows get zero gradients: one fill per run of consecutive empty experts
        # (few calls, each with a large fixed cost on the shared VM), and only their slices: a
        # fill of the whole tensor, overwritten where experts have rows, wrote 8/6 as many bytes
        # at T = 1 and made forward+backward 41.5 ms against 35.6 for grouped_mm, which writes
        # only the empty experts' slices (D 1024, F 3584, E 8).
        for e0, e1 in _empty_runs(counts):
            for dw in dws:
                if dw is not None:
                    dw[e0:e1].zero_()
        for e, s, t in _segments(counts):
            if dx_AD is not None:
                tmp_ND = torch.empty_like(dx_AD[s:t])
                _rows_times_wt(dh1_AF[s:t], w1_EFD[e].t(), dx_AD[s:t])
                _rows_times_wt(dh3_AF[s:t], w3_EFD[e].t(), tmp_ND)
                dx_AD[s:t] += tmp_ND
            for dw, dc, a in ((dws[0], dh1_AF, x_AD), (dws[1], do_AD, g_AF), (dws[2], dh3_AF, x_AD)):
                if dw is not None:
                    torch.mm(dc[s:t].t(), a[s:t], out=dw[e])
        return dx_AD, *dws, None
