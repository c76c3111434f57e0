"""Process-group start-up and rank helpers for runs launched with ``torchrun``.

``torchrun --nproc_per_node N -m smoe train ...`` sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; ``init_distributed`` reads them. Without them (a plain
``smoe train``) nothing is initialised and every helper answers as for a single process, so
single-process behaviour is unchanged.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(timeout_s: float = 300.0, backend: str | None = None) -> bool:
    """Join the process group described by the torchrun environment; False when there is none.

    Every collective gets ``timeout_s``: a rank that dies or stalls makes the others fail
    with a timeout error after that long instead of hanging forever (torchrun then tears the
    job down). The backend is NCCL when CUDA is present, else gloo; on CUDA each process
    takes the GPU numbered by LOCAL_RANK.
    """
    if dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device_id = None
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                "--nproc_per_node must not exceed the GPUs per node"
            )
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), device_id=device_id)
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on the rank that logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def local_device() -> torch.device:
    """This process's device: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
