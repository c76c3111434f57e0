"""Shared fixtures: small checkpoints written by transformers itself (the peer we compare with)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread: on the shared 2-core VM, two OpenMP threads contending with other
# processes made small ops (index_add, linear) 10-20x slower, and the tests' shapes are small.
torch.set_num_threads(1)


def hf_mixtral(tmp_path, seed: int = 0, **overrides):
    """Write a random transformers MixtralForCausalLM (or Mistral with num_local_experts=1)
    to ``tmp_path`` and return (directory, transformers model in eval mode)."""
    import transformers

    kw = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        rope_theta=1e4, sliding_window=None, tie_word_embeddings=False,
    )  # fmt: skip
    kw.update(overrides)
    torch.manual_seed(seed)
    if kw.get("num_local_experts") == 1:
        kw.pop("num_local_experts")
        kw.pop("num_experts_per_tok")
        cfg = transformers.MistralConfig(**kw)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.MixtralConfig(**kw)
        model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():  # transformers initialises norms at 1; randomise them so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.eval()
    model.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.fixture
def make_hf(tmp_path):
    counter = iter(range(1000))

    def _make(**overrides):
        d = tmp_path / f"hf{next(counter)}"
        return hf_mixtral(d, **overrides)

    return _make
