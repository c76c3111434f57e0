"""CLI plumbing: flag types refuse bad values at parse time, and OS errors end in one line."""

from __future__ import annotations

import pytest

from smoe.cli.main import main


@pytest.mark.parametrize("dev", ["meta", "xpu", "hpu"])
def test_device_flag_refuses_a_device_torch_cannot_use(tmp_path, capsys, dev):
    # Before: accepted, then a traceback from the first allocation (AssertionError "Torch not
    # compiled with XPU enabled", ModuleNotFoundError 'torch.hpu', "META device type not an
    # accelerator").
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--device", dev])
    assert e.value.code == 2
    assert f"argument --device: '{dev}': no usable {dev} device here" in capsys.readouterr().err


def test_device_flag_accepts_cpu():
    from smoe.cli.types import device

    assert device("cpu") == "cpu"


def test_os_error_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "file" / "m")]) == 2
    err = capsys.readouterr().err
    assert err == f"smoe init: error: {tmp_path / 'file' / 'm'}: Not a directory\n"


@pytest.mark.parametrize(
    "command", ["init", "info", "generate", "chat", "data", "analyze", "train", "export", "upcycle", "demo"]
)
def test_help_works(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: smoe " + command in capsys.readouterr().out
