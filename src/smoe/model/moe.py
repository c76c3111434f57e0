"""The feed-forward blocks: a dense SwiGLU (Mistral) and the sparse mixture of experts (Mixtral).

Legend: T tokens (batch and sequence flattened), D model dim, E experts, F expert hidden dim,
K experts chosen per token.

For each token the router scores all E experts, keeps the K largest logits and takes a
softmax over just those K. That equals a softmax over all E followed by top-K and
renormalisation (what Hugging Face computes), since softmax is monotonic and the shared
normaliser cancels. The expert weights of a layer are stored stacked, ``w1_EFD`` etc., so that
grouped kernels and expert sharding can use them as tensors.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import ModelConfig
from smoe.dispatch import get_engine, tokens_per_expert
from smoe.dispatch.capacity import apply_capacity
from smoe.dispatch.reference import swiglu


@dataclass
class RouterOutput:
    """One layer's routing for every token of the batch (T = B * seq flattened)."""

    logits_TE: torch.Tensor  # float32 router logits
    expert_ids_TK: torch.Tensor  # chosen experts, best first
    weights_TK: torch.Tensor  # float32 softmax over the K chosen logits
    dropped_TK: torch.Tensor | None = None  # bool, assignments over capacity (capacity mode only)

    def tokens_per_expert(self) -> torch.Tensor:
        """Assignments the router made per expert (before any capacity drop); no host sync."""
        return tokens_per_expert(self.expert_ids_TK, self.logits_TE.shape[-1])

    def dropped_fraction(self) -> torch.Tensor:
        """Fraction of the T*K assignments dropped by the capacity limit, as a device tensor;
        0 for an empty batch (nothing dropped), not the 0/0 of a mean."""
        if self.dropped_TK is None:
            return self.weights_TK.new_zeros(())
        return self.dropped_TK.float().sum() / max(self.dropped_TK.numel(), 1)


class FeedForward(nn.Module):
    """Dense SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, None]:
        return swiglu(x_BTD, self.w1.weight, self.w2.weight, self.w3.weight), None


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.jitter = cfg.router_jitter
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.dim))

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        # Router arithmetic in float32 whatever the model dtype, and with autocast off: bf16
        # training runs under autocast, which would otherwise make this product bf16.
        x_TD = x_TD.float()
        if self.training and self.jitter > 0:
            # Switch-style multiplicative jitter on the router input only, drawn in float32: in
            # bf16 a factor within 0.004 of 1 rounds to exactly 1.
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        kind = x_TD.device.type
        no_autocast = (
            torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext()
        )  # the meta device (shape checks) has no autocast to switch off
        with no_autocast:
            logits_TE = F.linear(x_TD, self.weight.float())
            top_logits_TK, expert_ids_TK = torch.topk(logits_TE, self.top_k, dim=-1)
            weights_TK = torch.softmax(top_logits_TK, dim=-1)
        return RouterOutput(logits_TE, expert_ids_TK, weights_TK)


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts. The expert computation is delegated to a dispatch
    engine (``self.engine``), which parallel wrappers may replace from outside."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, F_, D = cfg.num_experts, cfg.hidden_dim, cfg.dim
        self.num_experts = E
        self.gate = Router(cfg)
        self.w1 = nn.Parameter(torch.empty(E, F_, D))  # w1_EFD
        self.w2 = nn.Parameter(torch.empty(E, D, F_))  # w2_EDF
        self.w3 = nn.Parameter(torch.empty(E, F_, D))  # w3_EFD
        self.engine = get_engine(cfg.dispatch)
        self.capacity_factor = cfg.capacity_factor  # None: dropless

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        routing = self.gate(x_TD)
        expert_ids_TK = routing.expert_ids_TK
        if self.capacity_factor is not None:
            # Dropped assignments get expert id E, which every engine skips (dispatch/capacity.py).
            expert_ids_TK, routing.dropped_TK = apply_capacity(
                expert_ids_TK, self.num_experts, self.capacity_factor
            )
        y_TD = self.engine(x_TD, expert_ids_TK, routing.weights_TK, self.w1, self.w2, self.w3)
        return y_TD.view(B, T, D), routing
