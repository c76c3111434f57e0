"""The sorted engine: permute tokens by expert, one grouped matrix product per weight.

Legend: T tokens, D model dim, E experts, F expert hidden dim, K chosen experts per token,
A = T * K assignments.

Example, T=3, K=2, E=3, expert_ids = [[2, 0], [0, 1], [2, 1]]:
    flat ids     [2, 0, 0, 1, 2, 1]   (assignment a = token a // K, choice a % K)
    sorted rows  [1, 2, 3, 5, 0, 4]   (stable: token order within each expert)
    counts       [2, 2, 2]  -> offsets [2, 4, 6]
so x rows [0, 1, 1, 2, 0, 2] go through expert 0 (rows 0-1), 1 (rows 2-3), 2 (rows 4-5) in
three grouped products, w1 and w3 up and w2 down; each row then goes back to its token, where
the K rows are summed with the routing weights (permute.combine).

``torch._grouped_mm`` does the grouped products where this build has it for the device and
dtype (CPU: float32/bfloat16/float16; CUDA: bfloat16 on sm80+; on both with 16-byte aligned strides),
but on CPU it wins only with many rows per expert; below that two other ways are the default
there: batched products over experts padded to equal rows while routing is balanced
(padded_experts.py), else a loop over the chosen experts (loop_experts.py). Both read the per-expert counts on the host once (free
on CPU, a sync on accelerators).
"""

from __future__ import annotations

import torch

from smoe.dispatch.grouped_experts import GroupedExperts, needs_grad
from smoe.dispatch.loop_experts import LoopExperts
from smoe.dispatch.padded_experts import PaddedExperts, use_padded
from smoe.dispatch.permute import Permutation, combine, sort_by_expert, tokens_to_rows

_GROUPED_MM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_GROUPED_MIN_ROWS = 512  # mean rows per expert from which CPU uses grouped_mm


def _aligned(t: torch.Tensor) -> bool:
    """The layout ``torch._grouped_mm`` takes (its stride check, on CPU and CUDA alike): a 16-byte
    aligned base, one of the last two strides 1 and the other at least the size of the unit-stride
    dim and a multiple of 16 bytes, and a 16-byte batch stride. Example, float32 (E, F, D) =
    (4, 8, 16) sliced as big[..., ::4] has strides (512, 64, 4): every stride is 16 bytes, but
    with no unit stride grouped_mm raises "Invalid strides/sizes"."""
    *batch, row, col = t.stride()
    rows, cols = t.shape[-2:]
    if col == 1 and row >= max(1, cols):
        lead = row  # row-major matrices
    elif row == 1 and col >= max(1, rows):
        lead = col  # column-major (a transposed view)
    else:
        return False
    # While compiling the operands are fake tensors without an address (data_ptr raises there);
    # the strides are checked all the same, and the engine's own tensors are allocator-aligned.
    base_ok = torch.compiler.is_compiling() or t.data_ptr() % 16 == 0
    return base_ok and all((s * t.element_size()) % 16 == 0 for s in (lead, *batch))


def can_grouped_mm(x_AD: torch.Tensor, *w_EXY: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs for these operands on this build (checked, not assumed)."""
    if not hasattr(torch, "_grouped_mm") or any(w.dtype != x_AD.dtype for w in w_EXY):
        return False
    if x_AD.device.type == "cpu":
        if torch.compiler.is_compiling() and x_AD.dtype != torch.bfloat16:
            # torch.compile traces grouped_mm with a shape function that accepts bfloat16 only
            # (torch 2.13: "Expected inputs of BF16 type"), although the CPU kernel runs float32.
            return False
        return x_AD.dtype in _GROUPED_MM_CPU_DTYPES and all(_aligned(t) for t in (x_AD, *w_EXY))
    if x_AD.device.type == "cuda":
        return (
            x_AD.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x_AD.device) >= (8, 0)
            and all(_aligned(t) for t in (x_AD, *w_EXY))
        )
    return False


def _experts_grouped(x_AD: torch.Tensor, p: Permutation, w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
    offs_E = p.counts_E.cumsum(0).to(torch.int32)
    save = needs_grad(x_AD, w1_EFD, w2_EDF, w3_EFD)
    return GroupedExperts.apply(x_AD, w1_EFD, w2_EDF, w3_EFD, offs_E, p.valid_A1, save)


def _experts_loop(x_AD: torch.Tensor, p: Permutation, w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
    counts = p.counts_E.tolist()  # the one host read of this path (a sync on accelerators)
    if use_padded(counts):  # see padded_experts.py
        save = needs_grad(x_AD, w1_EFD, w2_EDF, w3_EFD)
        return PaddedExperts.apply(x_AD, w1_EFD, w2_EDF, w3_EFD, counts, save)
    return LoopExperts.apply(x_AD, w1_EFD, w2_EDF, w3_EFD, counts)


def sorted_dispatch(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    grouped: bool | None = None,
) -> torch.Tensor:
    """``grouped``: True for torch._grouped_mm, False for the host-count paths (padded or loop),
    None to choose: grouped_mm on accelerators where it runs, and on CPU from
    CPU_GROUPED_MIN_ROWS mean rows per expert. This CPU build's grouped_mm is a loop of
    per-expert products (seen in the profiler): with few rows it shares the loop's few-row
    slowness (loop_experts.py) without its remedy."""
    p = sort_by_expert(expert_ids_TK, w1_EFD.shape[0])
    x_AD = tokens_to_rows(x_TD, p)
    if grouped is None:
        # On CPU grouped_mm pays off only with many rows per expert (measured at T=4096, k=2,
        # E=8: 3% faster forward, 12% forward+backward than padded products; slower at T=512).
        many_rows = x_AD.shape[0] >= CPU_GROUPED_MIN_ROWS * w1_EFD.shape[0]
        grouped = (x_TD.device.type != "cpu" or many_rows) and can_grouped_mm(x_AD, w1_EFD, w2_EDF, w3_EFD)
    experts = _experts_grouped if grouped else _experts_loop
    return combine(experts(x_AD, p, w1_EFD, w2_EDF, w3_EFD), p, weights_TK)
