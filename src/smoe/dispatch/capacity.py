"""Switch-style expert capacity: drop the assignments an expert has no room for.

Legend: T tokens, E experts, K chosen experts per token.

capacity = ceil(capacity_factor * T * K / E) assignments per expert. Priority, as in GShard's
top-2 and Switch's top-1: every token's first choice before any token's second choice, and
within one choice rank, earlier tokens first. An expert keeps its first ``capacity``
assignments in that order and drops the rest.

Worked example, T=4, K=2, E=2, capacity_factor=0.5 -> capacity = ceil(0.5 * 4 * 2 / 2) = 2:
    expert_ids = [[0, 1], [0, 1], [0, 1], [1, 0]]
    priority order: (t0,c0)->0 (t1,c0)->0 (t2,c0)->0 (t3,c0)->1 (t0,c1)->1 (t1,c1)->1 (t2,c1)->1 (t3,c1)->0
    expert 0 keeps t0,t1 (first choices) and drops t2's first choice and t3's second;
    expert 1 keeps t3 (first choice) and t0 (second) and drops t1's and t2's second choices.
    dropped = [[F, F], [F, T], [T, T], [F, T]] -> 4 of 8 dropped.

A dropped assignment is given expert id E, which every engine skips: its expert contribution is
zero and the surviving weights are not renormalised, so a token dropped by all its experts
passes through the block's residual unchanged.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from smoe.dispatch.permute import tokens_per_expert


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """ceil(capacity_factor * T * K / E), in exact arithmetic on the factor as written: in
    floats 1.1 * 100 * 2 / 4 is 55.000000000000007, whose ceiling would be one slot too many.
    A factor of 0 or below (or not finite) is refused: it would silently drop every assignment."""
    factor = float(capacity_factor)  # numpy scalars too: repr(np.float64(1.1)) is not a number
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(
            f"capacity_factor must be a finite number > 0 (None: dropless), got {capacity_factor!r}"
        )
    return math.ceil(Fraction(repr(factor)) * num_tokens * top_k / num_experts)


def apply_capacity(
    expert_ids_TK: torch.Tensor, num_experts: int, capacity_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (expert ids with dropped assignments set to E, dropped_TK bool mask). No host sync."""
    T, K = expert_ids_TK.shape
    capacity = expert_capacity(capacity_factor, T, K, num_experts)
    # Priority order is choice-major: (c0: t0..tT-1), (c1: t0..tT-1), ...
    ids_P = expert_ids_TK.t().reshape(-1)
    sorted_ids_P, order_P = torch.sort(ids_P, stable=True)
    counts_E = tokens_per_expert(ids_P, num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    rank_sorted_P = torch.arange(ids_P.numel(), device=ids_P.device) - starts_E[sorted_ids_P]
    rank_P = torch.empty_like(rank_sorted_P).scatter_(0, order_P, rank_sorted_P)
    dropped_TK = (rank_P >= capacity).view(K, T).t()
    return expert_ids_TK.masked_fill(dropped_TK, num_experts), dropped_TK
