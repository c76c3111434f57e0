"""The model and its KV cache refuse what they cannot compute correctly: positions past the
cache's ``max_len`` (a full buffer would wrap and overwrite keys still needed) or past
``max_seq_len``, and a cache of another dtype or device."""

from __future__ import annotations

import pytest
import torch

import smoe
from smoe.cache import KVCache


def _tokens(B: int, T: int) -> torch.Tensor:
    return torch.randint(3, 97, (B, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("window", [None, 4])
def test_cache_refuses_positions_past_max_len(make_hf, window):
    directory, _ = make_hf(sliding_window=window)
    model = smoe.load_model(directory)
    cache = KVCache.for_model(model, 2, 8)
    with torch.no_grad():
        model(_tokens(2, 8), torch.arange(8).expand(2, 8), cache)  # fills every position
        with pytest.raises(ValueError, match="position 9 is past the cache's max_len of 8"):
            model(_tokens(2, 2), torch.arange(8, 10).expand(2, 2), cache)


def test_model_refuses_positions_past_max_seq_len(make_hf):
    directory, _ = make_hf()  # max_position_embeddings=256
    model = smoe.load_model(directory)
    assert model.config.max_seq_len == 256
    with torch.no_grad():
        model(_tokens(1, 2), torch.tensor([[254, 255]]))
        with pytest.raises(ValueError, match="position 256 is past the model's max_seq_len of 256"):
            model(_tokens(1, 2), torch.tensor([[255, 256]]))
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.zeros(1, 257, dtype=torch.long))


@pytest.mark.parametrize("dtype,device", [(torch.bfloat16, "cpu"), (torch.float32, "meta")])
def test_cache_of_another_dtype_or_device_is_refused(make_hf, dtype, device):
    directory, _ = make_hf(sliding_window=4)
    model = smoe.load_model(directory)
    cache = KVCache(model.config, 1, 16, device=device, dtype=dtype)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache.s dtype or device differs"):
        model(_tokens(1, 6), torch.arange(6)[None], cache)
