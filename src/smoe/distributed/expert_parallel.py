"""Expert parallelism: each rank of the ``ep`` group holds E / ep experts of every MoE layer,
and tokens travel to the ranks that own their experts with all-to-all.

Legend: T tokens on this rank, D model dim, E experts (global), L = E / ep local experts,
F expert hidden dim, K experts chosen per token, N = T * K (token, choice) assignments sent,
M assignments received, R ranks of the ep group.

One MoE layer on ep rank r, after the (replicated) router has picked experts for its tokens::

    1. sort the N assignments by expert id; expert e lives on rank e // L, so the sorted rows
       are grouped by destination rank
    2. all_to_all the counts [R, L] -> every rank learns how many rows it gets from whom,
       per local expert
    3. all_to_all the rows x_ND -> x_MD (variable split sizes from step 2); rows arrive grouped
       by source rank, then by local expert
    4. compute the local experts on x_MD with a smoe.dispatch engine (K = 1, weight 1)
    5. all_to_all y_MD back -> y_ND (the splits reversed), in the order the rows left
    6. y_TD = sum over k of weights_TK * y   (gating applied at home, so its gradient is local)

The all-to-alls are autograd functions whose backward is the reverse all-to-all, so expert
weights receive the gradient of every ep rank's tokens: after backward the local expert
gradient is already summed over the ep group, and only the dp group is left to reduce.
Nothing here lives in the model: ``apply_expert_parallel`` swaps each MoE's ``engine`` and
replaces its w1/w2/w3 Parameters by this rank's slices.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from smoe.dispatch import Engine, get_engine, tokens_per_expert
from smoe.model.moe import MoE

EXPERT_PARAMS = ("w1", "w2", "w3")
_E = TypeVar("_E")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x_ND, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # type: ignore[override]
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out_MD = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out_MD, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        grad_ND = grad_MD.new_empty((sum(in_splits), *grad_MD.shape[1:]))
        dist.all_to_all_single(grad_ND, grad_MD.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_ND, None, None, None


def all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x_ND, out_splits, in_splits, group)


def touch_all_experts(y_MD: torch.Tensor, x_MD: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """Add 0 * (x + sum of every weight) so that every expert weight gets a (zero) gradient
    and the graph reaches x even when no row arrived.

    Why: DDP and FSDP reduce gradients in a fixed order and expect every rank to produce a
    gradient for every parameter. The experts are stacked, one parameter per weight, so a rank
    lacks that gradient only when none of its local experts got a row (the engines then never
    touch the weights), and the other ranks would wait for it.
    Likewise a rank that receives no rows must still run the backward all-to-all.
    """
    zero = sum(w.sum() for w in weights) * 0.0
    return y_MD + x_MD * 0.0 + zero.to(y_MD.dtype)


class ExpertParallelEngine:
    """A dispatch engine (same signature as smoe.dispatch engines) whose w1/w2/w3 are this
    rank's L = E / ep experts, numbers ``ep_rank * L .. ep_rank * L + L - 1``."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int, local_engine: Engine):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the ep group size {self.ep_size}"
            )
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.local_engine = local_engine

    def __repr__(self) -> str:
        return f"ExpertParallelEngine(ep_rank={self.ep_rank}/{self.ep_size}, experts={self.local_range()})"

    def local_range(self) -> range:
        return range(self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local)

    def __call__(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        w1_LFD: torch.Tensor,
        w2_LDF: torch.Tensor,
        w3_LFD: torch.Tensor,
    ) -> torch.Tensor:
        R, L, E = self.ep_size, self.num_local, self.num_experts
        if w1_LFD.shape[0] != L:
            raise ValueError(
                f"expert-parallel engine expects {L} local experts, got w1 of shape {tuple(w1_LFD.shape)}"
            )
        K = expert_ids_TK.shape[1]
        # 1. Group the (token, choice) rows by expert, hence by destination rank. Assignments
        #    dropped by a capacity limit carry id E: they sort last and are not sent.
        flat_e = expert_ids_TK.reshape(-1)
        count_RL = tokens_per_expert(flat_e, E).view(R, L)
        in_splits = count_RL.sum(1).tolist()
        order_N = torch.argsort(flat_e, stable=True)[: sum(in_splits)]
        token_N = order_N // K
        x_ND = x_TD[token_N]
        # 2. Counts first: recv_RL[s, l] = rows rank s sends to my local expert l.
        recv_RL = torch.empty_like(count_RL)
        dist.all_to_all_single(recv_RL, count_RL.contiguous(), group=self.group)
        out_splits = recv_RL.sum(1).tolist()
        # 3. Rows out; they arrive grouped by source rank, then by local expert.
        x_MD = all_to_all(x_ND, out_splits, in_splits, self.group)
        local_M = torch.arange(L, device=x_MD.device).repeat(R).repeat_interleave(recv_RL.reshape(-1))
        # 4. Local experts, ungated (the gate weight is applied at home in step 6).
        ones_M1 = torch.ones(local_M.shape[0], 1, dtype=weights_TK.dtype, device=x_MD.device)
        y_MD = self.local_engine(x_MD, local_M[:, None], ones_M1, w1_LFD, w2_LDF, w3_LFD)
        y_MD = touch_all_experts(y_MD, x_MD, w1_LFD, w2_LDF, w3_LFD)
        # 5. Results back the same way, reversed.
        y_ND = all_to_all(y_MD, in_splits, out_splits, self.group)
        # 6. Weighted sum of each token's K expert outputs.
        gate_N1 = weights_TK.reshape(-1)[order_N].unsqueeze(-1).to(y_ND.dtype)
        return torch.zeros_like(x_TD).index_add(0, token_N, y_ND * gate_N1)


