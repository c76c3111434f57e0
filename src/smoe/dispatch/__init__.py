"""Dispatch engines: compute the mixture-of-experts output from routing decisions.

Every engine has the same signature::

    engine(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD) -> y_TD

    y[t] = sum_k weights[t, k] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])),  e = expert_ids[t, k]

Legend: T tokens, D model dim, E experts, F expert hidden dim, K chosen experts per token.
The reference engine is the specification; every other engine must equal it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from smoe.dispatch.reference import reference_dispatch

Engine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

ENGINES: dict[str, Engine] = {"reference": reference_dispatch}


def get_engine(name: str) -> Engine:
    """Return the engine called ``name``. ``"auto"`` returns a chooser that picks per call."""
    if name == "auto":
        return ENGINES.get("auto", reference_dispatch)
    if name not in ENGINES:
        raise ValueError(f"unknown dispatch engine {name!r}; available: {sorted(ENGINES)}")
    return ENGINES[name]


def tokens_per_expert(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Count of (token, choice) assignments per expert, computed on device (no host sync)."""
    return torch.bincount(expert_ids_TK.reshape(-1), minlength=num_experts)
