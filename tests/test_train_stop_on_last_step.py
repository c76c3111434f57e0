"""A stop request (stop_after or a signal) that lands on the run's final step."""

from __future__ import annotations

import json

from smoe.train.loop import train
from test_train_loop import MODEL, make_corpus, tcfg


def test_stop_after_last_step_completes_the_run(tmp_path):
    """stop_after >= steps (or SIGTERM during the last step): every step ran, so the run is
    complete; it must not be marked stopped and left without plots (a later --resume only
    says "already complete" and never writes them)."""
    corpus = make_corpus(tmp_path / "corpus")
    cfg = tcfg(steps=3, eval_every=0, ckpt_every=0)
    summary = train(tmp_path / "r", MODEL, cfg, corpus, stop_after=3, progress=False)
    assert summary["step"] == 3
    assert summary["stopped"] is None
    assert (tmp_path / "r" / "plots" / "loss.png").is_file()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["stopped"] is None
