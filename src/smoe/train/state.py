"""What a run's checkpoint holds, for one process or many, and how a resume puts it back.

A checkpoint (written atomically by ``checkpoint.py``) holds the state one process training
the full model would hold, whatever layout wrote it, plus what an exact resume needs::

    model              full weights (gathered under torchrun): the single-process state_dict
    optimizer          AdamW state with full tensors, in the single-process optimizer's indices
    optimizer_params   the parameter name behind each optimizer index (checked on resume)
    scheduler, data    LR schedule position; data-loader identity (its position is the step)
    rng                this process's RNG states (rank 0's under torchrun)
    rng_per_rank       torchrun: every rank's RNG states, in rank order
    world_size, layout torchrun: the number of processes and the (dp, ep, ddp/fsdp) layout

Resuming needs the number of processes that wrote it: rank r of N takes micro-batch
``m * N + r``, so N is part of the global batch, and each rank restores its own RNG states.
The layout (dp x ep, ddp or fsdp) may change, because every tensor is stored whole; then the
resumed run matches the uninterrupted one to float32 round-off instead of bit for bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoe import distributed as sd
from smoe.config import ModelConfig
from smoe.train import checkpoint as ckpt
from smoe.train.config import TrainConfig
from smoe.train.data import TrainSampler


def describe(world: int, layout: dict[str, Any] | None) -> str:
    """``1 process`` or ``2 processes (dp=1 x ep=2, fsdp)``, for messages."""
    if world == 1:
        return "1 process"
    if not layout:
        return f"{world} processes"
    return f"{world} processes (dp={layout['dp']} x ep={layout['ep']}, {layout['data_parallel']})"


def capture(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: TrainSampler,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    world: int,
    layout: sd.ParallelConfig | None = None,
) -> dict[str, Any]:
    """The train state to checkpoint. With ``world > 1`` a collective: every rank must call
    it (the tensors are gathered), and rank 0 writes the result."""
    state: dict[str, Any] = {
        "scheduler": scheduler.state_dict(),
        "data": sampler.state_dict(),
        "model_config": model_cfg.to_dict(),
        "train_config": cfg.to_dict(),
        "optimizer_params": sd.optimizer_param_names(model, optimizer),
    }
    if world == 1:
        return state | {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": ckpt.rng_state(),
        }
    rngs = sd.all_gather_objects(ckpt.rng_state())
    return state | {
        "model": sd.single_process_model(model).state_dict(),
        "optimizer": sd.full_optimizer_state(model, optimizer),
        "rng": rngs[0],
        "rng_per_rank": rngs,
        "world_size": world,
        "layout": dataclasses.asdict(layout) if layout is not None else None,
    }


def check_resumable(state: dict[str, Any], path: Path, world: int, layout: dict[str, Any] | None) -> None:
    """Refuse, naming both sides, a checkpoint this run cannot continue exactly."""
    saved_world = state.get("world_size", 1)
    saved = describe(saved_world, state.get("layout"))
    if state.get("optimizer") is None:
        raise ValueError(
            f"{path}: written by {saved} without optimizer state (an older distributed checkpoint), "
            "so it cannot be resumed exactly; start a new run from its weights (smoe export, then --init)"
        )
    if saved_world != world:
        how = "without torchrun" if saved_world == 1 else f"under torchrun --nproc_per_node {saved_world}"
        raise ValueError(
            f"{path}: saved by {saved}, but this run has {describe(world, layout)}. Rank r of N takes "
            f"micro-batch m * N + r, so the number of processes is part of the global batch: resume {how}, "
            "or start a new run from its weights (smoe export, then --init)"
        )


def restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: TrainSampler,
    state: dict[str, Any],
    path: Path,
    world: int,
    rank: int,
) -> int:
    """Put back the optimizer, schedule and RNG states of a checkpoint that passed
    ``check_resumable``; returns its step. The weights were loaded into the full model before
    ``parallelize`` (each rank then kept its piece); this rank's optimizer state is cut the same
    way (no communication)."""
    names = state.get("optimizer_params")
    if names is not None and names != sd.optimizer_param_names(model, optimizer):
        raise ValueError(f"{path}: its optimizer state is for other parameters than this model's")
    if world == 1:
        optimizer.load_state_dict(state["optimizer"])
    else:
        sd.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.check_state(state["data"], str(path))
    ckpt.set_rng_state(state["rng"] if world == 1 else state["rng_per_rank"][rank])
    return state["step"]
