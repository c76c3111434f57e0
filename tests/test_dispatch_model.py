"""Engines inside the model: logits equal whichever engine runs, the choice flows from config
and load_model, and the capacity factor drops exactly what the Switch/GShard rule says.

Legend: B batch, T tokens, E experts, K chosen experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch

import smoe
from smoe.dispatch import ENGINES
from smoe.dispatch.capacity import apply_capacity, expert_capacity

CPU_ENGINE_NAMES = ["reference", "sorted", "gather", "auto"]


def tiny_cfg(**overrides):
    return smoe.ModelConfig.preset("tiny", n_layers=2, vocab_size=101, **overrides)


@pytest.fixture(scope="module", params=[None, 0.5], ids=["dropless", "capacity0.5"])
def model_run(request):
    """A tiny model (built once), a function running it with one engine, and the reference run."""
    model = smoe.build_model(tiny_cfg(capacity_factor=request.param), seed=0)
    tokens_BT = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))

    def run(engine: str):
        for layer in model.layers:
            layer.feed_forward.engine = ENGINES[engine]
        model.zero_grad()
        with torch.enable_grad():  # another test may have switched gradients off process-wide
            logits_BTV, routings = model(tokens_BT, return_router=True)
            logits_BTV.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "layers.0.feed_forward" in n}
        return logits_BTV.detach(), routings, grads

    return run, run("reference")


@pytest.mark.parametrize("engine", CPU_ENGINE_NAMES[1:])
def test_model_logits_do_not_depend_on_engine(model_run, engine):
    run, (want, want_r, want_g) = model_run
    got, got_r, got_g = run(engine)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert set(got_g) == {f"layers.0.feed_forward.{n}" for n in ("gate.weight", "w1", "w2", "w3")}
    for name in want_g:
        torch.testing.assert_close(
            got_g[name], want_g[name], atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )
    for a, b in zip(got_r, want_r):
        torch.testing.assert_close(a.dropped_fraction(), b.dropped_fraction())


def test_model_bf16_engines_agree():
    tokens_BT = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(1))
    out = {}
    for engine in CPU_ENGINE_NAMES:
        with torch.no_grad():
            out[engine] = smoe.build_model(tiny_cfg(dispatch=engine), dtype=torch.bfloat16, seed=0)(
                tokens_BT
            ).float()
    scale = out["reference"].abs().max().item()
    for engine in CPU_ENGINE_NAMES[1:]:
        assert (out[engine] - out["reference"]).abs().max().item() <= 2e-2 * scale, engine


def test_load_model_dispatch_override(make_hf):
    directory, _ = make_hf()
    model = smoe.load_model(directory, dispatch="sorted")
    assert model.layers[0].feed_forward.engine is ENGINES["sorted"]
    assert smoe.load_model(directory).layers[0].feed_forward.engine is ENGINES["auto"]
    with pytest.raises(Exception, match="dispatch"):
        smoe.load_model(directory, dispatch="nope")


def test_capacity_drops_by_the_switch_rule():
    # Hand-worked in dispatch/capacity.py: choice-major priority, token order within a choice.
    ids_TK = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    assert expert_capacity(0.5, 4, 2, 2) == 2
    assert expert_capacity(1.1, 100, 2, 4) == 55  # 55.000000000000007 in floats
    kept_ids, dropped_TK = apply_capacity(ids_TK, num_experts=2, capacity_factor=0.5)
    want = torch.tensor([[False, False], [False, True], [True, True], [False, True]])
    assert torch.equal(dropped_TK, want)
    assert torch.equal(kept_ids, ids_TK.masked_fill(want, 2))
    # A larger capacity keeps everything; capacity rounds up: ceil(0.6 * 4 * 2 / 2) = 3.
    assert not apply_capacity(ids_TK, 2, 1.0)[1].any()
    assert expert_capacity(0.6, 4, 2, 2) == 3
    assert (
        apply_capacity(ids_TK, 2, 0.6)[1].sum().item() == 2
    )  # the 4th for each expert: t3's and t2's 2nd choices


def test_capacity_matches_a_plain_python_count():
    """The vectorised rule equals a direct loop over assignments in priority order."""
    gen = torch.Generator().manual_seed(3)
    T, E, K, cf = 37, 5, 2, 0.8
    ids_TK = torch.topk(torch.randn(T, E, generator=gen), K, dim=-1).indices
    capacity = math.ceil(cf * T * K / E)
    taken, want = [0] * E, torch.zeros(T, K, dtype=torch.bool)
    for k in range(K):
        for t in range(T):
            e = int(ids_TK[t, k])
            want[t, k] = taken[e] >= capacity
            taken[e] += 1
    assert torch.equal(apply_capacity(ids_TK, E, cf)[1], want)


def test_dropped_tokens_pass_through_the_residual():
    """A token dropped by all its experts gets no expert output (and no renormalisation)."""
    cfg = tiny_cfg(capacity_factor=0.25, dispatch="sorted")
    moe = smoe.build_model(cfg, seed=0).layers[0].feed_forward
    x_BTD = torch.randn(1, 16, cfg.dim, generator=torch.Generator().manual_seed(2))
    y_BTD, routing = moe(x_BTD)
    dropped_T = routing.dropped_TK.all(dim=1)
    assert dropped_T.any() and not dropped_T.all()
    assert torch.all(y_BTD[0, dropped_T] == 0)
    # Partly dropped tokens keep exactly their kept choices, weights not renormalised.
    ids = routing.expert_ids_TK.masked_fill(routing.dropped_TK, cfg.num_experts)
    want = ENGINES["reference"](x_BTD[0], ids, routing.weights_TK, moe.w1, moe.w2, moe.w3)
    torch.testing.assert_close(y_BTD[0], want)
    frac = routing.dropped_fraction()
    assert frac.device == x_BTD.device and frac.item() == routing.dropped_TK.float().mean().item() > 0
    assert (
        smoe.build_model(tiny_cfg(), seed=0).layers[0].feed_forward(x_BTD)[1].dropped_fraction().item() == 0
    )
