"""The parallel layout: a validated config and the DeviceMesh built from it.

The world of N ranks is a 2-D mesh ``(dp, ep)`` with N = dp * ep, row-major, so the ranks of
one expert-parallel group are consecutive (on GPUs: the same node, where all-to-all is fast)::

    N = 4, dp = 2, ep = 2:      ep=0  ep=1
                         dp=0 [  0     1  ]   rank 0 holds experts 0..E/2-1, rank 1 the rest
                         dp=1 [  2     3  ]   ranks 2, 3 hold the same experts as 0, 1

Every rank reads its own slice of the data (data parallelism runs over all N ranks, the ep
dimension included, as in the usual expert parallelism). Dense parameters are replicated (DDP)
or sharded (FSDP) over all N ranks; expert parameters are split over ``ep`` and replicated or
sharded over ``dp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DATA_PARALLEL = ("ddp", "fsdp")


class MeshError(ValueError):
    """A parallel layout that does not fit the world size or the model."""


@dataclass
class ParallelConfig:
    """``dp * ep`` must equal the world size; ``dp=0`` means "whatever is left": world // ep.

    ``data_parallel`` says how dense parameters (and expert parameters over dp) are kept in
    step: "ddp" replicates and all-reduces gradients, "fsdp" shards with FSDP2
    (``fully_shard``). ``param_dtype`` ("bf16") casts parameters for compute under FSDP2's
    MixedPrecisionPolicy while gradients are reduced in float32; None leaves dtypes alone
    (e.g. when the training loop uses autocast). It is an FSDP2 option: set with "ddp", it is
    an error rather than ignored.
    """

    dp: int = 0
    ep: int = 1
    data_parallel: str = "ddp"
    param_dtype: str | None = None
    timeout_s: float = 300.0  # every collective fails after this long instead of hanging

    def __post_init__(self) -> None:
        for name, minimum in (("dp", 0), ("ep", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise MeshError(
                    f"parallel config field {name!r} must be an integer >= {minimum}, got {value!r}"
                )
        if self.data_parallel not in DATA_PARALLEL:
            raise MeshError(
                f"parallel config field 'data_parallel' must be one of {DATA_PARALLEL}, got {self.data_parallel!r}"
            )
        if self.param_dtype not in (None, "bf16", "fp32"):
            raise MeshError(
                f"parallel config field 'param_dtype' must be None, 'bf16' or 'fp32', got {self.param_dtype!r}"
            )
        if self.param_dtype is not None and self.data_parallel != "fsdp":
            # Only FSDP2's MixedPrecisionPolicy reads it; DDP would train in float32 unannounced.
            raise MeshError(
                f"param_dtype={self.param_dtype!r} (--param-dtype) needs data_parallel='fsdp' (--fsdp); "
                f"under {self.data_parallel!r} use the train config's dtype (--dtype bf16) for bf16 compute"
            )
        if not self.timeout_s > 0:
            raise MeshError(f"parallel config field 'timeout_s' must be > 0, got {self.timeout_s!r}")

    def resolve(self, world_size: int, num_experts: int) -> ParallelConfig:
        """The same layout with ``dp`` filled in, checked against the world and the model.

        Raises MeshError naming the numbers when the mesh does not divide the world size or
        the experts (checked at start, before any collective, so no rank waits on another).
        """
        if world_size % self.ep:
            raise MeshError(f"ep={self.ep} does not divide the world size {world_size}")
        dp = self.dp or world_size // self.ep
        if dp * self.ep != world_size:
            raise MeshError(
                f"dp={dp} x ep={self.ep} = {dp * self.ep} ranks, but the world size is {world_size}"
            )
        if self.ep > 1 and num_experts == 1:  # before the divisibility check, which says less
            raise MeshError(f"ep={self.ep} needs a mixture-of-experts model, but num_experts=1 (dense)")
        if num_experts % self.ep:
            raise MeshError(
                f"ep={self.ep} does not divide num_experts={num_experts}: every ep rank must hold the "
                f"same number of experts (choose ep from the divisors of {num_experts})"
            )
        return ParallelConfig(dp, self.ep, self.data_parallel, self.param_dtype, self.timeout_s)


@dataclass
class ParallelMesh:
    """The meshes the wrappers need: ``world`` (1-D, all ranks: dense params), ``dp`` and
    ``ep`` (1-D sub-meshes through this rank: expert params)."""

    cfg: ParallelConfig
    mesh: DeviceMesh  # 2-D ("dp", "ep")
    world: DeviceMesh  # 1-D ("world",), all ranks

    @property
    def dp(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def ep(self) -> DeviceMesh:
        return self.mesh["ep"]

    @property
    def world_size(self) -> int:
        return self.cfg.dp * self.cfg.ep


def build_mesh(cfg: ParallelConfig, num_experts: int, device_type: str | None = None) -> ParallelMesh:
    """Validate ``cfg`` against the running process group and build the meshes.

    Needs ``torch.distributed`` initialised (see ``smoe.distributed.launch.init_distributed``).
    """
    if not dist.is_initialized():
        raise MeshError(
            "torch.distributed is not initialised: call smoe.distributed.init_distributed() first"
        )
    cfg = cfg.resolve(dist.get_world_size(), num_experts)
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (cfg.dp, cfg.ep), mesh_dim_names=("dp", "ep"))
    world = mesh._flatten("world")  # same ranks, one dimension: the dense parameters' group
    # A dimension smaller than the world gets a new process group, and torch gives a new group
    # its default timeout (30 min on gloo, 10 on NCCL), not the world group's: a stalled ep peer
    # would hang the expert all-to-all for half an hour. Every group of the layout gets timeout_s.
    # torch has no public setter for an existing group's timeout; the private one is in torch
    # 2.13. Where it is missing the groups keep torch's default.
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None:
        timeout = timedelta(seconds=cfg.timeout_s)
        for sub in (mesh["dp"], mesh["ep"], world):
            set_timeout(timeout, sub.get_group())
    return ParallelMesh(cfg, mesh, world)


def param_dtype(cfg: ParallelConfig) -> torch.dtype | None:
    return {None: None, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.param_dtype]
