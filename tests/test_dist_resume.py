"""Exact resume of distributed training runs (2 processes, gloo).

For each layout (DDP, FSDP2, EP + DDP, EP + FSDP2) one spawn of 2 processes trains a run of 4
steps straight through, and the same run stopped after step 2 then resumed with
``resume=True`` in the same layout: every logged record (loss, grad norm, lr, imbalance),
the validation losses, the final weights and the optimizer state must be bitwise equal. The
stop under EP + DDP is a SIGTERM raised on rank 1 only (every rank must stop after the same
step and save); under EP + FSDP2 a NaN loss on rank 1 only in step 3 (every rank must raise,
keeping the step-2 checkpoint); the others use ``stop_after``. Router jitter is on, with one
RNG stream per rank, so every rank's RNG state must come back too. A run saved under EP + DDP and resumed under FSDP2 (same 2 processes)
matches to float32 round-off, and a resume with a different number of processes is refused
with both layouts named.

Each ``train`` call starts and ends its own process group (its own port), as torchrun would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch

from smoe import distributed as sd
from smoe.train import checkpoint as ckpt
from smoe.train import loop
from smoe.train import step as step_mod
from smoe.train.loop import train
from smoe.train.step import NonFiniteLossError
from test_dist_parallel import free_port, spawn
from test_train_loop import MODEL, make_corpus, tcfg

pytestmark = pytest.mark.dist

STEPS, STOP = 4, 2
CFG = tcfg(steps=STEPS, eval_every=0, ckpt_every=0, warmup_steps=1, log_every=1)
LAYOUTS = {
    "ddp": dict(ep=1, data_parallel="ddp"),
    "fsdp": dict(ep=1, data_parallel="fsdp"),
    "ep": dict(ep=2, data_parallel="ddp"),
    "ep_fsdp": dict(ep=2, data_parallel="fsdp"),
}
SIGTERM_LAYOUT, NAN_LAYOUT = "ep", "ep_fsdp"
# One process group per train() call: straight, stopped, resumed per layout, then the
# layout change (stopped, resumed).
N_PORTS = 3 * len(LAYOUTS) + 2


def _sigterm_rank1_at_step(step: int):
    """A train_step that, on rank 1 only, delivers SIGTERM to its own process during ``step``."""
    real, calls = loop.train_step, {"n": 0}

    def stepped(*args, **kwargs):
        calls["n"] += 1
        if sd.rank() == 1 and calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    return stepped


def _nan_on_rank1_from_step(step: int):
    """A forward_loss whose loss turns NaN on rank 1 only, from optimizer step ``step``."""
    real, calls = step_mod.forward_loss, {"n": 0}

    def poisoned(model, batch, cfg):
        calls["n"] += 1
        parts = real(model, batch, cfg)
        if sd.rank() == 1 and calls["n"] > (step - 1) * cfg.grad_accum:
            parts.total = parts.total * float("nan")
        return parts

    return poisoned


def resume_worker(rank: int, world: int, _port: int, out: str, corpus: str, ports: list[int]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    port = iter(ports)

    def run(run_dir: str, layout: dict, **kw) -> dict:
        os.environ["MASTER_PORT"] = str(next(port))
        parallel = sd.ParallelConfig(**layout, timeout_s=60)
        return train(run_dir, corpus_dir=corpus, parallel=parallel, progress=False, **kw)

    summaries = {}
    for name, layout in LAYOUTS.items():
        d = os.path.join(out, name)
        summaries[name, "straight"] = run(f"{d}/straight", layout, model_cfg=MODEL, train_cfg=CFG)
        if name == SIGTERM_LAYOUT:
            real = loop.train_step
            loop.train_step = _sigterm_rank1_at_step(STOP)
            try:
                summaries[name, "stopped"] = run(f"{d}/split", layout, model_cfg=MODEL, train_cfg=CFG)
            finally:
                loop.train_step = real
        elif name == NAN_LAYOUT:  # a checkpoint every 2 steps; step 3 is poisoned on rank 1
            real = step_mod.forward_loss
            step_mod.forward_loss = _nan_on_rank1_from_step(STOP + 1)
            try:
                run(
                    f"{d}/split", layout, model_cfg=MODEL, train_cfg=dataclasses.replace(CFG, ckpt_every=STOP)
                )
            except NonFiniteLossError as e:
                summaries[name, "stopped"] = {"error": str(e)}
            finally:
                step_mod.forward_loss = real
        else:
            summaries[name, "stopped"] = run(
                f"{d}/split", layout, model_cfg=MODEL, train_cfg=CFG, stop_after=STOP
            )
        summaries[name, "resumed"] = run(f"{d}/split", layout, resume=True)
    run(f"{out}/changed", LAYOUTS["ep"], model_cfg=MODEL, train_cfg=CFG, stop_after=STOP)
    summaries["changed", "resumed"] = run(f"{out}/changed", LAYOUTS["fsdp"], resume=True)
    torch.save(summaries, os.path.join(out, f"summaries{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_resume")
    corpus = make_corpus(out / "corpus")
    spawn(resume_worker, 2, str(out), str(corpus), [free_port() for _ in range(N_PORTS)])
    return out, [torch.load(out / f"summaries{r}.pt", weights_only=False) for r in range(2)]


def records(run_dir):
    """metrics.jsonl without the timing field."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"} for ln in lines]


