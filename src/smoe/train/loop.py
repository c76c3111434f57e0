"""The training run: build or resume, step, log, validate, checkpoint, plot.

``RUN_DIR`` after a run::

    config.json           model + train config (what --resume reads)
    run.json              the corpus used
    metrics.jsonl         {"kind": "train", "step", "loss", "lr", "tokens_per_s", "imbalance": [per layer], ...}
                          {"kind": "val", "step", "val": {domain: loss}}
    checkpoints/step_*.pt the newest train states (see checkpoint.py)
    plots/*.png           loss, learning rate, load imbalance per layer
    summary.json          final step, final validation loss per domain, timing
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from smoe.config import ModelConfig
from smoe.data.shards import Corpus
from smoe.model.transformer import Transformer, build_model
from smoe.train import checkpoint as ckpt
from smoe.train.config import TrainConfig, load_run_file, write_run_file
from smoe.train.data import TrainSampler, val_batches
from smoe.train.optim import build_optimizer, build_scheduler
from smoe.train.precision import wrap_engines_for_autocast
from smoe.train.step import NonFiniteLossError, eval_loss, train_step


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves a checkpoint after the current step and exits."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name


@contextmanager
def _catch_signals(flag: _StopFlag):
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    old = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class MetricsLog:
    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if keep_until_step is None:
            path.write_text("")
        else:  # resuming: drop what the interrupted run logged after its checkpoint
            lines = path.read_text().splitlines() if path.exists() else []
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= keep_until_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.f = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _prepare(run_dir: Path, model_cfg, train_cfg, corpus_dir, resume: bool):
    config_file, run_file = run_dir / "config.json", run_dir / "run.json"
    if resume:
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: nothing to resume (no run config in {run_dir})")
        saved_model, saved_train = load_run_file(config_file)
        for name, given, saved in (("model", model_cfg, saved_model), ("train", train_cfg, saved_train)):
            if given is not None and given != saved:
                raise ValueError(
                    f"--resume: the given {name} config differs from {config_file}; drop it or use a new --out"
                )
        if corpus_dir is None:
            corpus_dir = json.loads(run_file.read_text())["corpus"]
        return saved_model, saved_train, Path(corpus_dir)
    if ckpt.list_checkpoints(run_dir):
        raise ValueError(
            f"{run_dir}: already holds checkpoints; pass --resume to continue it or choose another --out"
        )
    if model_cfg is None or train_cfg is None or corpus_dir is None:
        raise ValueError("a new run needs a model config, a train config and a corpus")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_file(config_file, model_cfg, train_cfg)
    run_file.write_text(json.dumps({"corpus": str(Path(corpus_dir).resolve())}) + "\n")
    return model_cfg, train_cfg, Path(corpus_dir)


def train(
    run_dir: str | Path,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    corpus_dir: str | Path | None = None,
    resume: bool = False,
    init_model: Transformer | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or with ``resume=True`` continue) the run in ``run_dir``; returns the summary.

    ``init_model`` starts from given weights (e.g. an upcycled checkpoint) instead of a fresh
    init. ``stop_after=N`` saves a checkpoint and stops after step N, as SIGINT/SIGTERM do.
    """
    run_dir = Path(run_dir)
    model_cfg, cfg, corpus_dir = _prepare(run_dir, model_cfg, train_cfg, corpus_dir, resume)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    if init_model is not None:
        if init_model.config != model_cfg:
            raise ValueError(f"init model config {init_model.config} differs from the run's {model_cfg}")
        model = init_model.to(device=device, dtype=torch.float32)
    else:
        model = build_model(model_cfg, device=device, dtype=torch.float32, seed=cfg.seed)
    if cfg.dtype == "bf16":
        wrap_engines_for_autocast(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    corpus = Corpus(corpus_dir)
    sampler = TrainSampler(corpus, cfg.seq_len, cfg.batch_size, cfg.seed)
    val = {
        d: [b.to(device) for b in val_batches(corpus, d, cfg.seq_len, cfg.batch_size, cfg.eval_batches)]
        for d in corpus.domains
    }

    start = 0
    if resume:
        path = ckpt.latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"{ckpt.checkpoint_dir(run_dir)}: no checkpoint to resume from")
        state = ckpt.load_checkpoint(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.check_state(state["data"], str(path))
        ckpt.set_rng_state(state["rng"])
        start = state["step"]
        print(f"resuming {run_dir} from {path.name} (step {start} of {cfg.steps})")
    log = MetricsLog(run_dir / "metrics.jsonl", keep_until_step=start if resume else None)

    def save(step: int) -> Path:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": sampler.state_dict(),
            "rng": ckpt.rng_state(),
            "model_config": model_cfg.to_dict(),
            "train_config": cfg.to_dict(),
        }
        return ckpt.save_checkpoint(run_dir, step, state, cfg.keep_last)

    def validate(step: int) -> dict[str, float]:
        losses = {d: eval_loss(model, batches, cfg) for d, batches in val.items()}
        log.write({"kind": "val", "step": step, "val": losses})
        return losses

    flag, stopped, last_saved, val_losses = _StopFlag(), None, start, {}
    bar = tqdm(
        total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True
    )
    t_start = time.perf_counter()
    try:
        with _catch_signals(flag):
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                micro = [sampler.batch(step, m).to(device) for m in range(cfg.grad_accum)]
                try:
                    metrics = train_step(model, optimizer, scheduler, micro, cfg)
                except NonFiniteLossError as e:
                    good = ckpt.latest_checkpoint(run_dir)
                    where = (
                        f"the last good checkpoint {good} is intact"
                        if good
                        else "no checkpoint was written yet"
                    )
                    raise NonFiniteLossError(
                        f"step {step + 1}: {e}. Stopping; {where}. Try a lower lr or more warmup."
                    ) from None
                done = step + 1
                tok_s = cfg.tokens_per_step / (time.perf_counter() - t0)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    log.write({"kind": "train", "step": done, **metrics, "tokens_per_s": tok_s})
                imb = max(metrics.get("imbalance", [1.0]))
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    tok_s=f"{tok_s:.0f}",
                    lr=f"{metrics['lr']:.2e}",
                    imb=f"{imb:.2f}",
                )
                bar.update(1)
                if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                    val_losses = validate(done)
                    bar.write(f"step {done}: val " + " ".join(f"{d}={v:.3f}" for d, v in val_losses.items()))
                stop_now = flag.signal is not None or (stop_after is not None and done >= stop_after)
                if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps or stop_now:
                    save(done)
                    last_saved = done
                if stop_now:
                    stopped = flag.signal or f"stop_after={stop_after}"
                    bar.write(
                        f"stopped ({stopped}) after step {done}; checkpoint saved, continue with --resume"
                    )
                    break
    finally:
        bar.close()
        log.close()
    summary = {
        "run_dir": str(run_dir),
        "step": last_saved,
        "steps": cfg.steps,
        "stopped": stopped,
        "val": val_losses,
        "train_seconds": time.perf_counter() - t_start,
        "params": model_cfg.num_params(),
        "active_params": model_cfg.num_params(active=True),
    }
    if stopped is None:
        from smoe.train.plots import plot_run  # matplotlib only when a run finishes

        summary["plots"] = [str(p) for p in plot_run(run_dir)]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
