"""A `smoe train` process killed with SIGKILL resumes to the same losses; SIGTERM saves first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from smoe.train import checkpoint as ckpt
from smoe.train.loop import train
from test_train_loop import MODEL, losses, make_corpus, tcfg


def _start(tmp_path, corpus, run):
    cfg = tmp_path / "cfg.json"
    train_cfg = tcfg(steps=400, ckpt_every=2, eval_every=0, keep_last=3).to_dict()
    cfg.write_text(json.dumps({"model": MODEL.to_dict(), "train": train_cfg}))
    cmd = [
        sys.executable,
        "-m",
        "smoe",
        "train",
        "--config",
        str(cfg),
        "--data",
        str(corpus),
        "--out",
        str(run),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd + ["--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stdout.read().decode()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.1)


@pytest.mark.slow
def test_sigkill_then_resume_matches_straight_run(tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess runs one thread too: same kernels, same bits
    try:
        _kill_resume(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _kill_resume(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "killed"
    proc = _start(tmp_path, corpus, run)
    _wait_for(lambda: ckpt.latest_checkpoint(run) is not None, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["step"]
    stop = resumed_from + 3
    train(run, resume=True, stop_after=stop, progress=False)
    straight = tmp_path / "straight"
    model_cfg, train_cfg = MODEL, tcfg(steps=400, ckpt_every=2, eval_every=0, keep_last=3)
    train(straight, model_cfg, train_cfg, corpus, stop_after=stop, progress=False)
    assert losses(run)[:stop] == losses(straight)[:stop] and len(losses(straight)) == stop


@pytest.mark.slow
def test_sigterm_saves_then_exits(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    proc = _start(tmp_path, corpus, run)
    _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(losses(run)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped (SIGTERM)" in out
    last = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert last["step"] == losses(run)[-1][0]  # saved at the step it stopped, not an older one
