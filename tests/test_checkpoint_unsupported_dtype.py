"""A safetensors file whose tensors use a dtype the loader does not handle (an FP8 release)
must say so, not call a valid file unreadable."""

import pytest
import torch
from safetensors.torch import save_file

from smoe.checkpoint import CheckpointError
from smoe.checkpoint.files import read_safetensors_header


def test_fp8_safetensors_names_the_dtype(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, str(path))
    with pytest.raises(CheckpointError, match="dtype F8_E4M3, which is not supported"):
        read_safetensors_header(path)
