"""Checkpoints of distributed runs, by gathering full tensors and writing from rank 0.

Weights: ``single_process_model`` / ``save_distributed`` give an ordinary smoe / Hugging
Face model (``smoe.save_model``), so a single process, ``smoe.load_model`` and transformers
all read it.

Optimizer state (for exact resume): ``full_optimizer_state`` gathers every state tensor the
same way as its parameter, into the ``optimizer.state_dict()`` a single process would hold
(indices in ``param_groups`` order, which ``parallelize`` keeps: EP and FSDP2 replace each
Parameter under its own name, DDP wraps without reordering). ``load_optimizer_state`` is the
inverse: every rank reads the full state and keeps its own piece, cut exactly as its
parameter was cut::

    dense, DDP          full tensor, identical on every rank  -> copied
    FSDP2 DTensor       Shard(0) over its mesh                -> full_tensor() / distribute_tensor
    expert under EP     rows ep_rank*L .. ep_rank*L+L-1       -> all_gather over ep / slice
    expert, EP + FSDP2  both: a DTensor over dp of the ep slice

So the checkpoint does not depend on the layout it was written under. Gathering
materialises every full tensor on every rank (DTensor.full_tensor and an all_gather over
ep): simple and exact, and right for models that fit one host's memory; Mixtral-8x7B-sized
training needs torch.distributed.checkpoint with per-rank files instead (not built, see
docs/distributed.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from smoe.checkpoint.load import save_model
from smoe.distributed.data_parallel import unwrap
from smoe.distributed.expert_parallel import EXPERT_PARAMS, ExpertParallelEngine, ep_engine, moe_layers
from smoe.distributed.launch import barrier, is_main
from smoe.model.transformer import Transformer


def _sharded(model: nn.Module) -> nn.Module:
    """The model inside any wrapper, with FSDP2's sharded parameters registered again.

    Why: FSDP2 keeps the root module's parameters unsharded after a forward that has no
    backward (validation), registered as plain tensors; the optimizer holds the sharded
    DTensors, so names and identities would no longer match. ``reshard`` is a no-op otherwise.
    """
    model = unwrap(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model


def _ep_engines(model: nn.Module) -> dict[int, ExpertParallelEngine]:
    """id(parameter) -> the EP engine whose group holds the other slices of it."""
    return {
        id(getattr(moe, name)): engine
        for moe in moe_layers(model)
        if (engine := ep_engine(moe)) is not None
        for name in EXPERT_PARAMS
    }


def _full(t: torch.Tensor, engine: ExpertParallelEngine | None) -> torch.Tensor:
    if isinstance(t, DTensor):
        t = t.full_tensor()  # FSDP shards -> this rank's whole (ep-local) tensor
    t = t.detach()
    if engine is not None:
        parts = [torch.empty_like(t) for _ in range(engine.ep_size)]
        dist.all_gather(parts, t.contiguous(), group=engine.group)
        t = torch.cat(parts, dim=0)  # ep rank r holds experts r*L .. r*L+L-1
    return t


def _local(full: torch.Tensor, like: torch.Tensor, engine: ExpertParallelEngine | None) -> torch.Tensor:
    """This rank's piece of ``full``, cut as the parameter ``like`` was (the inverse of _full)."""
    if engine is not None:
        lo = engine.ep_rank * engine.num_local
        full = full[lo : lo + engine.num_local]
    if isinstance(like, DTensor):
        # src_data_rank=None: every rank holds the same full tensor and cuts its own chunk, no
        # communication (the same torch.chunk split FSDP2 used for the parameter).
        piece = distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        if piece.to_local().shape != like.to_local().shape:
            raise RuntimeError(
                f"optimizer state piece {tuple(piece.to_local().shape)} does not match the parameter's "
                f"shard {tuple(like.to_local().shape)}"
            )
        return piece
    return full.to(like.device).clone()


def gather_full_params(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient, ``grads=True``) as the full single-process tensor,
    on every rank. A collective: all ranks must call it. A missing gradient is an error."""
    model = _sharded(model)
    ep = _ep_engines(model)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if t is None:
            raise RuntimeError(f"parameter {name!r} has no gradient on rank {dist.get_rank()}")
        out[name] = _full(t, ep.get(id(p))).cpu().clone()  # a copy: later in-place clipping must not reach it
    return out


def single_process_model(model: nn.Module) -> Transformer:
    """A plain single-process Transformer holding the full weights of a distributed one (collective)."""
    inner = unwrap(model)
    full = gather_full_params(inner)
    with torch.device("meta"):
        plain = Transformer(inner.config)
    state = dict(full)
    if inner.config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    plain.load_state_dict(state, strict=True, assign=True)
    if inner.config.tie_embeddings:
        plain.output.weight = plain.tok_embeddings.weight
    return plain


def save_distributed(model: nn.Module, path: str | Path, fmt: str = "hf") -> Path:
    """Gather the full weights and write them from rank 0 with ``smoe.save_model``; every rank
    must call it, and all return once the files are written."""
    plain = single_process_model(model)
    if is_main():
        save_model(plain, path, fmt=fmt)
    barrier()
    return Path(path)


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name behind each optimizer state index (``param_groups`` order)."""
    names = {id(p): n for n, p in _sharded(model).named_parameters()}
    try:
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not in the model") from None


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as one process training the full model would hold it: every
    per-element state tensor (AdamW's exp_avg, exp_avg_sq) gathered to its full shape, on
    CPU; scalars (``step``) as they are. A collective: all ranks must call it."""
    ep = _ep_engines(_sharded(model))
    local = optimizer.state_dict()  # indices in param_groups order, the same on every rank
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(params):
        if i not in local["state"]:
            continue  # no step taken for it yet: the same on every rank (every rank gets every grad)
        state[i] = {
            k: _full(v, ep.get(id(p))).cpu().clone() if torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in local["state"][i].items()
        }
    return {"state": state, "param_groups": local["param_groups"]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
    """Load a full (single-process layout) optimizer state: each rank keeps the piece that
    matches its parameter piece. No communication; every rank must pass the same ``full``."""
    ep = _ep_engines(_sharded(model))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = optimizer_param_names(model, optimizer)
    state: dict[int, dict[str, Any]] = {}
    for i, entry in full["state"].items():
        if not 0 <= i < len(params):
            raise ValueError(f"optimizer state for index {i}, but the optimizer has {len(params)} parameters")
        p, engine = params[i], ep.get(id(params[i]))
        global_shape = tuple(p.shape) if engine is None else (engine.num_experts, *p.shape[1:])
        state[i] = {}
        for k, v in entry.items():
            if torch.is_tensor(v) and v.dim() > 0:
                if tuple(v.shape) != global_shape:
                    raise ValueError(
                        f"optimizer state {k!r} of {names[i]!r} has shape {tuple(v.shape)}, "
                        f"the parameter's full shape is {global_shape}"
                    )
                v = _local(v, p, engine)
            state[i][k] = v
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank. Collective."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