class TouchAllEngine:
    """Wraps a local engine so every expert gets a gradient on every rank (see touch_all_experts)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
        y_TD = self.engine(x_TD, expert_ids_TK, weights_TK, w1_EFD, w2_EDF, w3_EFD)
        return touch_all_experts(y_TD, x_TD, w1_EFD, w2_EDF, w3_EFD)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _inner(engine: Engine) -> Engine | None:
    """The engine a wrapper delegates to, or None for a plain engine.

    Wrappers (TouchAllEngine here, BF16Engine in smoe.train.precision, any later one) keep it
    as ``.engine``; the EP engine keeps its local one as ``.local_engine``.
    """
    if isinstance(engine, ExpertParallelEngine):
        return engine.local_engine
    return getattr(engine, "engine", None)


def find_engine(moe: MoE, kind: type[_E]) -> _E | None:
    """The engine of type ``kind`` in ``moe``'s chain of wrappers, or None."""
    engine: Engine | None = moe.engine
    while engine is not None and not isinstance(engine, kind):
        engine = _inner(engine)
    return engine


def ep_engine(moe: MoE) -> ExpertParallelEngine | None:
    """The expert-parallel engine of ``moe``, under any wrappers, or None if it is not sharded.

    Why not ``isinstance(moe.engine, ...)``: wrappers go on after ``parallelize`` (the training
    loop's BF16Engine for ``--dtype bf16`` sits outside the EP engine, so the all-to-all carries
    bf16), and every lookup of the ep group (gradient norm, checkpoint gather) must still find it.
    """
    return find_engine(moe, ExpertParallelEngine)


def apply_expert_parallel(
    model: nn.Module, ep_group: dist.ProcessGroup, dispatch: str | None = None
) -> nn.Module:
    """Shard every MoE layer's experts over ``ep_group`` in place and install the EP engine.

    The full expert weights must be present (and identical) on every rank beforehand, e.g.
    after ``build_model`` with one seed or ``load_model``; each rank keeps its slice. ``dispatch``
    names the local engine (default: the model's own).
    """
    for moe in moe_layers(model):
        if _inner(moe.engine) is not None:
            # A wrapper inside the EP engine would change what it does (BF16Engine there would
            # send float32 over the all-to-all); dropping it would change it silently.
            raise ValueError(
                f"an MoE layer's engine is already wrapped ({moe.engine!r}): apply expert parallelism "
                "first, then wrappers such as smoe.train.precision.wrap_engines_for_autocast"
            )
        local = get_engine(dispatch) if dispatch else moe.engine
        engine = ExpertParallelEngine(ep_group, moe.num_experts, local)
        lo, hi = engine.local_range().start, engine.local_range().stop
        for name in EXPERT_PARAMS:
            full = getattr(moe, name)
            if full.shape[0] != moe.num_experts:
                raise ValueError(
                    f"{name} of an MoE layer has {full.shape[0]} experts, expected {moe.num_experts}: already sharded?"
                )
            setattr(moe, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
        moe.engine = engine
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert weights of every expert-parallel MoE layer (gradients summed over ep already)."""
    return [getattr(m, n) for m in moe_layers(model) if ep_engine(m) is not None for n in EXPERT_PARAMS]


def expert_param_names(model: nn.Module) -> set[str]:
    ids = {id(p) for p in expert_parameters(model)}
    return {name for name, p in model.named_parameters() if id(p) in ids}
