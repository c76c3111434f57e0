"""Gradient accumulation over padded micro-batches equals one big batch's gradient.

The reference is a plain autograd pass over the concatenated batch: cross-entropy and z-loss
are means over the unmasked tokens of the whole batch, so micro-batches with different numbers
of real tokens must be weighted by those numbers, not averaged as equals.
"""

import torch

from smoe.config import ModelConfig
from smoe.model.transformer import build_model
from smoe.train.config import TrainConfig
from smoe.train.data import Batch
from smoe.train.step import eval_loss, forward_loss, train_step


class _GradRecorder:
    """An optimizer that only records the gradients it was asked to step with."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class _ConstantLR:
    def get_last_lr(self):
        return [1.0]

    def step(self):
        pass


def _model():
    cfg = ModelConfig.preset(
        "tiny", vocab_size=64, n_layers=1, dim=32, head_dim=8, hidden_dim=48, num_experts=4
    )
    return build_model(cfg, seed=0)


def _padded_batches(T=8):
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 64, (3, T + 1), generator=gen)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 2:] = 0  # second and third sequences: 2 and 5 real tokens (padding at the end)
    mask[2, 5:] = 0
    big = Batch(tok[:, :-1], tok[:, 1:], mask)
    micro = [Batch(big.inputs_BT[:1], big.targets_BT[:1], mask[:1]),
             Batch(big.inputs_BT[1:], big.targets_BT[1:], mask[1:])]  # fmt: skip
    return big, micro


def test_accumulated_gradient_equals_big_batch_with_padding():
    # aux_loss_coef 0: the Switch balance loss is a product of batch means, which no split of
    # a batch reproduces; the z-loss is a token mean and must be reproduced exactly.
    cfg = TrainConfig(grad_accum=2, grad_clip=0.0, aux_loss_coef=0.0, z_loss_coef=0.1)
    big, micro = _padded_batches()
    model = _model()
    parts = forward_loss(model, big, cfg)
    parts.total.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    opt = _GradRecorder(model.parameters())
    out = train_step(model, opt, _ConstantLR(), micro, cfg)
    for g, w in zip(opt.grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert abs(out["loss"] - parts.ce.item()) < 1e-5 * parts.ce.item()
    assert abs(out["z_loss"] - parts.z.item()) < 1e-5 * parts.z.item()


def test_eval_loss_ignores_padding():
    cfg = TrainConfig()
    big, micro = _padded_batches()
    model = _model()
    want = forward_loss(model, big, cfg).ce.item()  # mean over the 15 real tokens
    assert abs(eval_loss(model, micro, cfg) - want) < 1e-5 * want
