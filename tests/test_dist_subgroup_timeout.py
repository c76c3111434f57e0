"""The layout's own process groups (ep, dp, the flattened world) time out like the world group.

``init_device_mesh`` reuses the default group for a mesh dimension that spans every rank, but
creates a new group for a smaller one, and torch gives a new group its default timeout (30 min
on gloo, 10 on NCCL), not the one ``init_distributed`` set. With dp = 2 x ep = 2 the expert
all-to-all runs on a 2-rank ep group: a stalled peer there must fail the others after
``timeout_s``, as everywhere else, not after half an hour.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from smoe import distributed as sd

pytestmark = pytest.mark.dist

TIMEOUT_S = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_timeout(group: torch.distributed.ProcessGroup) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def stalled_ep_peer(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    sd.init_distributed(timeout_s=TIMEOUT_S)
    pmesh = sd.build_mesh(sd.ParallelConfig(ep=2, timeout_s=TIMEOUT_S), num_experts=4)
    for name, mesh in (("dp", pmesh.dp), ("ep", pmesh.ep), ("world", pmesh.world)):
        got = group_timeout(mesh.get_group())
        if got != timedelta(seconds=TIMEOUT_S):
            raise AssertionError(f"the {name} group waits {got} before failing, expected {TIMEOUT_S} s")
    if rank == 1:
        time.sleep(60)  # stuck: its ep peer, rank 0, waits in the collective below
    start = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1), group=pmesh.ep.get_group())
    except RuntimeError as e:
        raise RuntimeError(f"rank {rank} failed after {time.monotonic() - start:.1f} s: {e}") from None


def test_stalled_ep_peer_times_out_on_the_ep_group():
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match=r"rank 0 failed after .*Timed out waiting"):
        mp.spawn(stalled_ep_peer, args=(4, free_port()), nprocs=4, join=True)
    assert time.monotonic() - start < 55  # start-up of 4 processes on a busy machine included
