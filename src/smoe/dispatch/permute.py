"""Sorting (token, choice) assignments by expert, shared by the sorted and triton engines.

Legend: T tokens, D model dim, E experts, K chosen experts per token, A = T * K assignments
(flattened token-major: assignment a is token a // K, choice a % K).

An expert id equal to E marks a dropped assignment (capacity mode, see ``capacity.py``). It
sorts after every real expert, is left out of the per-expert counts, and so is never computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    """Assignments grouped by expert; within an expert, in token order (a stable sort)."""

    order_A: torch.Tensor  # assignment index (into the flat T*K list) of each sorted row
    token_A: torch.Tensor  # token of each sorted row: order_A // K
    counts_E: torch.Tensor  # rows per expert (dropped assignments excluded), int64
    valid_A1: torch.Tensor  # (A, 1) bool, False on the rows of dropped assignments (sorted last)


def sort_by_expert(expert_ids_TK: torch.Tensor, num_experts: int) -> Permutation:
    """Group the T*K assignments by expert without a host synchronisation."""
    K = expert_ids_TK.shape[1]
    ids_A = expert_ids_TK.reshape(-1)
    sorted_ids_A, order_A = torch.sort(ids_A, stable=True)
    # bincount's length grows to E + 1 when a dropped id (== E) is present; keep the first E.
    counts_E = torch.bincount(ids_A, minlength=num_experts)[:num_experts]
    valid_A1 = (sorted_ids_A < num_experts).unsqueeze(-1)
    return Permutation(order_A, order_A // K, counts_E, valid_A1)
