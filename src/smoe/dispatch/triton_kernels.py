"""Triton kernels of the triton engine: grouped GEMMs over assignments sorted by expert, with
the token permutation fused into their loads and stores. Imported only by triton_engine.py.

Legend: E experts, R sorted rows (one per kept assignment), N output columns, K reduction dim.
Block sizes: BM rows, BN columns, BK reduction, BR rows of a weight-gradient step.

A "tile" is BM consecutive sorted rows of one expert. Tile tables are built on the device
(triton_engine.make_plan), so the grid has a fixed upper bound and the host never waits:
    tile_expert[t]  expert of tile t, or E for an idle tile (the bound is not always reached)
    tile_row[t]     first sorted row of tile t;  row_end[e]  one past the last row of expert e

Row indices: ``a_idx[r]`` is the row of the A operand that sorted row r reads (for x, its
token: the fused permute), ``c_idx[r]`` the row of C it writes (for outputs in the original
assignment order: the fused un-permute). HAS_A_IDX / HAS_C_IDX = False means "row r itself".
Accumulation is float32 whatever the input dtype. DOT_F32 upcasts the operands of tl.dot to
float32: only for triton's CPU interpreter, whose tl.dot of bfloat16 operands returns garbage
(triton 3.9; float16 and float32 are right there).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_tile_dot(
    a_ptr, a_rows, rmask, b_ptr, stride_bn, stride_bk, offs_n, nmask, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """sum_k A[a_rows, k] * B[n, k] for one (BM, BN) tile; A is row-major with K columns."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    offs_k = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        kmask = kk < K
        a = tl.load(
            a_ptr + a_rows[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        b = tl.load(
            b_ptr + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=kmask[:, None] & nmask[None, :],
            other=0.0,
        )
        if DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def gmm_kernel(
    a_ptr, a_idx_ptr, a2_ptr, b_ptr, b2_ptr, c_ptr, c_idx_ptr, c2_ptr, h1_ptr, h3_ptr,
    tile_expert_ptr, tile_row_ptr, row_end_ptr,
    N, K, num_experts,
    stride_be, stride_bn, stride_bk, stride_b2e, stride_b2n, stride_b2k,
    MODE: tl.constexpr, HAS_A_IDX: tl.constexpr, HAS_C_IDX: tl.constexpr, SAVE_H: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """One (BM, BN) tile of a grouped product, by MODE:

    0 plain:       C = A @ B[e]^T
    1 swiglu:      h1 = A @ B[e]^T, h3 = A @ B2[e]^T;  C = silu(h1) * h3  (h1, h3 kept if SAVE_H)
    2 swiglu_bwd:  dG = A @ B[e]^T;  C = dG * h3 * silu'(h1),  C2 = dG * silu(h1)
    3 dual:        C = A @ B[e]^T + A2 @ B2[e]^T  (A and A2 share rows and K)
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= num_experts:
        return
    rows = tl.load(tile_row_ptr + pid_m) + tl.arange(0, BM)
    rmask = rows < tl.load(row_end_ptr + e)
    if HAS_A_IDX:
        a_rows = tl.load(a_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    e64 = e.to(tl.int64)
    acc = _row_tile_dot(
        a_ptr, a_rows, rmask, b_ptr + e64 * stride_be, stride_bn, stride_bk, offs_n, nmask, K,
        BM, BN, BK, PRECISION, DOT_F32,
    )  # fmt: skip
    if MODE == 1 or MODE == 3:
        acc2 = _row_tile_dot(
            a2_ptr, a_rows, rmask, b2_ptr + e64 * stride_b2e, stride_b2n, stride_b2k, offs_n, nmask, K,
            BM, BN, BK, PRECISION, DOT_F32,
        )  # fmt: skip
    if HAS_C_IDX:
        c_rows = tl.load(c_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        c_rows = rows.to(tl.int64)
    cmask = rmask[:, None] & nmask[None, :]
    c_off = c_rows[:, None] * N + offs_n[None, :]
    if MODE == 0:
        tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=cmask)
    elif MODE == 1:
        if SAVE_H:
            tl.store(h1_ptr + c_off, acc.to(h1_ptr.dtype.element_ty), mask=cmask)
            tl.store(h3_ptr + c_off, acc2.to(h3_ptr.dtype.element_ty), mask=cmask)
        # Round h1, h3 to the storage dtype first, as the reference's separate linears do.
        h1 = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        h3 = acc2.to(c_ptr.dtype.element_ty).to(tl.float32)
        g = h1 * tl.sigmoid(h1) * h3
        tl.store(c_ptr + c_off, g.to(c_ptr.dtype.element_ty), mask=cmask)
    elif MODE == 2:
        h1 = tl.load(h1_ptr + c_off, mask=cmask, other=0.0).to(tl.float32)
        h3 = tl.load(h3_ptr + c_off, mask=cmask, other=0.0).to(tl.float32)
        s = tl.sigmoid(h1)
        dh1 = acc * h3 * s * (1.0 + h1 * (1.0 - s))
        dh3 = acc * h1 * s
        tl.store(c_ptr + c_off, dh1.to(c_ptr.dtype.element_ty), mask=cmask)
        tl.store(c2_ptr + c_off, dh3.to(c2_ptr.dtype.element_ty), mask=cmask)
    else:
        tl.store(c_ptr + c_off, (acc + acc2).to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def wgrad_kernel(
    dc_ptr, dc_idx_ptr, a_ptr, a_idx_ptr, dw_ptr, row_end_ptr, counts_ptr,
    N, K,
    HAS_DC_IDX: tl.constexpr, HAS_A_IDX: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """dW[e] (N, K) = sum over expert e's sorted rows r of dC[r, :]^T A[r, :]; zero for an
    expert with no rows. dC is row-major with N columns, A with K columns, dW contiguous."""
    e = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(2) * BK + tl.arange(0, BK)
    nmask = offs_n < N
    kmask = offs_k < K
    end = tl.load(row_end_ptr + e)
    start = end - tl.load(counts_ptr + e)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < end
        if HAS_DC_IDX:
            dc_rows = tl.load(dc_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            dc_rows = rows.to(tl.int64)
        if HAS_A_IDX:
            a_rows = tl.load(a_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        dc_T = tl.load(
            dc_ptr + dc_rows[None, :] * N + offs_n[:, None], mask=nmask[:, None] & rmask[None, :], other=0.0
        )
        a = tl.load(
            a_ptr + a_rows[:, None] * K + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        if DOT_F32:
            dc_T, a = dc_T.to(tl.float32), a.to(tl.float32)
        acc += tl.dot(dc_T, a, input_precision=PRECISION)
    dw_off = e.to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
    tl.store(dw_ptr + dw_off, acc.to(dw_ptr.dtype.element_ty), mask=nmask[:, None] & kmask[None, :])
