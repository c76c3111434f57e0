"""The on-device greedy loop (the GPU throughput path) equals the Generator's greedy tokens, and
benchmarks/gpu_decode.py runs end to end on CPU with --tiny."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import smoe
from smoe.cache import KVCache
from smoe.decode_loop import GreedyDecodeLoop
from smoe.generate import GenerationConfig, Generator

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("window", [None, 4])
def test_greedy_loop_equals_generator(make_hf, window):
    directory, _ = make_hf(sliding_window=window)
    model = smoe.load_model(directory)
    prompts = torch.randint(3, 97, (3, 7), generator=torch.Generator().manual_seed(0))
    expected = [
        c.token_ids
        for c in Generator(model).generate(
            prompts.tolist(), GenerationConfig(max_new_tokens=9, stop_at_eos=False)
        )
    ]
    cache = KVCache.for_model(model, 3, 7 + 10)
    loop = GreedyDecodeLoop(model, cache, max_steps=8)
    with torch.inference_mode():
        first = model(prompts, None, cache)[:, -1].argmax(-1)
    loop.start(first, torch.full((3,), 7))
    out = loop.run(5)
    out = loop.run(3)
    got = torch.cat([first[:, None], out], dim=1).tolist()
    assert got == expected
    with pytest.raises(ValueError, match="exceed"):
        loop.run(1)


def test_greedy_loop_shorter_than_the_capture_warmup(make_hf):
    """max_steps below the capture's warm-up count: the buffer still has room for the warm-up's
    writes (out of bounds on CUDA before), and run() returns max_steps columns."""
    directory, _ = make_hf()
    model = smoe.load_model(directory)
    loop = GreedyDecodeLoop(model, KVCache.for_model(model, 2, 12), max_steps=1)
    assert loop.out_BN.shape[1] >= 3
    loop.start(torch.tensor([5, 9]), torch.zeros(2, dtype=torch.long))
    assert loop.run(1).shape == (2, 1)


def test_cuda_graph_needs_cuda(make_hf):
    directory, _ = make_hf()
    model = smoe.load_model(directory)
    with pytest.raises(ValueError, match="CUDA"):
        GreedyDecodeLoop(model, KVCache.for_model(model, 1, 8), max_steps=4, cuda_graph=True)


def _gpu_decode(monkeypatch, prefill_len: int, batches: list[str]):
    """benchmarks/gpu_decode.py as a module, with argv set for a tiny CPU run."""
    spec = importlib.util.spec_from_file_location("gpu_decode", ROOT / "benchmarks" / "gpu_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["gpu_decode.py", "--tiny", "--device", "cpu", "--steps", "4", "--prompt-len", "8"]
    monkeypatch.setattr(sys, "argv", [*argv, "--prefill-len", str(prefill_len), "--batch", *batches])
    return mod


@pytest.mark.slow
def test_gpu_benchmark_runs_tiny_on_cpu(monkeypatch, capsys):
    mod = _gpu_decode(monkeypatch, 32, ["1", "3"])
    mod.main()
    out = capsys.readouterr().out.strip().splitlines()
    table = out[out.index("| measurement | result | graphed tokens == eager |") :]
    assert len(table) == 7 and "| yes |" in table[2] and "| yes |" in table[3] and "prefill 32" in table[4]
    assert table[5].startswith("| smoe Generator (smoe generate's path), batch 1, greedy |")
    assert table[6].startswith("| smoe Generator (smoe generate's path), batch 3, greedy |")


@pytest.mark.slow
def test_gpu_benchmark_prints_its_rows_when_stopped(monkeypatch, capsys):
    """`timeout` stops a script with SIGTERM; the table of the rows measured so far must still
    come out (benchmarks/gpu_session.sh collects it)."""
    import signal

    mod = _gpu_decode(monkeypatch, 16, ["1"])
    real = mod.bench_prefill

    def prefill_cut_short(*args, **kwargs):
        real(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(mod, "bench_prefill", prefill_cut_short)
    before = signal.getsignal(signal.SIGTERM)
    try:
        mod.main()
    finally:
        signal.signal(signal.SIGTERM, before)
    out = capsys.readouterr().out
    assert "stopped early" in out
    table = out.strip().splitlines()
    table = table[table.index("| measurement | result | graphed tokens == eager |") :]
    assert len(table) == 3 and "greedy decode, batch 1" in table[2]  # the prefill was cut short
