"""Recording is the router's own top-k choice: independent of batching, also under a capacity limit."""

from __future__ import annotations

import numpy as np
import pytest

import smoe
from smoe.analysis import run_analysis
from smoe.analysis.record import dropless, route_documents
from smoe.model.moe import MoE


def capacity_model() -> smoe.Transformer:
    cfg = smoe.ModelConfig(
        dim=32, n_layers=3, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=300,
        max_seq_len=64, num_experts=4, top_k=2, capacity_factor=1.0,
    )  # fmt: skip
    return smoe.build_model(cfg, seed=3).eval()


def factors(model) -> list:
    return [m.capacity_factor for m in model.modules() if isinstance(m, MoE)]


def test_capacity_factor_does_not_let_batching_change_the_recorded_routing(tmp_path):
    """With capacity 1.0 the batch of one window drops other assignments than the batch of six, so
    without switching capacity off some tokens' routing at later layers changed with batch_size."""
    model = capacity_model()
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, n) for n in (5, 37, 1, 20, 64, 3)]
    ids = {
        bs: np.concatenate([c.expert_ids_NLK for c in route_documents(model, docs, [0, 1, 2], 64, bs)])
        for bs in (1, 6)
    }
    assert len(ids[1]) == 130
    np.testing.assert_array_equal(ids[1], ids[6])
    assert factors(model) == [1.0, 1.0, 1.0]  # restored
    s = run_analysis(model, None, {"d": docs}, tmp_path, batch_size=6, progress=False, plots=False)
    assert s["routing"] == {"choice": "top_k", "dropless": True, "model_capacity_factor": 1.0}
    assert factors(model) == [1.0, 1.0, 1.0]


def test_dropless_restores_the_capacity_factor_on_error():
    model = capacity_model()
    with pytest.raises(RuntimeError, match="boom"):
        with dropless(model):
            assert factors(model) == [None, None, None]
            raise RuntimeError("boom")
    assert factors(model) == [1.0, 1.0, 1.0]


def test_route_documents_refuses_a_non_positive_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        next(route_documents(capacity_model(), [[1, 2, 3]], [0], 8, batch_size=0))
