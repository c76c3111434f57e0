"""``smoe train`` under torchrun: two CPU processes (gloo) with expert parallelism.

Reference: the same run in one process with ``grad_accum`` doubled. Rank r takes micro-batch
``m * 2 + r`` of each step, so the two runs see the same data and the same objective (the
mean over all micro-batches of CE + router losses); the logged losses, the load imbalance
(tokens per expert summed over ranks), the final weights and the optimizer state must agree
to fp32 round-off. The EP + FSDP2 run is stopped after step 1 and continued with
``--resume`` under torchrun (tests/test_dist_resume.py checks bitwise equality with an
uninterrupted distributed run for every layout).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import smoe
from smoe import distributed as sd
from smoe.cli.main import main
from smoe.train import checkpoint as ckpt
from smoe.train.config import write_run_file
from smoe.train.export import model_from_run
from smoe.train.loop import train
from smoe.train.optim import build_optimizer
from test_train_loop import MODEL, losses, make_corpus, tcfg

# No router jitter: its noise would differ between the ranks and the single process.
DIST_MODEL = MODEL.replace(router_jitter=0.0)
STEPS, GRAD_ACCUM = 3, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cfg(grad_accum: int):
    return tcfg(steps=STEPS, grad_accum=grad_accum, warmup_steps=1, eval_every=0, ckpt_every=0)


def torchrun_train(tmp_path, corpus, out, *flags) -> subprocess.CompletedProcess:
    """``torchrun -m smoe train`` of the test run; with ``--resume`` in flags, continue ``out``."""
    run_file = tmp_path / "run.json"
    write_run_file(run_file, DIST_MODEL, train_cfg(GRAD_ACCUM))
    source = [] if "--resume" in flags else ["--config", str(run_file), "--data", str(corpus)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "smoe", "train", *source, "--out", str(out), "--no-progress",
        "--dist-timeout", "60", *flags,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The corpus and the single-process run with grad_accum doubled."""
    tmp = tmp_path_factory.mktemp("dist_cli")
    corpus = make_corpus(tmp / "corpus")
    summary = train(tmp / "ref", DIST_MODEL, train_cfg(2 * GRAD_ACCUM), corpus, progress=False)
    return corpus, tmp / "ref", summary


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--ep", "2"), ("--ep", "2", "--fsdp")], ids=["ep2_ddp", "ep2_fsdp"])
def test_torchrun_equals_one_process_with_doubled_grad_accum(tmp_path, reference, flags):
    corpus, ref_dir, ref = reference
    out = tmp_path / "dist"
    if "--fsdp" in flags:  # stop after step 1, then continue the run with --resume
        proc = torchrun_train(tmp_path, corpus, out, *flags, "--stop-after", "1")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "stopped (stop_after=1) after step 1" in proc.stdout
        proc = torchrun_train(tmp_path, corpus, out, *flags, "--resume")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.count("resuming") == 1 and "(step 1 of 3)" in proc.stdout
    else:
        proc = torchrun_train(tmp_path, corpus, out, *flags)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("trained 3 steps") == 1  # only rank 0 reports

    got, want = losses(out), losses(ref_dir)
    assert [s for s, _ in got] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    # Imbalance of the whole global batch: tokens per expert summed over both ranks.
    imbalance = [[r["imbalance"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "train"] for d in (out, ref_dir)]  # fmt: skip
    torch.testing.assert_close(torch.tensor(imbalance[0]), torch.tensor(imbalance[1]), rtol=1e-6, atol=0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["layout"]["ep"] == 2
    for d, v in ref["val"].items():
        assert summary["val"][d] == pytest.approx(v, rel=1e-4)

    # The gathered weights: a Hugging Face directory and the step checkpoint (smoe export).
    model = smoe.load_model(out / "model")
    ref_model = model_from_run(ref_dir)
    from_ckpt = model_from_run(out)
    tokens = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits = ref_model(tokens)
        torch.testing.assert_close(model(tokens), want_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(from_ckpt(tokens), want_logits, rtol=1e-4, atol=1e-4)

    # The checkpoint's optimizer state is the single-process one: same indices, full tensors.
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    ref_state = ckpt.load_checkpoint(ckpt.latest_checkpoint(ref_dir))
    assert state["optimizer_params"] == ref_state["optimizer_params"]
    assert state["optimizer"]["state"].keys() == ref_state["optimizer"]["state"].keys()
    for i, want_i in ref_state["optimizer"]["state"].items():
        for k, v in want_i.items():
            atol = 1e-5 * float(v.abs().max()) + 1e-12
            what = f"optimizer {k} of {ref_state['optimizer_params'][i]}"
            torch.testing.assert_close(state["optimizer"]["state"][i][k], v, rtol=1e-4, atol=atol, msg=what)
    build_optimizer(from_ckpt, train_cfg(2 * GRAD_ACCUM)).load_state_dict(state["optimizer"])

    # Resuming in one process would change the global batch: refused, naming both sides.
    with pytest.raises(
        ValueError, match=r"saved by 2 processes \(dp=1 x ep=2, .*\), but this run has 1 process"
    ):
        train(out, resume=True, progress=False)


def test_parallel_layout_without_torchrun_is_rejected(tmp_path):
    with pytest.raises(sd.MeshError, match="ep=2 does not divide the world size 1"):
        train(tmp_path / "r", MODEL, tcfg(), tmp_path / "corpus", parallel=sd.ParallelConfig(ep=2))
    assert not (tmp_path / "r").exists()  # rejected before anything was written


def test_param_dtype_without_fsdp_is_rejected(tmp_path, capsys):
    """--param-dtype is FSDP2's MixedPrecisionPolicy: DDP would silently train in float32."""
    with pytest.raises(sd.MeshError, match="needs data_parallel='fsdp'"):
        sd.ParallelConfig(ep=2, param_dtype="bf16")
    assert (
        sd.ParallelConfig(ep=2, data_parallel="fsdp", param_dtype="bf16").resolve(2, 4).param_dtype == "bf16"
    )
    corpus = make_corpus(tmp_path / "corpus")
    run_file = tmp_path / "run.json"
    write_run_file(run_file, DIST_MODEL, train_cfg(GRAD_ACCUM))
    argv = ["train", "--config", str(run_file), "--data", str(corpus), "--out", str(tmp_path / "r")]
    assert main([*argv, "--param-dtype", "bf16", "--no-progress"]) == 2
    assert "--param-dtype" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
