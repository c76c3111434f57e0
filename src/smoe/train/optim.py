"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning rate.

The schedule is a pure function of the step (``lr_factor``), wrapped in a LambdaLR so that its
state is checkpointed with the optimizer like any other torch scheduler.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smoe.train.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based): linear warmup from
    1/warmup to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on 2-D+ weights (projections, experts, router, embeddings); none on norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # torch's fused AdamW (2.13, CPU) updates a parameter that is a strided slice of a larger
    # tensor wrongly: a column block of a fused matrix got steps 3-4x too large. The CPU decode
    # layout makes q/k/v and each expert's w1/w3 such slices (``smoe.decode_layout``), so a model
    # that generated before it trains would train wrong. foreach steps them correctly.
    fused = cfg.fused_adamw and all(p.is_contiguous() for p in decay + no_decay)
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
