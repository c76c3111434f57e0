"""Data parallelism for the dense parameters (DDP or FSDP2), composed with expert parallelism.

Gradient bookkeeping, with N = dp * ep ranks each computing the loss L_r of its own batch and
the objective (1/N) * sum_r L_r (the mean over the global batch):

- dense parameters (attention, norms, embeddings, routers) are replicated or sharded over all
  N ranks; their gradients are averaged over all N ranks (DDP all-reduce / FSDP
  reduce-scatter, both divide by N);
- expert parameters under EP: the backward all-to-all already sums every ep rank's gradient
  into the owner, so they are summed over the dp group only and divided by N (not by dp).

The wrappers go on from outside: the model files hold no collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from smoe.distributed.expert_parallel import (
    TouchAllEngine,
    ep_engine,
    expert_param_names,
    find_engine,
    moe_layers,
)
from smoe.distributed.mesh import ParallelMesh, param_dtype


def _touch_all_local_experts(model: nn.Module) -> None:
    """Non-EP MoE layers: make every expert produce a gradient on every rank (see touch_all_experts)."""
    for moe in moe_layers(model):
        if ep_engine(moe) is None and find_engine(moe, TouchAllEngine) is None:
            moe.engine = TouchAllEngine(moe.engine)


def _expert_grad_hook(dp_group: dist.ProcessGroup | None, world: int, ddp: DistributedDataParallel):
    def hook(p: torch.Tensor) -> None:
        # Under ``ddp.no_sync()`` (gradient accumulation) leave the sum alone: reduce once, on
        # the backward that syncs, or earlier micro-batches would be divided again each time.
        if not ddp.require_backward_grad_sync:
            return
        p.grad.div_(world)
        if dp_group is not None:
            dist.all_reduce(p.grad, group=dp_group)

    return hook


def apply_ddp(model: nn.Module, pmesh: ParallelMesh) -> DistributedDataParallel:
    """Replicate the dense parameters over all ranks with DDP; reduce the expert-parallel
    ones over ``dp`` in a hook that fires as each expert gradient is complete.

    Returns the DDP wrapper (call it like the model; ``unwrap`` gives the model back).
    """
    _touch_all_local_experts(model)
    ignored = sorted(expert_param_names(model))
    if ignored:
        # Each ep rank holds different experts: DDP must neither broadcast nor average them.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = None
    if pmesh.mesh.device_type == "cuda":
        device_ids = [torch.cuda.current_device()]
    ddp = DistributedDataParallel(model, process_group=pmesh.world.get_group(), device_ids=device_ids)
    if ignored:
        dp_group = pmesh.dp.get_group() if pmesh.cfg.dp > 1 else None
        hook = _expert_grad_hook(dp_group, pmesh.world_size, ddp)
        params = dict(model.named_parameters())
        for name in ignored:
            params[name].register_post_accumulate_grad_hook(hook)
    return ddp


def apply_fsdp(model: nn.Module, pmesh: ParallelMesh) -> nn.Module:
    """Shard with FSDP2 ``fully_shard``: each block and the root over all ranks; under EP
    each MoE's expert weights as their own group over ``dp`` (and its router over all ranks).

    Returns the model itself (FSDP2 works in place).
    """
    dtype = param_dtype(pmesh.cfg)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    _touch_all_local_experts(model)
    for moe in moe_layers(model):
        if ep_engine(moe) is not None:
            # The router is dense: shard it over everyone before the MoE group claims it.
            fully_shard(moe.gate, mesh=pmesh.world, mp_policy=mp)
            fully_shard(moe, mesh=pmesh.dp, mp_policy=mp)
            # Divide by N, not dp (see the module docstring). For dp > 1: plain SUM then a
            # division, as gloo has no PREMUL_SUM (FSDP's choice for a custom factor). Not for
            # dp == 1: FSDP2 (torch 2.13) then skips the collective and divides by the factor
            # itself, and forced SUM would divide a second time (gradients halved, seen in tests).
            moe.set_gradient_divide_factor(float(pmesh.world_size))
            if pmesh.cfg.dp > 1:
                moe.set_force_sum_reduction_for_comms(True)
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=pmesh.world, mp_policy=mp)
    fully_shard(model, mesh=pmesh.world, mp_policy=mp)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 and EP modify the model in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
