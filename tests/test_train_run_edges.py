"""Edges of a run's life: a stop request on its final step, and a resume after a crash that cut the
metrics log mid-line."""

from __future__ import annotations

import json

import pytest

from smoe.train.loop import MetricsLog, train
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


def test_resume_drops_a_cut_off_last_metrics_line(tmp_path, capsys):
    """A crash mid-write leaves a partial last line in metrics.jsonl; resuming failed on it with
    a JSONDecodeError. It is dropped with a warning; a damaged line before the end is an error."""
    log = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    log.write_text("\n".join(good) + '\n{"step": 4, "lo')
    MetricsLog(log, keep_until_step=2).close()
    assert log.read_text() == good[0] + "\n" + good[1] + "\n"
    assert "cut-off last line" in capsys.readouterr().err
    log.write_text(good[0] + "\n{oops\n" + good[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        MetricsLog(log, keep_until_step=2)
