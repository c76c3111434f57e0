"""Gradient clipping by the global norm of a parallelised model.

``torch.nn.utils.clip_grad_norm_`` sees only this rank's tensors. Under expert parallelism
that norm misses the other ep ranks' experts, so each rank would clip by a different factor
and the replicas would drift apart. Here every squared norm is summed over the ranks that
hold distinct pieces of it:

    plain dense grad (DDP)          identical on all ranks        -> no reduction
    DTensor grad (FSDP shard)       pieces over its mesh          -> sum over that mesh
    expert grad under EP            different experts per ep rank -> also sum over ep
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from smoe.distributed.data_parallel import unwrap
from smoe.distributed.expert_parallel import EXPERT_PARAMS, ep_engine, moe_layers


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The L2 norm of all gradients of the full (single-process-equivalent) model. Collective."""
    model = unwrap(model)
    ep_group = {
        id(getattr(moe, n)): engine.group
        for moe in moe_layers(model)
        if (engine := ep_engine(moe)) is not None
        for n in EXPERT_PARAMS
    }
    # (groups to sum over) -> squared norm; keys appear in the same order on every rank.
    buckets: dict[tuple, torch.Tensor] = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad
        groups: tuple = ()
        if isinstance(g, DTensor):
            groups += tuple(g.device_mesh.get_group(i) for i in range(g.device_mesh.ndim))
            g = g.to_local()
        if id(p) in ep_group:
            groups += (ep_group[id(p)],)
        sq = g.detach().float().pow(2).sum()
        buckets[groups] = buckets[groups] + sq if groups in buckets else sq
    if not buckets:
        return torch.zeros(())
    for groups, sq in buckets.items():
        for group in groups:
            dist.all_reduce(sq, group=group)
    return torch.stack(list(buckets.values())).sum().sqrt()


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale all gradients so that their global norm is at most ``max_norm``; returns the
    norm before clipping (the same on every rank). ``max_norm=inf`` only measures."""
    norm = grad_norm(model)
    if not math.isinf(max_norm):
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        if coef < 1.0:
            for p in unwrap(model).parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm
