"""Dispatch engines: compute the mixture-of-experts output from routing decisions.

Every engine has the same signature::

    engine(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD) -> y_TD

    y[t] = sum_k weights[t, k] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])),  e = expert_ids[t, k]

Legend: T tokens, D model dim, E experts, F expert hidden dim, K chosen experts per token.
The reference engine is the specification; every other engine must equal it. An expert id of
E (one past the last expert) marks an assignment dropped by the capacity limit: it contributes
nothing, as in the reference loop, which never visits it. ``weights_TK`` may be float32 while
x is bfloat16; engines cast it to x's dtype, as the reference does.

Engines:
    reference  the loop over experts (the specification).
    sorted     permute assignments by expert, one grouped product per weight (sorted_engine.py).
    gather     for a handful of tokens: read only the chosen experts' weights (gather.py).
    triton     fused permute + grouped GEMM Triton kernels with their backward (triton_engine.py).
    auto       picks one of the above on every call, by device and token count (choose_engine).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from functools import cache

import torch

from smoe.dispatch.gather import gather_dispatch
from smoe.dispatch.permute import tokens_per_expert  # noqa: F401  (public: counts without a host sync)
from smoe.dispatch.reference import reference_dispatch
from smoe.dispatch.sorted_engine import sorted_dispatch

Engine = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]

# Up to this many assignments auto picks "gather" on CPU. There gather and sorted run the same
# loop over the chosen experts (loop_experts.py), so the split only names the regime; on
# accelerators gather's weight copies pay off only while T * K <= E.
GATHER_MAX_ASSIGNMENTS = 32


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_dispatch(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
    """The Triton engine, imported on first use so that smoe runs without triton installed."""
    if not triton_available():
        raise ImportError("dispatch engine 'triton' needs the triton package (pip install 'smoe[triton]')")
    if x_TD.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"dispatch engine 'triton' runs on CUDA tensors (got {x_TD.device}); on CPU only under "
            "TRITON_INTERPRET=1 (tests). Use 'auto', 'sorted' or 'gather' instead."
        )
    from smoe.dispatch.triton_engine import triton_dispatch as impl

    return impl(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD)


def choose_engine(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int) -> str:
    """The engine "auto" runs for this call. Shapes and device only: no host synchronisation."""
    num_assignments = expert_ids_TK.numel()
    if x_TD.device.type == "cuda" and triton_available():
        return "triton"  # reads only the touched experts' tiles at any T, and never syncs
    if num_assignments <= (GATHER_MAX_ASSIGNMENTS if x_TD.device.type == "cpu" else num_experts):
        return "gather"
    return "sorted"


def auto_dispatch(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
    engine = ENGINES[choose_engine(x_TD, expert_ids_TK, w1_EFD.shape[0])]
    return engine(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD)


ENGINES: dict[str, Engine] = {
    "reference": reference_dispatch,
    "sorted": sorted_dispatch,
    "gather": gather_dispatch,
    "triton": triton_dispatch,
    "auto": auto_dispatch,
}


def get_engine(name: str) -> Engine:
    """Return the engine called ``name``. ``"auto"`` returns a chooser that picks per call."""
    if name not in ENGINES:
        raise ValueError(f"unknown dispatch engine {name!r}; available: {sorted(ENGINES)}")
    return ENGINES[name]
