"""One training step, kept free of data loading and bookkeeping so that parallel wrappers
(DDP, FSDP, expert parallel) can be applied to the model from outside and reuse it.

Legend: B batch, T tokens per sequence, V vocabulary, L MoE layers, E experts.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from smoe.dispatch import tokens_per_expert
from smoe.model.transformer import Transformer
from smoe.train.config import TrainConfig
from smoe.train.data import Batch
from smoe.train.losses import load_balancing_loss, router_z_loss
from smoe.train.precision import wrap_engines_for_autocast


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the optimizer step was skipped."""


def unwrap(model: nn.Module) -> Transformer:
    """The smoe Transformer inside a DDP-style wrapper (``.module``) or the model itself."""
    return getattr(model, "module", model)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for matmuls when ``cfg.dtype == "bf16"``; weights stay float32 (master copy)."""
    if cfg.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class LossParts:
    total: torch.Tensor  # what backward sees: ce + aux_coef * balance + z_coef * z
    ce: torch.Tensor
    balance: torch.Tensor
    z: torch.Tensor
    tokens_per_expert_LE: torch.Tensor | None  # (L, E) assignment counts, unmasked tokens only


def forward_loss(model: nn.Module, batch: Batch, cfg: TrainConfig) -> LossParts:
    """Cross-entropy plus the router losses for one (micro-)batch; padding (mask 0) excluded."""
    inner = unwrap(model)
    if cfg.dtype == "bf16":
        # Autocast leaves the engines' index and grouped ops mixing float32 and bf16; the loop
        # wraps the engines once, and this does it for callers of the library that did not
        # (idempotent; outside an expert-parallel engine when that is in place).
        wrap_engines_for_autocast(inner)
    targets_BT = batch.targets_BT
    if batch.mask_BT is not None:
        targets_BT = targets_BT.masked_fill(batch.mask_BT == 0, -100)
    with autocast(cfg, batch.inputs_BT.device):  # head and cross-entropy fused in the model
        ce, routings = model(batch.inputs_BT, return_router=True, targets_BT=targets_BT)
    zero = ce.new_zeros(())
    if not routings:  # dense model
        return LossParts(ce, ce, zero, zero, None)
    logits = [r.logits_TE for r in routings]
    balance = load_balancing_loss(logits, inner.config.top_k, batch.mask_BT, per_layer=cfg.aux_loss_per_layer)
    z = router_z_loss(logits, batch.mask_BT)
    total = ce + cfg.aux_loss_coef * balance + cfg.z_loss_coef * z
    with torch.no_grad():
        E = inner.config.num_experts
        w_TK = (
            None
            if batch.mask_BT is None
            else batch.mask_BT.reshape(-1, 1).expand_as(routings[0].expert_ids_TK)
        )
        counts = [tokens_per_expert(r.expert_ids_TK, E, w_TK) for r in routings]
    return LossParts(total, ce.detach(), balance.detach(), z.detach(), torch.stack(counts).float())


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm; returns the norm before clipping.

    Under torch.distributed the norm must count every rank's pieces (FSDP shards, expert-
    parallel experts), which ``smoe.distributed.clip_grad_norm_`` does; a single process uses
    torch's fused clip.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from smoe.distributed import clip_grad_norm_

        return clip_grad_norm_(model, max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[Batch],
    cfg: TrainConfig,
) -> dict[str, float | list[float]]:
    """Forward/backward over the micro-batches (gradient accumulation), clip, step.

    Raises NonFiniteLossError *before* the optimizer step if the loss or the gradient norm is
    NaN/inf, so the weights (and any checkpoint written later) are never poisoned. A wrapper
    with ``no_sync`` (DDP) only all-reduces on the last micro-batch.
    """
    model.train()
    n = len(micro_batches)
    share = token_shares(micro_batches)

    def weigh(x: torch.Tensor, i: int) -> torch.Tensor:  # micro-batch i's part of the step's mean
        return x / n if share is None else x * share[i]

    ce = balance = z = 0.0
    counts_LE = None
    for i, mb in enumerate(micro_batches):
        last = i == n - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            parts = forward_loss(model, mb, cfg)
            weigh(parts.total, i).backward()
        ce, balance, z = ce + weigh(parts.ce, i), balance + weigh(parts.balance, i), z + weigh(parts.z, i)
        if parts.tokens_per_expert_LE is not None:
            counts_LE = (
                parts.tokens_per_expert_LE if counts_LE is None else counts_LE + parts.tokens_per_expert_LE
            )
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = clip_grad_norm(model, max_norm)
    scalars = torch.stack([ce, balance, z, grad_norm.float()])
    if counts_LE is not None:  # what the host needs, copied at once: one sync per step
        scalars = torch.cat([scalars, imbalance(counts_LE), counts_LE.reshape(-1)])
    host = scalars.tolist()
    values = host[:4]
    if not all(math.isfinite(v) for v in values):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"non-finite training values: loss={values[0]}, balance={values[1]}, z={values[2]}, grad_norm={values[3]}"
        )
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    out: dict[str, float | list[float]] = {"loss": values[0], "lr": lr, "grad_norm": values[3]}
    if counts_LE is not None:
        L, E = counts_LE.shape
        out.update(balance_loss=values[1], z_loss=values[2], imbalance=host[4 : 4 + L])
        # The counts themselves (L lists of E), so that a data-parallel loop can sum them over
        # ranks before taking the imbalance.
        out["tokens_per_expert"] = [host[4 + L + i * E : 4 + L + (i + 1) * E] for i in range(L)]
    return out


def token_shares(micro_batches: list[Batch]) -> torch.Tensor | None:
    """Each micro-batch's fraction of the step's real tokens, or None when none is padded.

    The losses are means over a micro-batch's unmasked tokens, so with padding an equal 1/n
    weight would count a token of a short micro-batch more than one of a full one: micro-batches
    of 8 and 2 real tokens must weigh 0.8 and 0.2 to give the gradient of the 10-token batch.
    A tensor on the batches' device, so that no host sync is needed. (Under DDP the gradients
    are still averaged over ranks as equals.)
    """
    if all(mb.mask_BT is None for mb in micro_batches):
        return None  # equal token counts: keep the plain 1/n (bitwise the unpadded path)
    counts_N = torch.stack(
        [
            mb.mask_BT.sum().float()
            if mb.mask_BT is not None
            else torch.tensor(float(mb.inputs_BT.numel()), device=mb.inputs_BT.device)
            for mb in micro_batches
        ]
    )
    return counts_N / counts_N.sum()


def imbalance(counts_LE: torch.Tensor) -> torch.Tensor:
    """Per MoE layer, the busiest expert's token count over the mean count (1 = balanced)."""
    return counts_LE.max(dim=1).values / counts_LE.mean(dim=1)


@torch.no_grad()
def eval_loss(model: nn.Module, batches: list[Batch], cfg: TrainConfig) -> float:
    """Mean cross-entropy (nats/token) over fixed validation batches, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        targets_BT = b.targets_BT if b.mask_BT is None else b.targets_BT.masked_fill(b.mask_BT == 0, -100)
        with autocast(cfg, b.inputs_BT.device):
            ce = model(b.inputs_BT, targets_BT=targets_BT)  # the mean over the batch's real tokens
        total, count = total + ce.item() * b.num_tokens, count + b.num_tokens
    model.train(was_training)
    return total / count
