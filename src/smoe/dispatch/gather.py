"""The gather engine, for a handful of tokens (decoding): read only the chosen experts' weights.

Legend: T tokens, D model dim, E experts, F expert hidden dim, K chosen experts per token,
A = T * K assignments.

With T=1, K=2 a layer touches 2 of the E experts; reading all E (as a grouped product over
every expert does) would cost E/K times the memory traffic. Two ways, by device:

- CPU: reading the ids on the host costs nothing (no device to wait for), so loop over the
  experts actually chosen and use views of their weights: no copy at all.
- accelerators: a host read would stall the stream and break CUDA graphs, so gather the chosen
  experts' weights with ``index_select`` (one copy of K experts per token) and use ``bmm``.
  Fine for a handful of tokens; for many it copies far more than the weights themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoe.dispatch.sorted_engine import sorted_dispatch


def _gather_host_loop(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
    """Views of the chosen experts' weights, one SwiGLU per chosen expert on its rows: the
    sorted engine's loop, which reads the per-expert counts on the host and skips empty experts."""
    return sorted_dispatch(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD, grouped=False)


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
    impl = _gather_host_loop if x_TD.device.type == "cpu" else _gather_index_select
    return impl(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD)
