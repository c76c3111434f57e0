"""Mixed precision for the expert dispatch.

Autocast casts the inputs of ``F.linear``/``matmul`` to bf16 but not those of the other ops a
dispatch engine uses (``index_add``, ``scatter``, grouped kernels), so an engine fed float32
activations and weights under autocast mixes dtypes. ``BF16Engine`` does for the experts what
autocast does for a linear layer: it casts activations, routing weights and the (float32
master) expert weights to the autocast dtype, runs the engine with autocast off, and lets
autograd carry the gradients back to the float32 parameters through the casts.

Legend: T tokens, D model dim, E experts, F expert hidden dim, K chosen experts.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.model.moe import MoE


class BF16Engine:
    def __init__(self, engine):
        # ``.engine`` is the wrapper convention smoe.distributed.expert_parallel.find_engine follows
        # to find an expert-parallel engine under this one (wrapped after parallelize).
        self.engine = engine

    def __call__(self, x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD):
        kind = x_TD.device.type
        if not torch.is_autocast_enabled(kind):
            return self.engine(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD)
        dt = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            return self.engine(
                x_TD.to(dt), expert_ids_TK, weights_TK.to(dt), w1_EFD.to(dt), w2_EDF.to(dt), w3_EFD.to(dt)
            )


def wrap_engines_for_autocast(model: nn.Module) -> int:
    """Wrap every MoE layer's engine (once); returns how many layers were wrapped."""
    n = 0
    for m in model.modules():
        if isinstance(m, MoE) and not isinstance(m.engine, BF16Engine):
            m.engine = BF16Engine(m.engine)
            n += 1
    return n
