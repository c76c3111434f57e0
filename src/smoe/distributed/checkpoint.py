"""Checkpoints of distributed runs, by gathering the full weights and writing from rank 0.

The result is an ordinary smoe / Hugging Face directory (``smoe.save_model``), so a single
process, ``smoe.load_model`` and transformers all read it, and a distributed run resumes by
``load_model`` on every rank followed by ``parallelize`` (which keeps each rank's slice).

Gathering materialises every full tensor on every rank (DTensor.full_tensor and an
all_gather over ep). That is simple and exact, and right for models that fit one host's
memory; for Mixtral-8x7B-sized training use torch.distributed.checkpoint (see
docs/distributed.md: not built yet).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from smoe.checkpoint.load import save_model
from smoe.distributed.data_parallel import unwrap
from smoe.distributed.expert_parallel import EXPERT_PARAMS, ExpertParallelEngine, moe_layers
from smoe.distributed.launch import barrier, is_main
from smoe.model.transformer import Transformer


def _ep_engines(model: nn.Module) -> dict[int, ExpertParallelEngine]:
    """id(parameter) -> the EP engine whose group holds the other slices of it."""
    return {
        id(getattr(moe, name)): moe.engine
        for moe in moe_layers(model)
        if isinstance(moe.engine, ExpertParallelEngine)
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


def gather_full_params(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient, ``grads=True``) as the full single-process tensor,
    on every rank. A collective: all ranks must call it. A missing gradient is an error."""
    model = unwrap(model)
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
