"""What --resume does with a run killed after its final checkpoint, and with a corpus that is
not the one the run started on."""

from __future__ import annotations

import json
import shutil

import pytest

from smoe.cli.main import main
from smoe.train import loop
from smoe.train.loop import train
from test_train_loop import MODEL, losses, make_corpus, tcfg


def _no_training(*args, **kwargs):
    raise AssertionError("a training step ran")


def test_resume_after_kill_before_summary_finishes_the_run(tmp_path, monkeypatch):
    """Killed between the final checkpoint and summary.json: the resume used to say "already
    complete" and leave the run without summary.json and plots forever. It writes them from the
    final checkpoint and the logged final validation, without running a step."""
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "r"
    done = train(run, MODEL, tcfg(steps=3, eval_every=0, ckpt_every=0), corpus, progress=False)
    metrics = (run / "metrics.jsonl").read_bytes()
    (run / "summary.json").unlink()
    shutil.rmtree(run / "plots")  # the state of a kill right after the final checkpoint
    monkeypatch.setattr(loop, "train_step", _no_training)
    summary = train(run, resume=True, progress=False)
    assert not summary.get("already_complete")
    assert summary["step"] == 3 and summary["stopped"] is None
    assert summary["val"] == done["val"]
    assert json.loads((run / "summary.json").read_text())["val"] == done["val"]
    assert (run / "plots" / "loss.png").is_file()
    assert (run / "metrics.jsonl").read_bytes() == metrics
    # Now it is complete: a further resume changes nothing.
    assert train(run, resume=True, progress=False)["already_complete"]


def test_resume_with_other_data_is_refused(tmp_path, capsys):
    """--data on --resume was used as given: the run went on silently on another corpus."""
    corpus, other = make_corpus(tmp_path / "corpus"), make_corpus(tmp_path / "other", seed=1)
    run = tmp_path / "r"
    train(run, MODEL, tcfg(), corpus, stop_after=3, progress=False)
    with pytest.raises(ValueError, match=r"--data .*other.* holds other tokens"):
        train(run, corpus_dir=other, resume=True, progress=False)
    assert main(["train", "--resume", "--out", str(run), "--data", str(other), "--no-progress"]) == 2
    assert "--data" in capsys.readouterr().err
    assert [s for s, _ in losses(run)] == [1, 2, 3]  # nothing trained


def test_resume_refuses_a_corpus_rebuilt_in_place(tmp_path):
    """Without --data the resume reads the corpus path from run.json; another corpus built
    there since is refused as well."""
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "r"
    train(run, MODEL, tcfg(), corpus, stop_after=3, progress=False)
    shutil.rmtree(corpus)
    make_corpus(corpus, seed=1)
    with pytest.raises(ValueError, match=r"holds other tokens"):
        train(run, resume=True, progress=False)


def test_resume_from_a_moved_identical_corpus(tmp_path):
    """The corpus is identified by its tokens, not its path: a moved copy resumes exactly."""
    corpus = make_corpus(tmp_path / "corpus")
    straight = tmp_path / "straight"
    train(straight, MODEL, tcfg(), corpus, progress=False)
    run = tmp_path / "r"
    train(run, MODEL, tcfg(), corpus, stop_after=3, progress=False)
    moved = tmp_path / "moved"
    corpus.rename(moved)
    train(run, corpus_dir=moved, resume=True, progress=False)
    assert losses(run) == losses(straight)


@pytest.mark.parametrize("left", ["stopped", "cut"])
def test_resume_finishes_a_run_whose_summary_is_stale_or_cut(tmp_path, monkeypatch, left):
    """summary.json may be there and still not be the finished run's: the one a stop wrote
    ("stopped") before the resume that was killed after its final checkpoint, or one cut
    mid-write by the kill ("cut"). Neither is taken as "already complete"."""
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "r"
    cfg = tcfg(steps=4, eval_every=0, ckpt_every=0)
    train(run, MODEL, cfg, corpus, stop_after=2, progress=False)
    stopped = (run / "summary.json").read_text()
    done = train(run, resume=True, progress=False)
    (run / "summary.json").write_text(stopped if left == "stopped" else stopped[:20])
    shutil.rmtree(run / "plots")
    monkeypatch.setattr(loop, "train_step", _no_training)
    summary = train(run, resume=True, progress=False)
    assert not summary.get("already_complete") and summary["stopped"] is None
    assert json.loads((run / "summary.json").read_text())["val"] == done["val"]
    assert (run / "plots" / "loss.png").is_file()
