"""The training benchmark scripts run (tiny, on the CPU) and count FLOPs consistently."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smoe.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_train_flops_match_active_params():
    """6 x (active params - embedding table - norm weights) + causal attention 6*L*T*H*hd."""
    gpu = _load("gpu_train")
    cfg = ModelConfig(**gpu.ONE_B)
    norms = cfg.n_layers * 2 * cfg.dim + cfg.dim
    matmul = cfg.num_params(active=True) - cfg.vocab_size * cfg.dim - norms
    T = 2048
    assert gpu.flops_per_token(cfg, T) == 6 * matmul + 6 * cfg.n_layers * T * cfg.n_heads * cfg.head_dim
    assert 0.9e9 < cfg.num_params() < 1.0e9  # "about 1B"


@pytest.mark.slow
def test_gpu_train_tiny_runs(capsys):
    result = _load("gpu_train").main(["--tiny"])
    assert result["tokens_per_s"] > 0 and result["loss"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("|")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_gpu_train_tiny_runs_the_triton_engine(capsys):
    """The GPU benchmark's default engine on CUDA is triton: its whole training step (bf16
    autocast, forward, backward, optimizer) under triton's CPU interpreter, in a fresh process
    (triton reads TRITON_INTERPRET when first imported). Same seed and data as the auto engine,
    so the first step's loss must agree within bf16 rounding."""
    args = ["--tiny", "--steps", "1", "--warmup", "1"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_train.py"), *args, "--dispatch", "triton"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dispatch=triton" in done.stdout
    triton_loss = float(done.stdout.strip().splitlines()[-1].strip("|").split("|")[-1])
    auto_loss = _load("gpu_train").main(args)["loss"]
    assert abs(triton_loss - auto_loss) < 0.002 * auto_loss, (triton_loss, auto_loss)


@pytest.mark.slow
def test_cpu_train_tiny_runs(capsys):
    rows = _load("cpu_train").main(["--tiny", "--unfused"])
    assert [r["model"] for r in rows] == [
        "smoe", "smoe dense (equal active)", "smoe, head + loss unfused", "transformers Mixtral",
        "matrix products alone, experts by mm", "matrix products alone, experts by bmm",
    ]  # fmt: skip
    out = capsys.readouterr().out
    assert "target >= 2" in out and "floor / transformers" in out and "head + loss unfused" in out
    import smoe.model.transformer as transformer
    from smoe.model.head_loss import linear_cross_entropy

    assert transformer.linear_cross_entropy is linear_cross_entropy  # the A/B row restored it
