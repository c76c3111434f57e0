"""A Mistral consolidated checkpoint stored in bfloat16 (as Mistral releases are) loads in
bfloat16 by default, as the Hugging Face copy (config.json dtype bfloat16) does."""

import torch

import smoe
from smoe.config import ModelConfig
from smoe.model import build_model


def _tiny():
    return ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=97,
                       max_seq_len=64, num_experts=4, top_k=2)  # fmt: skip


def test_consolidated_bf16_loads_as_stored(tmp_path):
    model = build_model(_tiny(), seed=0, dtype=torch.bfloat16)
    smoe.save_model(model, tmp_path / "cons", fmt="consolidated")
    smoe.save_model(model, tmp_path / "hf", fmt="hf")
    cons, hf = smoe.load_model(tmp_path / "cons"), smoe.load_model(tmp_path / "hf")
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in cons.parameters()} == {torch.bfloat16}
    assert smoe.load_model(tmp_path / "cons", dtype="float32").norm.weight.dtype == torch.float32


def test_consolidated_float32_stays_float32(tmp_path):
    smoe.save_model(build_model(_tiny(), seed=0), tmp_path / "cons", fmt="consolidated")
    assert {p.dtype for p in smoe.load_model(tmp_path / "cons").parameters()} == {torch.float32}
