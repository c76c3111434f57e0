"""The dispatch benchmark scripts run end to end on tiny shapes and print their table last."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(out: str) -> list[str]:
    lines = out.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if not line.startswith("|")) + 1
    assert all(line.startswith("|") for line in lines[start:]), "the table must come last"
    return lines[start:]


@pytest.mark.slow
def test_gpu_moe_tiny_runs(capsys):
    with torch.enable_grad():  # another test may have switched gradients off process-wide
        load("gpu_moe").main(["--tiny", "--iters", "1", "--tokens", "1", "24"])
    rows = table(capsys.readouterr().out)
    assert rows[0].startswith("| T | mode | engine |")
    body = rows[2:]
    for T in (1, 24):
        for mode in ("fwd", "fwd+bwd"):
            for engine in ("smoe auto", "smoe sorted", "hf grouped_mm", "hf eager"):
                assert any(r.startswith(f"| {T} | {mode} | {engine} |") for r in body), (T, mode, engine)


def test_gpu_moe_keeps_going_when_an_engine_fails(capsys, monkeypatch):
    """A GPU session gets one call: an engine that fails at some shape costs its rows only."""
    gpu_moe = load("gpu_moe")

    def broken(*args):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setitem(gpu_moe.ENGINES, "gather", broken)  # at T = 1 "auto" runs it too
    with torch.enable_grad():
        gpu_moe.main(["--tiny", "--iters", "1", "--tokens", "1", "--no-hf"])
    out = capsys.readouterr().out
    assert "T=1 fwd smoe gather: FAILED RuntimeError: out of resources" in out
    body = table(out)[2:]
    assert any(r.startswith("| 1 | fwd+bwd | smoe gather | nan |") for r in body)
    assert any(r.startswith("| 1 | fwd+bwd | smoe sorted |") and "nan" not in r for r in body)


@pytest.mark.slow
def test_moe_layer_quick_runs(capsys):
    with torch.enable_grad():
        load("moe_layer").main(
            [
                "--quick",
                "--repeats",
                "1",
                "--budget",
                "0",
                "--tokens",
                "1",
                "3",
                "--modes",
                "fwd",
                "fwd+bwd",
                "--threads",
                "1",
            ]
        )
    rows = table(capsys.readouterr().out)
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    for column in (
        "smoe auto ms",
        "floor flop ms",
        "floor touched bmm ms",
        "floor bw est ms",
        "target floor",
    ):
        assert column in header, column
    assert len(rows) == 2 + 4
    timed = [i for i, c in enumerate(header) if c.startswith("floor ") and c != "floor bw est ms"]
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # the target floor is the lowest timed floor that applies at this T, and the table names it
        named = cells[header.index(f"floor {cells[header.index('target floor')]} ms")]
        assert float(cells[header.index("target floor ms")]) == float(named)
        T = int(cells[header.index("T")])
        applies = [
            i for i in timed if cells[i] != "-" and (T >= 512 or header[i].startswith("floor touched"))
        ]
        assert float(named) == min(float(cells[i]) for i in applies)


@pytest.mark.slow
def test_expert_products_runs(capsys):
    load("expert_products").main(["--rows", "16", "--repeats", "1", "--threads", "1"])
    rows = table(capsys.readouterr().out)
    assert rows[0].startswith("| rows A | rows per expert | form |")
    forms = {r.split("|")[3].strip() for r in rows[2:]}
    assert forms == {"dense", "bmm", "loop mm", "grouped_mm", "loop w@x^T", "rows mv"}
