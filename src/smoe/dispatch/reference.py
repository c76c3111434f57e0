"""The reference dispatch: a plain loop over experts. Slow, obvious, and the specification.

Legend: T tokens, D model dim, E experts, F expert hidden dim, K chosen experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x_ND: torch.Tensor, w1_FD: torch.Tensor, w2_DF: torch.Tensor, w3_FD: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: w2(silu(w1 x) * w3 x)."""
    return F.linear(F.silu(F.linear(x_ND, w1_FD)) * F.linear(x_ND, w3_FD), w2_DF)


def reference_dispatch(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
) -> torch.Tensor:
    y_TD = torch.zeros_like(x_TD)
    for e in range(w1_EFD.shape[0]):
        token_idx, choice_idx = torch.where(expert_ids_TK == e)
        if token_idx.numel() == 0:
            continue
        out_ND = swiglu(x_TD[token_idx], w1_EFD[e], w2_EDF[e], w3_EFD[e])
        gate_N1 = weights_TK[token_idx, choice_idx].unsqueeze(-1).to(out_ND.dtype)
        y_TD = y_TD.index_add(0, token_idx, out_ND * gate_N1)
    return y_TD
