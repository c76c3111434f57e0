"""Sorting (token, choice) assignments by expert, and moving rows between token order and
expert order, shared by the sorted and gather engines.

Legend: T tokens, D model dim, E experts, K chosen experts per token, A = T * K assignments
(flattened token-major: assignment a is token a // K, choice a % K).

An expert id equal to E marks a dropped assignment (capacity mode, see ``capacity.py``). It
sorts after every real expert, is left out of the per-expert counts, and so is never computed.

Every row move here is a gather (``index_select``) forwards and backwards. Autograd's own
backward of a gather is a scatter-add, which on CPU costs far more than the gather (measured:
90 ms to add 2 rows of 1024 into a (1, 1024) tensor on the shared 2-core VM), so the two
moves have hand-written backwards that use the inverse permutation instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    """Assignments grouped by expert; within an expert, in token order (a stable sort)."""

    order_A: torch.Tensor  # assignment index (into the flat T*K list) of each sorted row
    inverse_A: torch.Tensor  # sorted row of each assignment: order_A[inverse_A[a]] == a
    token_A: torch.Tensor  # token of each sorted row: order_A // K
    counts_E: torch.Tensor  # rows per expert (dropped assignments excluded), int64
    valid_A1: torch.Tensor  # (A, 1) bool, False on the rows of dropped assignments (sorted last)
    top_k: int


def tokens_per_expert(
    expert_ids: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 (E,) count of each expert id in ``expert_ids`` (any shape), each one counted
    ``weights`` times if given (integers, same shape). Id E, a dropped assignment, is not
    counted. Example, E = 3: ids [[2, 0], [0, 3]] -> [2, 0, 1].

    Not ``torch.bincount``: on CUDA that reads the largest id back to the host (its output
    length depends on it), a synchronisation on every call and an error under CUDA graph
    capture. Here the output size depends on E alone, and integer atomic adds make the counts
    exact in any order."""
    ids_A = expert_ids.reshape(-1).long()
    add_A = torch.ones_like(ids_A) if weights is None else weights.reshape(-1).long()
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids_A.device)  # slot E: dropped
    return counts.scatter_add_(0, ids_A, add_A)[:num_experts]


def sort_by_expert(expert_ids_TK: torch.Tensor, num_experts: int) -> Permutation:
    """Group the T*K assignments by expert without a host synchronisation."""
    K = expert_ids_TK.shape[1]
    ids_A = expert_ids_TK.reshape(-1)
    sorted_ids_A, order_A = torch.sort(ids_A, stable=True)
    inverse_A = torch.empty_like(order_A)
    inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
    counts_E = tokens_per_expert(ids_A, num_experts)
    valid_A1 = (sorted_ids_A < num_experts).unsqueeze(-1)
    return Permutation(order_A, inverse_A, order_A // K, counts_E, valid_A1, K)


class _TokensToRows(torch.autograd.Function):
    """x_TD -> x_AD: row r is x[token_A[r]]. Backward sums each token's K rows."""

    @staticmethod
    def forward(ctx, x_TD, token_A, inverse_A, K):
        ctx.save_for_backward(inverse_A)
        ctx.K = K
        return x_TD.index_select(0, token_A)

    @staticmethod
    def backward(ctx, g_AD):
        (inverse_A,) = ctx.saved_tensors
        A, D = g_AD.shape
        return g_AD.index_select(0, inverse_A).view(A // ctx.K, ctx.K, D).sum(dim=1), None, None, None


class _RowsToAssignments(torch.autograd.Function):
    """o_AD in sorted-row order -> the same rows in assignment order (a permutation)."""

    @staticmethod
    def forward(ctx, o_AD, inverse_A, order_A):
        ctx.save_for_backward(order_A)
        return o_AD.index_select(0, inverse_A)

    @staticmethod
    def backward(ctx, g_AD):
        (order_A,) = ctx.saved_tensors
        return g_AD.index_select(0, order_A), None, None


def tokens_to_rows(x_TD: torch.Tensor, p: Permutation) -> torch.Tensor:
    return _TokensToRows.apply(x_TD, p.token_A, p.inverse_A, p.top_k)


def combine(o_AD: torch.Tensor, p: Permutation, weights_TK: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_k weights[t, k] * o[row of (t, k)], zero for dropped rows; in o's dtype, with
    the weights cast to it first, as the reference does."""
    T, K = weights_TK.shape
    o_AD = torch.where(p.valid_A1, o_AD, 0)
    o_TKD = _RowsToAssignments.apply(o_AD, p.inverse_A, p.order_A).view(T, K, o_AD.shape[1])
    return (o_TKD * weights_TK.to(o_AD.dtype).unsqueeze(-1)).sum(dim=1)
