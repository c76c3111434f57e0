"""A failing or stalled rank ends the job with a clear message instead of a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.multiprocessing as mp

from smoe import distributed as sd

pytestmark = pytest.mark.dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stalled_worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    sd.init_distributed(timeout_s=3)
    if rank == 1:
        time.sleep(60)  # stuck (e.g. a dead data loader): never joins the collective
    torch.distributed.all_reduce(torch.ones(1))


def test_stalled_rank_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match=r"(?i)timed? ?out"):
        mp.spawn(stalled_worker, args=(2, free_port()), nprocs=2, join=True)
    assert time.monotonic() - start < 40


SCRIPT = """
import torch
import smoe
from smoe import distributed as sd

torch.set_num_threads(1)
assert sd.init_distributed(timeout_s=20)
cfg = smoe.ModelConfig(dim=16, n_layers=1, head_dim=8, hidden_dim=24, n_heads=2, n_kv_heads=1,
                       vocab_size=50, max_seq_len=16, num_experts=4, top_k=2, dispatch="reference")
model = sd.parallelize(smoe.build_model(cfg, seed=0), sd.ParallelConfig(ep=2))
loss = model(torch.randint(0, 50, (1, 8))).float().pow(2).mean()
if sd.rank() == 1:
    raise RuntimeError("rank 1 fails on purpose before backward")
loss.backward()  # rank 0 waits in the backward all-to-all for a rank that is gone
"""


@pytest.mark.slow
def test_failing_rank_under_torchrun_ends_the_job(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(SCRIPT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 90
