"""``smoe.train.step.train_step`` on parallelised models, unchanged: under torch.distributed
it clips by ``smoe.distributed.clip_grad_norm_`` (torch's own clipping sees only this rank's
tensors: a DTensor norm under FSDP, mixed meshes with FSDP + EP, other ranks' experts missing
under EP).

Reference: one process running ``train_step`` on the same data as gradient accumulation over
the ranks' batches (micro-batch r = rank r's rows). That is the same objective as the
distributed step: the mean over ranks of (CE + router losses of the rank's own batch).
"""

from __future__ import annotations

import os

import pytest
import torch

from smoe import distributed as sd
from smoe.train.config import TrainConfig
from smoe.train.data import Batch
from smoe.train.optim import build_optimizer, build_scheduler
from smoe.train.step import train_step
from test_dist_parallel import LAYOUTS, ROWS_PER_RANK, _close, global_batch, init, make_model, spawn

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# grad_clip well below the norm (~0.3), so clipping matters. weight_decay 0: the reference
# engine leaves an expert with no tokens without a gradient (AdamW skips it), while every
# distributed layout gives it an exact zero gradient (ranks must agree; see
# touch_all_experts), and AdamW's decoupled decay would still shrink it.
TRAIN = TrainConfig(
    steps=10, warmup_steps=0, lr=1e-3, batch_size=ROWS_PER_RANK, seq_len=8, grad_clip=0.05, weight_decay=0.0
)
# Two steps: AdamW's first step is blind to the gradient's scale, so clipping shows from the second.
SEEDS = (2, 3)


def batch_of(tokens_BT: torch.Tensor) -> Batch:
    return Batch(tokens_BT[:, :-1], tokens_BT[:, 1:])


def step_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init(rank, world, port)
    results = {}
    try:
        for name, (layout, dispatch) in LAYOUTS.items():
            model = sd.parallelize(make_model(dispatch=dispatch), sd.ParallelConfig(**layout))
            opt = build_optimizer(model, TRAIN)
            sched = build_scheduler(opt, TRAIN)
            try:
                for seed in SEEDS:
                    batch = batch_of(sd.shard_batch(global_batch(world, seed)))
                    metrics = train_step(model, opt, sched, [batch], TRAIN)
            except Exception as e:  # recorded, so the parent can say which layout failed and how
                results[name] = dict(error=f"{type(e).__name__}: {e}"[:300])
                continue
            loss = torch.tensor(metrics["loss"])
            torch.distributed.all_reduce(loss)
            norm = torch.tensor(metrics["grad_norm"])
            results[name] = dict(loss=loss / world, grad_norm=norm, params=sd.gather_full_params(model))
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        sd.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("step2")
    spawn(step_worker, 2, str(out))
    results = torch.load(out / "results.pt", weights_only=False)
    model = make_model()
    opt = build_optimizer(model, TRAIN)
    sched = build_scheduler(opt, TRAIN)
    for seed in SEEDS:
        tokens = global_batch(2, seed)
        micro = [batch_of(tokens[r * ROWS_PER_RANK : (r + 1) * ROWS_PER_RANK]) for r in range(2)]
        metrics = train_step(model, opt, sched, micro, TRAIN)
    ref = dict(loss=torch.tensor(metrics["loss"]), grad_norm=torch.tensor(metrics["grad_norm"]))
    return results, ref | dict(params=dict(model.named_parameters()))


def check(got: dict, ref: dict, what: str) -> None:
    assert "error" not in got, got.get("error")
    _close(got["loss"], ref["loss"], f"{what} loss")
    _close(got["grad_norm"], ref["grad_norm"], f"{what} grad_norm reported by train_step")
    for k, p in ref["params"].items():
        _close(got["params"][k], p.detach(), f"{what} param after clipping and an AdamW step {k}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_train_step_matches_single_process(runs, layout):
    results, ref = runs
    check(results[layout], ref, layout)
