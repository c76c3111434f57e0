"""Warmup + cosine schedule (closed form) and AdamW parameter groups."""

import math

import pytest
import torch

from smoe.config import ModelConfig
from smoe.model.transformer import build_model
from smoe.train.config import TrainConfig
from smoe.train.optim import build_optimizer, build_scheduler, lr_factor


def test_schedule_closed_form():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(500, cfg) == pytest.approx(0.1)


def test_scheduler_drives_optimizer_lr():
    cfg = TrainConfig(steps=20, warmup_steps=4, lr=2e-3)
    model = build_model(ModelConfig.preset("tiny", vocab_size=64, n_layers=1))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2e-3 * lr_factor(s, cfg) for s in range(20)])


def test_no_weight_decay_on_norms():
    model = build_model(ModelConfig.preset("tiny", vocab_size=64, n_layers=1))
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 3
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    assert isinstance(decay["params"][0], torch.nn.Parameter)


def test_fused_adamw_default_equals_foreach():
    """The default (torch's fused kernel) takes the same steps as the per-tensor reference."""
    cfg = TrainConfig(steps=10, warmup_steps=2, lr=3e-3)
    assert cfg.fused_adamw
    models = [build_model(ModelConfig.preset("tiny", vocab_size=64, n_layers=1), seed=0) for _ in range(2)]
    opts = [
        build_optimizer(models[0], cfg),
        build_optimizer(models[1], TrainConfig(**{**vars(cfg), "fused_adamw": False})),
    ]
    assert opts[0].defaults["fused"] and opts[1].defaults["foreach"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, opt in zip(models, opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(models[0].output.weight, build_model(models[0].config, seed=0).output.weight)