def final_state(run_dir) -> dict:
    path = ckpt.latest_checkpoint(run_dir)
    assert path.name == f"step_{STEPS:08d}.pt"
    return ckpt.load_checkpoint(path)


def assert_equal_trees(a, b, what: str) -> None:
    if torch.is_tensor(a):
        assert torch.equal(a, b), what
    elif isinstance(a, np.ndarray):  # numpy's RNG state
        assert np.array_equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_equal_trees(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_trees(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stop_and_resume_equals_straight_run(runs, layout):
    out, summaries = runs
    straight, split = out / layout / "straight", out / layout / "split"
    stopped = summaries[0][layout, "stopped"]
    if layout == NAN_LAYOUT:  # both ranks raised (the NaN was rank 1's), the last good checkpoint kept
        for r in range(2):
            assert "step 3: non-finite" in summaries[r][layout, "stopped"]["error"]
            assert f"step_{STOP:08d}.pt is intact" in summaries[r][layout, "stopped"]["error"]
    elif layout == SIGTERM_LAYOUT:  # rank 1 got the signal; both stopped after the same step
        assert summaries[1][layout, "stopped"]["stopped"] == "SIGTERM"
        assert stopped["stopped"] == "signal on another rank"
    else:
        assert stopped["stopped"] == f"stop_after={STOP}"
    assert layout == NAN_LAYOUT or stopped["step"] == STOP
    assert summaries[0][layout, "resumed"]["step"] == STEPS

    got, want = records(split), records(straight)
    assert [r["step"] for r in want if r["kind"] == "train"] == [1, 2, 3, 4]
    assert got == want  # float equality: bitwise the same losses, grad norms, imbalance
    assert summaries[0][layout, "resumed"]["val"] == summaries[0][layout, "straight"]["val"]
    a, b = final_state(straight), final_state(split)
    for key in ("model", "optimizer", "scheduler", "rng_per_rank"):
        assert_equal_trees(a[key], b[key], key)
    assert a["world_size"] == 2 and a["layout"]["ep"] == LAYOUTS[layout]["ep"]
    # Each rank draws its own router jitter: the ranks' torch RNG streams differ.
    rng0, rng1 = (r["torch"] for r in a["rng_per_rank"])
    assert not torch.equal(rng0, rng1)
    # The interrupted run's checkpoint is the single-process format: full optimizer tensors.
    exp_avg = a["optimizer"]["state"][a["optimizer_params"].index("layers.0.feed_forward.w1")]["exp_avg"]
    assert exp_avg.shape == a["model"]["layers.0.feed_forward.w1"].shape


def test_resume_under_another_layout_matches_to_round_off(runs):
    out, summaries = runs
    want = [r for r in records(out / "ep" / "straight") if r["kind"] == "train"]
    got = [r for r in records(out / "changed") if r["kind"] == "train"]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4)
    assert summaries[0]["changed", "resumed"]["layout"]["data_parallel"] == "fsdp"


def test_resume_with_another_number_of_processes_is_refused(runs):
    out, _ = runs
    with pytest.raises(
        ValueError, match=r"saved by 2 processes \(dp=1 x ep=2, fsdp\), but this run has 1 process"
    ):
        train(out / "ep_fsdp" / "split", resume=True, progress=False)
