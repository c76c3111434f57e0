"""Scale-out on torch.distributed: DDP, FSDP2 and expert parallelism, applied from outside the
model (the model files hold no collectives).

The hook a training loop needs::

    from smoe import distributed as sd

    sd.init_distributed(timeout_s)                 # no-op without torchrun's environment
    model = build_model(cfg, device=sd.local_device(), seed=seed)   # same seed on every rank
    model = sd.parallelize(model, sd.ParallelConfig(ep=2, data_parallel="fsdp"))
    tokens_bT = sd.shard_batch(global_tokens_BT)   # this rank's rows of the global batch
    ... forward, loss (mean over local rows) + aux losses, backward ...
    sd.clip_grad_norm_(model, max_norm)            # global norm: counts every rank's experts
    ... optimizer step ...
    sd.save_distributed(model, path)               # every rank calls; rank 0 writes
    opt_state = sd.full_optimizer_state(model, optimizer)   # collective; single-process layout
    sd.load_optimizer_state(model, optimizer, opt_state)    # on resume, after parallelize
    if sd.is_main(): log(...)

With one process ``parallelize`` returns the model unchanged.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from smoe.distributed.checkpoint import (
    all_gather_objects,
    full_optimizer_state,
    gather_full_params,
    load_optimizer_state,
    optimizer_param_names,
    save_distributed,
    single_process_model,
)
from smoe.distributed.data_parallel import apply_ddp, apply_fsdp, unwrap
from smoe.distributed.expert_parallel import ExpertParallelEngine, apply_expert_parallel
from smoe.distributed.grad_norm import clip_grad_norm_, grad_norm
from smoe.distributed.launch import (
    barrier,
    init_distributed,
    is_main,
    launched_by_torchrun,
    local_device,
    rank,
    shutdown,
    world_size,
)
from smoe.distributed.mesh import MeshError, ParallelConfig, ParallelMesh, build_mesh

__all__ = [
    "ExpertParallelEngine",
    "MeshError",
    "ParallelConfig",
    "ParallelMesh",
    "add_parallel_args",
    "all_gather_objects",
    "apply_ddp",
    "apply_expert_parallel",
    "apply_fsdp",
    "barrier",
    "build_mesh",
    "clip_grad_norm_",
    "full_optimizer_state",
    "gather_full_params",
    "grad_norm",
    "init_distributed",
    "is_main",
    "launched_by_torchrun",
    "load_optimizer_state",
    "local_device",
    "optimizer_param_names",
    "parallel_config_from_args",
    "parallelize",
    "rank",
    "save_distributed",
    "shard_batch",
    "shutdown",
    "single_process_model",
    "unwrap",
    "world_size",
]


def parallelize(model: nn.Module, cfg: ParallelConfig, device_type: str | None = None) -> nn.Module:
    """Apply expert parallelism (if ``cfg.ep > 1``) and then DDP or FSDP2 over the mesh.

    Every rank must pass the same full model (same seed or the same checkpoint). Returns the
    module to call: a DDP wrapper for "ddp" (``unwrap`` gives the model), the model itself for
    "fsdp". Without an initialised process group the layout must be 1 x 1 and the model comes
    back untouched.
    """
    num_experts = model.config.num_experts
    if world_size() == 1:
        cfg.resolve(1, num_experts)  # still reject e.g. ep=2 on one process
        return model
    pmesh = build_mesh(cfg, num_experts, device_type)
    if pmesh.cfg.ep > 1:
        apply_expert_parallel(model, pmesh.ep.get_group())
    if pmesh.cfg.data_parallel == "fsdp":
        return apply_fsdp(model, pmesh)
    return apply_ddp(model, pmesh)


def shard_batch(x_B: torch.Tensor, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's contiguous block of rows of a global batch (the same on every rank), so
    that the ranks' batches concatenated in rank order are the global batch."""
    r = rank() if rank_ is None else rank_
    n = world_size() if world is None else world
    if x_B.shape[0] % n:
        raise ValueError(f"global batch of {x_B.shape[0]} rows does not split evenly over {n} ranks")
    b = x_B.shape[0] // n
    return x_B[r * b : (r + 1) * b]


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """``--dp/--ep/--fsdp/--param-dtype/--dist-timeout`` for a command such as ``smoe train``."""
    g = parser.add_argument_group("distributed (launch with torchrun --nproc_per_node N -m smoe ...)")
    g.add_argument("--dp", type=int, default=0, help="data-parallel size (default: world size / ep)")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel size; must divide num_experts")
    g.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2 instead of DDP")
    g.add_argument("--param-dtype", choices=["bf16", "fp32"], default=None, help="FSDP2 compute dtype")
    g.add_argument(
        "--dist-timeout", type=float, default=300.0, help="seconds before a stuck collective fails"
    )


def parallel_config_from_args(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(
        dp=args.dp,
        ep=args.ep,
        data_parallel="fsdp" if args.fsdp else "ddp",
        param_dtype=args.param_dtype,
        timeout_s=args.dist_timeout,
    )
