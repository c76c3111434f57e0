"""The accelerator hot paths never read device data on the host.

A host read (``.item()``, ``.tolist()``, ``torch.bincount``'s output length, ``nonzero``) is a
synchronisation on CUDA and an error under CUDA graph capture, which the graphed decode loop
(``smoe.decode_loop``) relies on. CI has no GPU, so these tests run the same code on meta
tensors: they carry shapes but no data, so any operation that needs the data fails there.
torch.bincount was such an operation (on CUDA it reads the largest id back to the host); these
tests failed with it.

Covered: the expert counts, the sort by expert and capacity rule, the triton engine's plan,
the model's prefill and decode with a KV cache and the accelerator gather path, the greedy
decode loop's eager step, and the training loss with its backward.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoe.cache import KVCache
from smoe.config import ModelConfig
from smoe.decode_loop import GreedyDecodeLoop
from smoe.dispatch import tokens_per_expert
from smoe.dispatch.capacity import apply_capacity
from smoe.dispatch.permute import sort_by_expert
from smoe.model.transformer import Transformer
from smoe.train.config import TrainConfig
from smoe.train.data import Batch
from smoe.train.step import forward_loss

META = torch.device("meta")


@settings(max_examples=50, deadline=None)
@given(
    E=st.integers(1, 9),
    T=st.integers(0, 40),
    K=st.integers(1, 3),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tokens_per_expert_equals_bincount(E, T, K, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.randint(0, E + 1, (T, K), generator=g)  # id E: a dropped assignment
    w_TK = torch.randint(0, 2, (T, K), generator=g) if weighted else None
    want = torch.bincount(ids_TK.reshape(-1), None if w_TK is None else w_TK.reshape(-1), minlength=E + 1)[:E]
    got = tokens_per_expert(ids_TK, E, w_TK)
    assert got.dtype == torch.int64 and got.shape == (E,)
    assert torch.equal(got, want.long())


def test_tokens_per_expert_example():
    assert tokens_per_expert(torch.tensor([[2, 0], [0, 3]]), 3).tolist() == [2, 0, 1]


def test_meta_tensors_reject_host_reads():
    """The premise of this file: a data-dependent op fails on meta tensors."""
    ids = torch.zeros(8, dtype=torch.long, device=META)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.bincount(ids, minlength=4)
    with pytest.raises((NotImplementedError, RuntimeError)):
        ids.sum().item()


def test_routing_bookkeeping_has_no_host_read():
    ids_TK = torch.zeros(16, 2, dtype=torch.long, device=META)
    p = sort_by_expert(ids_TK, 8)
    assert p.counts_E.shape == (8,) and p.counts_E.device == META
    capped_TK, dropped_TK = apply_capacity(ids_TK, 8, 1.0)
    assert capped_TK.shape == dropped_TK.shape == (16, 2)
    assert tokens_per_expert(ids_TK, 8).shape == (8,)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_triton_plan_has_no_host_read():
    from smoe.dispatch.triton_engine import make_plan

    for T in (1, 16, 4096):
        plan = make_plan(torch.zeros(T, 2, dtype=torch.long, device=META), 8)
        assert plan.tile_expert.device == META and plan.row_end_E.shape == (8,)


def meta_model(**overrides) -> Transformer:
    # "gather" on a non-CPU device is the accelerator path: index_select of the chosen experts.
    cfg = ModelConfig.preset("tiny", dispatch="gather", **overrides)
    with META:
        return Transformer(cfg)


@pytest.mark.parametrize("window", [None, 8], ids=["full", "rolling_window"])
def test_prefill_and_decode_have_no_host_read(window):
    model = meta_model(sliding_window=window).eval()
    B, T = 2, 12
    cache = KVCache.for_model(model, B, 64)
    tok_BT = torch.zeros(B, T, dtype=torch.long, device=META)
    pos_BT = torch.arange(T, device=META).expand(B, T)
    with torch.inference_mode():
        assert model(tok_BT, pos_BT, cache, logits_to_keep=1).shape == (B, 1, model.config.vocab_size)
        logits = model(tok_BT[:, :1], pos_BT[:, :1] + T, cache, return_router=True)
    assert logits[0].shape == (B, 1, model.config.vocab_size)
    assert all(r.tokens_per_expert().device == META for r in logits[1])


def test_greedy_decode_loop_step_has_no_host_read():
    model = meta_model().eval()
    cache = KVCache.for_model(model, 3, 32)
    loop = GreedyDecodeLoop(model, cache, max_steps=4, cuda_graph=False)
    loop.start(torch.zeros(3, dtype=torch.long, device=META), torch.full((3,), 5, device=META))
    assert loop.run(4).shape == (3, 4)


def test_training_loss_and_backward_have_no_host_read():
    model = meta_model().train()
    tok_BT = torch.zeros(2, 16, dtype=torch.long, device=META)
    parts = forward_loss(model, Batch(tok_BT, tok_BT, None), TrainConfig())
    parts.total.backward()
    assert parts.tokens_per_expert_LE.shape == (model.config.n_layers, model.config.num_experts)
    assert model.layers[0].feed_forward.w1.grad is not None
