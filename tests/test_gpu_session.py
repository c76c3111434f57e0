"""benchmarks/gpu_session.sh, the one call a session with a GPU makes, runs end to end on the
CPU with --tiny and collects each script's table."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
def test_gpu_session_tiny(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "SMOE_GPU_TINY": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tables = (tmp_path / "tables.md").read_text()
    for name, header in [
        ("gpu_train", "| step (s) |"),
        ("gpu_moe", "| T | mode |"),
        ("gpu_decode", "| measurement |"),
    ]:
        assert f"## {name}\n{header}" in tables
    assert "graphed tokens == eager" in tables and "| yes |" in tables
    assert (tmp_path / "gpu_decode.log").stat().st_size > 0 and "skipped (a tiny run)" in done.stdout
