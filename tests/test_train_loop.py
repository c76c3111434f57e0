"""The training loop: exact resume, NaN stop, atomic checkpoints, metrics and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smoe.config import ModelConfig
from smoe.data.shards import FORMAT, write_split
from smoe.train import checkpoint as ckpt
from smoe.train import step as step_mod
from smoe.train.config import TrainConfig
from smoe.train.loop import train
from smoe.train.step import NonFiniteLossError

MODEL = ModelConfig(
    dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=64,
    max_seq_len=64, num_experts=4, top_k=2, router_jitter=0.1,
)  # fmt: skip


def make_corpus(path, seed=0, domains=("code", "prose")):
    """Synthetic two-domain corpus: each domain a noisy repeating pattern, so loss can fall."""
    rng = np.random.default_rng(seed)
    manifest = {"format": FORMAT, "vocab_size": 64, "domains": {}}
    for i, d in enumerate(domains):
        entry = {}
        for split, n_docs in (("train", 30), ("val", 6)):
            docs = []
            for _ in range(n_docs):
                base = (np.arange(40) * (i + 2)) % 60 + 3
                noise = rng.integers(3, 64, size=40)
                body = np.where(rng.random(40) < 0.2, noise, base)
                docs.append([1, *body.tolist(), 2])
            entry[split] = write_split(path / d, split, docs)
        manifest["domains"][d] = entry
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def tcfg(**kw):
    base = dict(
        steps=6, batch_size=2, seq_len=16, grad_accum=2, lr=3e-3, warmup_steps=2, eval_every=3,
        eval_batches=1, ckpt_every=3, keep_last=2, log_every=1,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]


def test_exact_resume_bitwise(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    straight = train(tmp_path / "a", MODEL, tcfg(), corpus, progress=False)
    part = train(tmp_path / "b", MODEL, tcfg(), corpus, stop_after=3, progress=False)
    assert part["stopped"] == "stop_after=3" and part["step"] == 3
    assert [s for s, _ in losses(tmp_path / "b")] == [1, 2, 3]
    resumed = train(tmp_path / "b", resume=True, progress=False)
    assert resumed["step"] == 6
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == 6 and la == lb  # float equality: bitwise identical
    assert resumed["val"] == straight["val"]
    sa = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "a"))["model"]
    sb = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b"))["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # The loss did fall and the run wrote its plots and summary.
    assert la[-1][1] < la[0][1]
    assert {p.rsplit("/", 1)[-1] for p in straight["plots"]} == {"loss.png", "lr.png", "imbalance.png"}
    assert set(straight["val"]) == {"code", "prose"}


def test_keep_last_and_refuse_overwrite(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    train(tmp_path / "r", MODEL, tcfg(steps=9, ckpt_every=2, eval_every=0), corpus, progress=False)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "r")]
    assert names == ["step_00000008.pt", "step_00000009.pt"]
    with pytest.raises(ValueError, match="--resume"):
        train(tmp_path / "r", MODEL, tcfg(), corpus, progress=False)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "corpus")
    real_forward = step_mod.forward_loss
    calls = {"n": 0}

    def poisoned(model, batch, cfg):
        calls["n"] += 1
        parts = real_forward(model, batch, cfg)
        if calls["n"] > 2 * 4:  # grad_accum=2: step 5 onwards
            parts.total = parts.total * float("nan")
            parts.ce = parts.ce * float("nan")
        return parts

    monkeypatch.setattr(step_mod, "forward_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 5: .*loss=nan.*step_00000003\.pt is intact"):
        train(tmp_path / "r", MODEL, tcfg(), corpus, progress=False)
    good = ckpt.latest_checkpoint(tmp_path / "r")
    assert good.name == "step_00000003.pt"
    state = ckpt.load_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    monkeypatch.setattr(step_mod, "forward_loss", real_forward)
    assert train(tmp_path / "r", resume=True, progress=False)["step"] == 6


def test_checkpoint_survives_kill_mid_write(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = ckpt.save_checkpoint(run, 1, {"x": torch.arange(3)}, keep_last=2)

    def crash(src, dst):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run, 2, {"x": torch.arange(5)}, keep_last=2)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(run) == first
    assert torch.equal(ckpt.load_checkpoint(first)["x"], torch.arange(3))
    # A hard kill leaves a partial temporary behind: it is never taken for a checkpoint,
    # and the next save removes it.
    partial = ckpt.checkpoint_dir(run) / ".step_00000002.pt.999.tmp"
    partial.write_bytes(b"PK\x03\x04 truncated")
    assert ckpt.list_checkpoints(run) == [first]
    ckpt.save_checkpoint(run, 2, {"x": torch.arange(5)}, keep_last=2)
    assert not partial.exists() and len(ckpt.list_checkpoints(run)) == 2
    # A truncated file under a real name is reported, not half-loaded.
    bad = ckpt.checkpoint_dir(run) / "step_00000003.pt"
    bad.write_bytes(ckpt.latest_checkpoint(run).read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable"):
        ckpt.load_checkpoint(bad)


def test_train_config_validation():
    with pytest.raises(ValueError, match="'steps'"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="'dtype'"):
        TrainConfig(dtype="fp16")
    with pytest.raises(ValueError, match="unknown train fields"):
        TrainConfig.from_dict({"stepz": 3})


@pytest.mark.parametrize("dispatch", ["reference", "auto"])
def test_bf16_autocast_step_keeps_fp32_master(tmp_path, dispatch):
    """bf16 autocast trains with float32 weights and optimizer state, and tracks fp32 closely."""
    corpus = make_corpus(tmp_path / "corpus")
    cfg = tcfg(steps=2, eval_every=0, ckpt_every=0)
    model_cfg = MODEL.replace(dispatch=dispatch, router_jitter=0.0)
    fp32 = train(tmp_path / "fp32", model_cfg, cfg, corpus, progress=False)
    bf16 = train(
        tmp_path / "bf16",
        model_cfg,
        tcfg(steps=2, eval_every=0, ckpt_every=0, dtype="bf16"),
        corpus,
        progress=False,
    )
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "bf16"))
    assert all(v.dtype == torch.float32 for v in state["model"].values())
    exp_avg = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert exp_avg and all(t.dtype == torch.float32 for t in exp_avg)
    for d in fp32["val"]:
        assert bf16["val"][d] == pytest.approx(fp32["val"][d], rel=0.02)


def test_corpus_vocabulary_larger_than_the_model_is_refused(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    small = MODEL.replace(vocab_size=32)  # the corpus says 64
    with pytest.raises(ValueError, match="vocabulary of 64, larger than the model's vocab_size=32"):
        train(tmp_path / "run", small, tcfg(), corpus)
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


@pytest.mark.parametrize("dispatch", ["reference", "auto"])
def test_library_bf16_step_on_an_unwrapped_model(dispatch):
    """train_step with dtype="bf16" on a plain model (no loop, so no engine wrapping by the
    caller): the engines mixed float32 and bf16 under autocast and failed; now the step wraps
    them and trains like the loop does."""
    from smoe.model.transformer import build_model
    from smoe.train.data import Batch
    from smoe.train.optim import build_optimizer, build_scheduler
    from smoe.train.precision import BF16Engine

    model = build_model(MODEL.replace(dispatch=dispatch, router_jitter=0.0), seed=0)
    cfg = tcfg(steps=2, dtype="bf16")
    opt = build_optimizer(model, cfg)
    x = torch.randint(0, MODEL.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    metrics = step_mod.train_step(model, opt, build_scheduler(opt, cfg), [Batch(x[:, :-1], x[:, 1:])], cfg)
    assert np.isfinite(metrics["loss"])
    assert all(isinstance(b.feed_forward.engine, BF16Engine) for b in model.layers)
    assert all(p.dtype == torch.float32 for p in model.parameters())
