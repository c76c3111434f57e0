"""A distributed run (2 processes, expert parallel) killed after its final checkpoint: --resume
writes the model/ directory, summary and plots it lacks, from that checkpoint, without a step."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from smoe import distributed as sd
from smoe.train import loop
from smoe.train.loop import train
from test_dist_parallel import spawn
from test_train_loop import MODEL, make_corpus, tcfg

pytestmark = pytest.mark.dist

CFG = tcfg(steps=2, eval_every=0, ckpt_every=0, warmup_steps=1)
LAYOUT = sd.ParallelConfig(ep=2, data_parallel="ddp", timeout_s=60)


def _no_training(*args, **kwargs):
    raise AssertionError("a training step ran")


def worker(rank: int, world: int, port: int, run: str, corpus: str, resume: bool) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    if resume:
        loop.train_step = _no_training
        summary = train(run, corpus_dir=corpus, resume=True, parallel=LAYOUT, progress=False)
        assert summary.get("finished_from_checkpoint") and not summary.get("already_complete")
    else:
        train(run, MODEL, CFG, corpus, parallel=LAYOUT, progress=False)


def test_distributed_resume_after_kill_before_summary_writes_model(tmp_path):
    corpus, run = make_corpus(tmp_path / "corpus"), tmp_path / "r"
    spawn(worker, 2, str(run), str(corpus), False)
    model = {p.name: p.read_bytes() for p in (run / "model").iterdir()}
    val = json.loads((run / "summary.json").read_text())["val"]
    (run / "summary.json").unlink()
    shutil.rmtree(run / "plots")
    shutil.rmtree(run / "model")  # the state of a kill right after the final checkpoint
    spawn(worker, 2, str(run), str(corpus), True)
    assert {p.name: p.read_bytes() for p in (run / "model").iterdir()} == model
    assert json.loads((run / "summary.json").read_text())["val"] == val
    assert (run / "plots" / "loss.png").is_file()
