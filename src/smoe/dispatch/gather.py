"""The gather engine, for a handful of tokens (decoding): read only the chosen experts' weights.

Legend: T tokens, D model dim, E experts, F expert hidden dim, K chosen experts per token,
A = T * K assignments.

With T=1, K=2 a layer touches 2 of the E experts; reading all E (as a grouped product over
every expert does) would cost E/K times the memory traffic. Two ways, by device:

- CPU: reading the ids on the host costs nothing (no device to wait for), so loop over the
  experts actually chosen and use views of their weights: no copy at all. Without autograd
  and with at most E assignments (decoding), a direct loop over the chosen experts with no
  permutation (``_gather_decode``): at T = 1 the layer is six matrix-vector products of a few
  ms, and the sorted engine's sort, permutations and autograd Functions (about 50 small ops)
  cost a sizeable fraction of that. Each product is cut into one block per thread
  (``split_rows``): a single matrix-vector product would run on one core.
- accelerators: a host read would stall the stream and break CUDA graphs, so gather the chosen
  experts' weights with ``index_select`` (one copy of K experts per token) and use ``bmm``.
  Fine for a handful of tokens; for many it copies far more than the weights themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoe.dispatch.grouped_experts import needs_grad
from smoe.dispatch.sorted_engine import sorted_dispatch
from smoe.dispatch.split_rows import rows_times_wt


def _gather_host_loop(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
    """Views of the chosen experts' weights, one SwiGLU per chosen expert on its rows: the
    sorted engine's loop, which reads the per-expert counts on the host and skips empty experts."""
    return sorted_dispatch(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD, grouped=False)


def _gather_decode(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
    """No autograd: each chosen expert on its tokens, its products spread over the threads."""
    E, K = w1_EFD.shape[0], expert_ids_TK.shape[1]
    assignments_by_expert: dict[int, list[int]] = {}  # assignment a = token a // K, choice a % K
    for a, e in enumerate(expert_ids_TK.reshape(-1).tolist()):
        if e < E:  # id E: dropped by the capacity limit
            assignments_by_expert.setdefault(e, []).append(a)
    y_TD = torch.zeros_like(x_TD)
    gate_A = weights_TK.reshape(-1).to(x_TD.dtype)
    for e, assignments in assignments_by_expert.items():
        if len(assignments) == 1:
            a = assignments[0]
            x_ND = x_TD[a // K].unsqueeze(0)
        else:
            a_N = torch.tensor(assignments, device=x_TD.device)
            token_N = a_N // K
            x_ND = x_TD.index_select(0, token_N)
        g_NF = F.silu(rows_times_wt(x_ND, w1_EFD[e])).mul_(rows_times_wt(x_ND, w3_EFD[e]))
        o_ND = rows_times_wt(g_NF, w2_EDF[e])
        if len(assignments) == 1:
            y_TD[a // K] += o_ND[0].mul_(gate_A[a])
        else:
            y_TD.index_add_(0, token_N, o_ND.mul_(gate_A[a_N].unsqueeze(-1)))
    return y_TD


def _gather_index_select(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
    T, D = x_TD.shape
    E, K = w1_EFD.shape[0], expert_ids_TK.shape[1]
    ids_A = expert_ids_TK.reshape(-1)
    valid_A = ids_A < E
    ids_A = ids_A.clamp(max=E - 1)  # dropped rows compute something harmless, then are masked
    x_AD1 = x_TD.repeat_interleave(K, dim=0).unsqueeze(-1)
    h1_AF = torch.bmm(w1_EFD.index_select(0, ids_A), x_AD1).squeeze(-1)
    h3_AF = torch.bmm(w3_EFD.index_select(0, ids_A), x_AD1).squeeze(-1)
    g_AF1 = (F.silu(h1_AF) * h3_AF).unsqueeze(-1)
    o_AD = torch.bmm(w2_EDF.index_select(0, ids_A), g_AF1).squeeze(-1)
    gate_A1 = weights_TK.reshape(-1).to(o_AD.dtype).unsqueeze(-1)
    o_AD = torch.where(valid_A.unsqueeze(-1), o_AD * gate_A1, 0)
    return o_AD.view(T, K, D).sum(dim=1)


def gather_dispatch(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
) -> torch.Tensor:
    if x_TD.device.type != "cpu":
        impl = _gather_index_select
    elif expert_ids_TK.numel() <= w1_EFD.shape[0] and not needs_grad(
        x_TD, weights_TK, w1_EFD, w2_EDF, w3_EFD
    ):
        impl = _gather_decode
    else:
        impl = _gather_host_loop
    return impl(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD)
