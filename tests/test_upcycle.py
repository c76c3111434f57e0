"""Sparse upcycling: a dense transformers Mistral and the upcycled Mixtral (loaded by
transformers itself) compute the same logits before any training."""

import pytest
import torch
import transformers

from smoe.checkpoint import load_model
from smoe.cli.main import main


@pytest.mark.parametrize("experts,top_k", [(4, 2), (8, 1)])
def test_upcycled_logits_equal_dense(make_hf, tmp_path, experts, top_k):
    dense_dir, dense_hf = make_hf(num_local_experts=1)
    out = tmp_path / "moe"
    assert (
        main(
            [
                "upcycle",
                "--model",
                str(dense_dir),
                "--experts",
                str(experts),
                "--top-k",
                str(top_k),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    moe_hf = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    assert moe_hf.config.num_local_experts == experts and moe_hf.config.num_experts_per_tok == top_k
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense_hf(tokens).logits
        got_hf = moe_hf(tokens).logits
        got_smoe = load_model(out)(tokens)
    torch.testing.assert_close(got_hf, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_smoe, want, rtol=1e-5, atol=1e-5)
    # The router is fresh and seeded, not zero (all-equal logits would hide routing bugs).
    gate = moe_hf.model.layers[0].mlp.gate.weight
    assert gate.abs().sum() > 0 and gate.shape == (experts, 32)


def test_upcycle_router_seeded(make_hf, tmp_path):
    dense_dir, _ = make_hf(num_local_experts=1)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        main(
            [
                "upcycle",
                "--model",
                str(dense_dir),
                "--experts",
                "4",
                "--out",
                str(tmp_path / name),
                "--seed",
                str(seed),
            ]
        )
    gate = {n: load_model(tmp_path / n).layers[1].feed_forward.gate.weight for n in "abc"}
    assert torch.equal(gate["a"], gate["b"]) and not torch.equal(gate["a"], gate["c"])


def test_upcycle_refuses_moe(make_hf, tmp_path):
    moe_dir, _ = make_hf()
    assert main(["upcycle", "--model", str(moe_dir), "--out", str(tmp_path / "x")]) == 2
