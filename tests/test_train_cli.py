"""`smoe train` flags: --init with --config, what --resume refuses, resuming a finished run."""

from __future__ import annotations

import json

import pytest

import smoe
from smoe.cli.main import main
from test_train_loop import MODEL, losses, make_corpus

# Every runtime field away from its default, so that dropping any of them changes the losses.
RUNTIME = dict(router_jitter=0.1, capacity_factor=1.0, dispatch="reference")
TRAIN = dict(steps=4, batch_size=2, seq_len=16, warmup_steps=1, eval_every=0, eval_batches=1, log_every=1)


def _run_file(path, model=None, **train):
    path.write_text(
        json.dumps({"model": (model or MODEL.replace(**RUNTIME)).to_dict(), "train": {**TRAIN, **train}})
    )
    return path


def _train(*args):
    return main(["train", *map(str, args), "--no-progress"])


def test_init_with_config_applies_runtime_fields(tmp_path):
    """A checkpoint does not store jitter, capacity factor or engine, so --config may set them:
    training from a saved copy of the seed-0 init then equals a fresh seed-0 run of the config."""
    corpus = make_corpus(tmp_path / "corpus")
    run_file = _run_file(tmp_path / "run.json")
    smoe.save_model(smoe.build_model(MODEL, seed=0), tmp_path / "init")  # saved without RUNTIME
    assert _train("--config", run_file, "--data", corpus, "--out", tmp_path / "fresh") == 0
    assert (
        _train("--config", run_file, "--init", tmp_path / "init", "--data", corpus, "--out", tmp_path / "r")
        == 0
    )
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["model"]
    assert {k: saved[k] for k in RUNTIME} == RUNTIME
    assert losses(tmp_path / "r") == losses(tmp_path / "fresh")


def test_init_with_other_architecture_names_the_fields(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    run_file = _run_file(tmp_path / "run.json", MODEL.replace(n_layers=3, top_k=1, **RUNTIME))
    smoe.save_model(smoe.build_model(MODEL, seed=0), tmp_path / "init")
    assert (
        _train("--config", run_file, "--init", tmp_path / "init", "--data", corpus, "--out", tmp_path / "r")
        == 2
    )
    err = capsys.readouterr().err
    assert "n_layers=2 vs 3" in err and "top_k=2 vs 1" in err and "router_jitter" not in err.split("(only")[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag", [["--dispatch", "sorted"], ["--lr", "0.1"]])
def test_resume_refuses_dispatch_like_other_settings(tmp_path, capsys, flag):
    corpus = make_corpus(tmp_path / "corpus")
    run_file = _run_file(tmp_path / "run.json")
    out = tmp_path / "r"
    assert _train("--config", run_file, "--data", corpus, "--out", out, "--stop-after", "2") == 0
    config = (out / "config.json").read_text()
    assert _train("--resume", "--out", out, *flag) == 2
    assert f"drop {flag[0]}" in capsys.readouterr().err
    assert (out / "config.json").read_text() == config
    assert [s for s, _ in losses(out)] == [1, 2]  # nothing trained


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "r"
    assert _train("--config", _run_file(tmp_path / "run.json"), "--data", corpus, "--out", out) == 0
    before = {n: (out / n).read_bytes() for n in ("summary.json", "metrics.jsonl")}
    assert json.loads(before["summary.json"])["val"]  # the finished run's validation
    capsys.readouterr()
    assert _train("--resume", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "already complete (step 4 of 4)" in printed and str(out / "summary.json") in printed
    assert {n: (out / n).read_bytes() for n in before} == before


def test_init_runtime_fields_keep_tied_embeddings(tmp_path):
    """The model is rebuilt to take the run's runtime fields; a tied head must stay tied."""
    import torch

    from smoe.train.init import load_init_model

    cfg = MODEL.replace(tie_embeddings=True)
    init = smoe.build_model(cfg, seed=0).eval()
    smoe.save_model(init, tmp_path / "init")
    model = load_init_model(tmp_path / "init", cfg.replace(capacity_factor=2.0))
    assert model.output.weight is model.tok_embeddings.weight
    assert model.layers[0].feed_forward.capacity_factor == 2.0
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), init(tokens), rtol=0, atol=0)


def test_init_seq_len_is_checked_against_the_checkpoint(tmp_path, capsys):
    """Without --config the model is the checkpoint's: --seq-len must fit its max_seq_len (64
    here), not the default preset's (1024)."""
    corpus = make_corpus(tmp_path / "corpus")
    smoe.save_model(smoe.build_model(MODEL, seed=0), tmp_path / "init")
    assert MODEL.max_seq_len == 64
    assert (
        _train("--init", tmp_path / "init", "--data", corpus, "--out", tmp_path / "r", "--seq-len", 128) == 2
    )
    assert "--seq-len 128 exceeds the model's max_seq_len 64" in capsys.readouterr().err
