"""The triton engine: fused permute + grouped GEMM kernels (triton_kernels.py) and their backward.

Legend: T tokens, D model dim, E experts, F expert hidden dim, K chosen experts per token,
A = T * K assignments (token-major), R sorted rows (= A; dropped ones sit last, never computed).

Forward, for the rows of each expert (one launch each, no host synchronisation):
    up:    h1, h3 = x[token] @ w1[e]^T, x[token] @ w3[e]^T;  g = silu(h1) * h3   (x gathered in the load)
    down:  o[assignment] = g @ w2[e]^T                                           (un-permuted in the store)
then y = sum_k weights[t, k] * o[t, k] in torch (which also gives the routing weights' gradient).
Backward:
    dg -> dh1, dh3 = (do[assignment] @ w2[e]) through silu'      (fused into the epilogue)
    dx[assignment] = dh1 @ w1[e] + dh3 @ w3[e];  dx = sum over k
    dw1[e] = dh1^T x[token], dw3[e] = dh3^T x[token], dw2[e] = do[assignment]^T g

Runs on CUDA tensors (bf16/fp16, or fp32 with IEEE products), and on CPU tensors under
TRITON_INTERPRET=1, which the tests use.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from smoe.dispatch import triton_kernels as kern
from smoe.dispatch.permute import sort_by_expert

MODE_PLAIN, MODE_SWIGLU, MODE_SWIGLU_BWD, MODE_DUAL = 0, 1, 2, 3


@dataclass
class Plan:
    """Where every sorted row comes from and goes, and the tile tables of the grid."""

    token_R: torch.Tensor  # int32 token of each sorted row (fused permute of x)
    order_R: torch.Tensor  # int32 assignment index of each sorted row (fused un-permute)
    counts_E: torch.Tensor  # int32 rows per expert
    row_end_E: torch.Tensor  # int32 one past each expert's last sorted row
    tile_expert: torch.Tensor  # int32 expert of each tile, E for an idle tile
    tile_row: torch.Tensor  # int32 first sorted row of each tile
    BM: int


def _pow2_between(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def make_plan(expert_ids_TK: torch.Tensor, num_experts: int) -> Plan:
    A = expert_ids_TK.numel()
    p = sort_by_expert(expert_ids_TK, num_experts)
    # Rows per tile from the mean rows per expert: 16 while decoding, 128 for long prompts.
    BM = _pow2_between(-(-A // num_experts), 16, 128)
    counts_E = p.counts_E
    row_end_E = counts_E.cumsum(0)
    tiles_E = (counts_E + BM - 1) // BM
    tile_end_E = tiles_E.cumsum(0)
    # sum_e ceil(c_e / BM) <= A / BM + E: a grid bound known on the host without reading counts.
    max_tiles = triton.cdiv(A, BM) + num_experts
    t = torch.arange(max_tiles, device=expert_ids_TK.device)
    tile_expert = torch.searchsorted(tile_end_E, t, right=True)
    e = tile_expert.clamp(max=num_experts - 1)
    tile_row = (row_end_E - counts_E)[e] + (t - (tile_end_E - tiles_E)[e]) * BM
    i32 = torch.int32
    return Plan(
        p.token_A.to(i32), p.order_A.to(i32), counts_E.to(i32), row_end_E.to(i32),
        tile_expert.to(i32), tile_row.to(i32), BM,
    )  # fmt: skip


# Programs per SM from which the columns of a tile stop being narrowed (block_n).
PROGRAMS_PER_SM = 4


def block_n(num_assignments: int, num_experts: int, BM: int, N: int, num_sms: int) -> int:
    """Output columns per program: 128, or narrower (down to 32) while so few row tiles hold
    rows that 128-column programs would leave SMs idle. Decoding one token of Mixtral touches 2
    experts: its down projection (N = 4096) in 128-column programs is 2 x 32 = 64 programs on an
    H200's 132 SMs, half the GPU idle in a memory-bound loop; in 32-column programs, 256.

    Row tiles with rows: about min(A, E) while BM is at least the mean rows per expert (as
    make_plan picks it up to 128 rows), else about A / BM. Shapes only: no synchronisation.
    Not measured on a GPU yet (docs/benchmarks.md); the rule only spreads the same work."""
    BN = _pow2_between(N, 16, 128)
    tiles = (
        min(num_assignments, num_experts)
        if BM * num_experts >= num_assignments
        else -(-num_assignments // BM)
    )
    while BN > 32 and tiles * triton.cdiv(N, BN) < PROGRAMS_PER_SM * num_sms:
        BN //= 2
    return BN


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # triton's CPU interpreter (tests): programs run one after another anyway
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_args(dtype: torch.dtype) -> dict:
    """fp32 operands: exact (IEEE) products, as the reference. bf16 under the interpreter: see
    DOT_F32 in triton_kernels.py. "tf32" is ignored for 16-bit operands."""
    dot_f32 = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return dict(PRECISION="ieee" if dtype == torch.float32 or dot_f32 else "tf32", DOT_F32=dot_f32)


def _gmm(plan: Plan, mode: int, a, b_ENK, c, *, a_idx=None, c_idx=None, a2=None, b2_ENK=None, c2=None,
         h1=None, h3=None, save_h: bool = False) -> None:  # fmt: skip
    """Launch gmm_kernel: C[c_idx[r]] = (A[a_idx[r]] @ B[e]^T, then MODE's epilogue) for sorted rows r."""
    E, N, K = b_ENK.shape
    b2 = b_ENK if b2_ENK is None else b2_ENK
    BN = block_n(plan.order_R.numel(), E, plan.BM, N, _num_sms(a.device))
    # float32 operands: half the reduction block and one stage fewer, so that the two-product
    # modes fit in shared memory (2 x (128 x 32 + 32 x 128) x 4 bytes = 64 KB a stage; with
    # BK = 64 and 3 stages they would ask 384 KB, over an H100's or H200's 227 KB).
    wide = a.element_size() > 2
    BK = _pow2_between(K, 16, 32 if wide else 64)
    grid = (plan.tile_expert.numel(), triton.cdiv(N, BN))
    kern.gmm_kernel[grid](
        a, a_idx if a_idx is not None else plan.token_R, a2 if a2 is not None else a, b_ENK, b2,
        c, c_idx if c_idx is not None else plan.order_R, c2 if c2 is not None else c,
        h1 if h1 is not None else c, h3 if h3 is not None else c,
        plan.tile_expert, plan.tile_row, plan.row_end_E,
        N, K, E, *b_ENK.stride(), *b2.stride(),
        MODE=mode, HAS_A_IDX=a_idx is not None, HAS_C_IDX=c_idx is not None, SAVE_H=save_h,
        BM=plan.BM, BN=BN, BK=BK, **_dot_args(a.dtype),
        num_warps=8 if plan.BM * BN >= 128 * 128 else 4, num_stages=2 if wide else 3,
    )  # fmt: skip


def _wgrad(plan: Plan, dc, a, E: int, *, dc_idx=None, a_idx=None) -> torch.Tensor:
    """dW[e] = sum over expert e's rows of dC[dc_idx[r]]^T A[a_idx[r]]  -> (E, N, K)."""
    N, K = dc.shape[1], a.shape[1]
    dw = torch.empty(E, N, K, device=a.device, dtype=a.dtype)
    BN, BK = _pow2_between(N, 16, 128), _pow2_between(K, 16, 64)
    kern.wgrad_kernel[(E, triton.cdiv(N, BN), triton.cdiv(K, BK))](
        dc, dc_idx if dc_idx is not None else plan.order_R, a, a_idx if a_idx is not None else plan.token_R,
        dw, plan.row_end_E, plan.counts_E, N, K,
        HAS_DC_IDX=dc_idx is not None, HAS_A_IDX=a_idx is not None,
        BN=BN, BK=BK, BR=64, **_dot_args(a.dtype), num_warps=8, num_stages=3,
    )  # fmt: skip
    return dw


class TritonExperts(torch.autograd.Function):
    """x_TD and stacked expert weights -> o_AD, each assignment's unweighted expert output
    (zero for dropped assignments), in the original token-major assignment order."""

    @staticmethod
    def forward(ctx, x_TD, w1_EFD, w2_EDF, w3_EFD, plan: Plan):
        A, D, F = plan.order_R.numel(), x_TD.shape[1], w1_EFD.shape[1]
        save = any(ctx.needs_input_grad[:4])
        g_RF = x_TD.new_empty(A, F)
        h1_RF, h3_RF = (x_TD.new_empty(A, F), x_TD.new_empty(A, F)) if save else (None, None)
        _gmm(plan, MODE_SWIGLU, x_TD, w1_EFD, g_RF, a_idx=plan.token_R, b2_ENK=w3_EFD, h1=h1_RF, h3=h3_RF,
             save_h=save)  # fmt: skip
        o_AD = x_TD.new_zeros(A, D)  # zeros: dropped assignments are never written
        _gmm(plan, MODE_PLAIN, g_RF, w2_EDF, o_AD, c_idx=plan.order_R)
        if save:
            ctx.save_for_backward(x_TD, w1_EFD, w2_EDF, w3_EFD, h1_RF, h3_RF)
            ctx.plan = plan
        return o_AD

    @staticmethod
    def backward(ctx, do_AD):
        x_TD, w1_EFD, w2_EDF, w3_EFD, h1_RF, h3_RF = ctx.saved_tensors
        plan: Plan = ctx.plan
        do_AD = do_AD.contiguous()
        E, T, D = w1_EFD.shape[0], x_TD.shape[0], x_TD.shape[1]
        K = plan.order_R.numel() // max(T, 1)
        dh1_RF, dh3_RF = torch.empty_like(h1_RF), torch.empty_like(h3_RF)
        # dg = do @ w2[e]: B is w2[e]^T, an (F, D) view of the (D, F) weight.
        _gmm(plan, MODE_SWIGLU_BWD, do_AD, w2_EDF.transpose(1, 2), dh1_RF, a_idx=plan.order_R, c2=dh3_RF,
             h1=h1_RF, h3=h3_RF)  # fmt: skip
        dx = dw1 = dw2 = dw3 = None
        if ctx.needs_input_grad[0]:
            dx_AD = x_TD.new_zeros(plan.order_R.numel(), D)
            _gmm(plan, MODE_DUAL, dh1_RF, w1_EFD.transpose(1, 2), dx_AD, c_idx=plan.order_R, a2=dh3_RF,
                 b2_ENK=w3_EFD.transpose(1, 2))  # fmt: skip
            dx = dx_AD.view(T, K, D).sum(dim=1, dtype=torch.float32).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            dw1 = _wgrad(plan, dh1_RF, x_TD, E, a_idx=plan.token_R)
        if ctx.needs_input_grad[3]:
            dw3 = _wgrad(plan, dh3_RF, x_TD, E, a_idx=plan.token_R)
        if ctx.needs_input_grad[2]:
            g_RF = torch.nn.functional.silu(h1_RF) * h3_RF
            dw2 = _wgrad(plan, do_AD, g_RF, E, dc_idx=plan.order_R)
        return dx, dw1, dw2, dw3, None


SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_operands(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD) -> None:
    """Refuse what the kernels would misread: they take one floating dtype for x and all three
    weights (tl.dot of mixed operands fails to compile, or under the interpreter silently runs),
    and raw pointers, so every operand must be on x's device."""
    if x_TD.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"dispatch engine 'triton' takes {', '.join(map(str, SUPPORTED_DTYPES))} (got x {x_TD.dtype}); "
            "use 'sorted' for other dtypes"
        )
    named = dict(w1=w1_EFD, w2=w2_EDF, w3=w3_EFD)
    for name, w in named.items():
        if w.dtype != x_TD.dtype:
            raise ValueError(
                f"dispatch engine 'triton': {name} is {w.dtype} but x is {x_TD.dtype}; cast them alike"
            )
    named.update(expert_ids=expert_ids_TK, weights=weights_TK)
    for name, t in named.items():
        if t.device != x_TD.device:
            raise ValueError(f"dispatch engine 'triton': {name} is on {t.device} but x is on {x_TD.device}")


def triton_dispatch(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
) -> torch.Tensor:
    _check_operands(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD)
    T, K = expert_ids_TK.shape
    D = x_TD.shape[1]
    if T == 0:
        return x_TD.new_zeros(x_TD.shape)  # as the reference: nothing to compute
    plan = make_plan(expert_ids_TK, w1_EFD.shape[0])
    o_AD = TritonExperts.apply(x_TD.contiguous(), w1_EFD, w2_EDF, w3_EFD, plan)
    gate_TK1 = weights_TK.to(o_AD.dtype).unsqueeze(-1)
    return (o_AD.view(T, K, D) * gate_TK1).sum(dim=1)
