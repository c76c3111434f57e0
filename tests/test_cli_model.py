"""`smoe init` and `smoe info`: a preset written and read back, and a preset too large for the
machine's memory refused before anything is allocated."""

from __future__ import annotations

import smoe.cli.model_cmds as model_cmds
from smoe.cli.main import main


def test_init_then_info(tmp_path, capsys):
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert main(["info", "--model", str(tmp_path / "m"), "--load"]) == 0
    out = capsys.readouterr().out
    assert "wrote tiny (12.7M parameters)" in out and "all keys matched" in out


def test_init_refuses_a_preset_larger_than_memory(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(model_cmds, "_available_bytes", lambda: 10 * 2**20)  # 10 MiB left
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 2
    assert (
        "--preset tiny in torch.float32 needs 49 MiB of memory, 10 MiB are available"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "m").exists()


def test_init_memory_check_counts_the_float32_init(tmp_path, capsys, monkeypatch):
    """build_model initialises in float32 and then casts, so --dtype bfloat16 needs the
    float32 size (49 MiB for tiny), not the bfloat16 size (24 MiB), free."""
    monkeypatch.setattr(model_cmds, "_available_bytes", lambda: 30 * 2**20)
    assert main(["init", "--preset", "tiny", "--dtype", "bfloat16", "--out", str(tmp_path / "m")]) == 2
    assert (
        "--preset tiny in torch.bfloat16 needs 49 MiB of memory, 30 MiB are available"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "m").exists()
