"""Sparse upcycling: a dense transformers Mistral and the upcycled Mixtral (loaded by
transformers itself) compute the same logits before any training."""

import pytest
import torch
import transformers

from smoe.checkpoint import load_model
from smoe.cli.main import main


def upcycle(dense_dir, out, *flags: str) -> int:
    """``smoe upcycle --model DENSE --out OUT FLAGS...``; returns the exit code."""
    return main(["upcycle", "--model", str(dense_dir), "--out", str(out), *flags])


@pytest.mark.parametrize("experts,top_k", [(4, 2), (8, 1)])
def test_upcycled_logits_equal_dense(make_hf, tmp_path, experts, top_k):
    dense_dir, dense_hf = make_hf(num_local_experts=1)
    out = tmp_path / "moe"
    assert upcycle(dense_dir, out, "--experts", str(experts), "--top-k", str(top_k)) == 0
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
        upcycle(dense_dir, tmp_path / name, "--experts", "4", "--seed", str(seed))
    gate = {n: load_model(tmp_path / n).layers[1].feed_forward.gate.weight for n in "abc"}
    assert torch.equal(gate["a"], gate["b"]) and not torch.equal(gate["a"], gate["c"])


def test_upcycle_refuses_moe(make_hf, tmp_path):
    moe_dir, _ = make_hf()
    assert upcycle(moe_dir, tmp_path / "x") == 2


@pytest.mark.slow
def test_train_from_upcycled_init(make_hf, tmp_path):
    """`smoe train --init` starts from the upcycled weights: the first loss equals the dense
    model's loss on the same batch (the experts are copies), and training proceeds."""
    import json

    from smoe.train.data import TrainSampler
    from test_train_loop import make_corpus

    dense_dir, dense_hf = make_hf(num_local_experts=1)
    upcycle(dense_dir, tmp_path / "moe", "--experts", "4", "--top-k", "2")
    corpus = make_corpus(tmp_path / "corpus")
    args = ["train", "--init", str(tmp_path / "moe"), "--data", str(corpus), "--out", str(tmp_path / "run")]
    assert (
        main(
            args
            + [
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--warmup-steps",
                "1",
                "--log-every",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    b = TrainSampler(corpus, 16, 2, seed=0).batch(0)
    with torch.no_grad():
        logits = dense_hf(b.inputs_BT).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), b.targets_BT.reshape(-1)).item()
    assert first["step"] == 1 and first["loss"] == pytest.approx(want, rel=1e-5)


def test_upcycle_refuses_one_expert(make_hf, tmp_path, capsys):
    dense_dir, _ = make_hf(num_local_experts=1)
    assert upcycle(dense_dir, tmp_path / "x", "--experts", "1", "--top-k", "1") == 2
    assert "experts must be an integer >= 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_upcycle_allocates_the_experts_in_the_dense_dtype(make_hf):
    """A bfloat16 dense model is upcycled without a float32 copy of the experts: for
    Mistral-7B into 8 experts that copy alone is 187 GB, twice the bfloat16 result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from smoe.train.upcycle import upcycle as upcycle_model

    class BigFloat32(TorchDispatchMode):
        def __init__(self, min_numel):
            super().__init__()
            self.min_numel, self.seen = min_numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (
                    isinstance(t, torch.Tensor)
                    and not t.is_meta
                    and t.dtype == torch.float32
                    and t.numel() >= self.min_numel
                ):
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    dense_dir, _ = make_hf(num_local_experts=1)
    dense = load_model(dense_dir, dtype=torch.bfloat16)
    with BigFloat32(min_numel=4 * 48 * 32) as mode:  # one stacked w1_EFD
        moe = upcycle_model(dense, 4, 2)
    assert mode.seen == [], mode.seen
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("layout,tied", [("consolidated", False), ("hf", True)])
def test_upcycled_logits_equal_dense_layouts(make_hf, tmp_path, layout, tied):
    """A consolidated (params.json) dense input and tied embeddings: transformers' Mixtral on
    the upcycled checkpoint computes the dense transformers model's logits."""
    from smoe.checkpoint import save_model

    dense_dir, dense_hf = make_hf(num_local_experts=1, tie_word_embeddings=tied)
    if layout == "consolidated":
        save_model(load_model(dense_dir), tmp_path / "cons", fmt="consolidated")
        dense_dir = tmp_path / "cons"
    assert upcycle(dense_dir, tmp_path / "moe", "--experts", "4", "--top-k", "2") == 0
    moe_hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "moe").eval()
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe_hf(tokens).logits, dense_hf(tokens).logits, rtol=1e-5, atol=1e-5)
