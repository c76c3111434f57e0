"""The memory estimator against hand arithmetic (no processes started)."""

from __future__ import annotations

import pytest

from smoe.config import ModelConfig
from smoe.distributed.memory import activation_bytes_per_token, estimate, split_params

MIXTRAL = ModelConfig.preset("mixtral-8x7b")


def test_param_split_matches_the_published_size():
    dense, expert = split_params(MIXTRAL)
    assert dense + expert == MIXTRAL.num_params()
    assert expert == 32 * 8 * 3 * 4096 * 14336
    assert abs(MIXTRAL.num_params() / 1e9 - 46.7) < 0.05  # Mixtral paper: 46.7B


def test_model_state_is_16_bytes_per_param_sharded():
    dense, expert = split_params(MIXTRAL)
    fsdp8 = estimate(MIXTRAL, dp=8, ep=1, fsdp=True, tokens_per_gpu=0)
    assert fsdp8.state_gb == pytest.approx(16 * 46.702792704 / 8)
    ep8_ddp = estimate(MIXTRAL, dp=1, ep=8, fsdp=False, tokens_per_gpu=0)
    assert ep8_ddp.state_gb == pytest.approx(16 * (dense + expert / 8) / 1e9)
    assert ep8_ddp.gathered_gb == 0 and ep8_ddp.activations_gb == 0
    big = estimate(MIXTRAL, dp=8, ep=8, fsdp=True, tokens_per_gpu=0)
    assert big.state_gb == pytest.approx(16 * 46.702792704 / 64)


def test_activations_scale_with_tokens_and_checkpointing_saves():
    per_token = activation_bytes_per_token(MIXTRAL, checkpointing=False)
    # 32 layers of (attention ~4.5 D + MoE D + 2KD + 4KF) bf16 values + the head's input gradient
    layer = 2 * (4 * 4096 + 2 * 4096 * 8 / 32 + 4096 + 4 * 4096 + 4 * 2 * 14336) + 4 * 8
    assert per_token == pytest.approx(32 * layer + 2 * 4096)
    a = estimate(MIXTRAL, dp=8, ep=1, fsdp=True, tokens_per_gpu=4096)
    assert a.activations_gb == pytest.approx(4096 * per_token / 1e9)
    assert activation_bytes_per_token(MIXTRAL, checkpointing=True) < per_token / 10


def test_ep_must_divide_experts():
    with pytest.raises(ValueError, match="ep=3 does not divide num_experts=8"):
        estimate(MIXTRAL, dp=1, ep=3, fsdp=True, tokens_per_gpu=1)
