"""The training run: build or resume, step, log, validate, checkpoint, plot.

``RUN_DIR`` after a run::

    config.json           model + train config (what --resume reads)
    run.json              the corpus used: its path, and its tokens' SHA-256 (checked on resume)
    metrics.jsonl         {"kind": "train", "step", "loss", "lr", "tokens_per_s", "imbalance": [per layer], ...}
                          {"kind": "val", "step", "val": {domain: loss}}
    checkpoints/step_*.pt the newest train states (see checkpoint.py)
    plots/*.png           loss, learning rate, load imbalance per layer
    summary.json          final step, final validation loss per domain, timing
    model/                (distributed runs only) the final weights as a Hugging Face directory

Under ``torchrun`` (WORLD_SIZE > 1) the run is data/expert parallel (``smoe.distributed``):
rank r of N takes micro-batch ``m * N + r`` of each step, so the run equals a single process
with ``grad_accum * N`` micro-batches. Rank 0 alone logs and writes files. Checkpoints hold the
gathered full weights and optimizer state in the single-process format plus every rank's RNG
states (see state.py), so ``--resume`` under torchrun with the same number of processes
continues the run exactly (docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from smoe import distributed as sd
from smoe.config import ModelConfig
from smoe.data.shards import Corpus
from smoe.model.transformer import Transformer, build_model
from smoe.train import checkpoint as ckpt
from smoe.train import state as train_state
from smoe.train.config import TrainConfig, load_run_file, write_run_file
from smoe.train.data import TrainSampler, check_same_corpus, corpus_fingerprint, val_batches
from smoe.train.optim import build_optimizer, build_scheduler
from smoe.train.precision import wrap_engines_for_autocast
from smoe.train.step import NonFiniteLossError, eval_loss, imbalance, train_step

# Rank r seeds cfg.seed + r * stride: with seed + r, rank 1 of seed 0 would replay rank 0 of seed 1.
RANK_SEED_STRIDE = 1_000_003


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


def _records(path: Path, lines: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The log's complete records, each with its line. A last line that is not JSON was cut
    mid-write by the crash being resumed from: it is dropped, with a warning. A damaged line
    before it is an error."""
    out = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            out.append((ln, json.loads(ln)))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON record; the metrics log is damaged") from None
            print(f"warning: {path}: dropping its cut-off last line {ln[:60]!r}", file=sys.stderr)
    return out


class MetricsLog:
    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        self.val_steps: set[int] = set()  # steps with a validation record
        if keep_until_step is None:
            path.write_text("")
        else:  # resuming: drop what the interrupted run logged after its checkpoint
            lines = path.read_text().splitlines() if path.exists() else []
            kept = [(ln, r) for ln, r in _records(path, lines) if r["step"] <= keep_until_step]
            path.write_text("".join(ln + "\n" for ln, _ in kept))
            self.val_steps = {r["step"] for _, r in kept if r.get("kind") == "val"}
        self.f = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _open_corpus(corpus_dir, model_cfg: ModelConfig) -> Corpus:
    corpus = Corpus(corpus_dir)
    corpus_vocab = corpus.manifest.get("vocab_size")
    if corpus_vocab is not None and int(corpus_vocab) > model_cfg.vocab_size:
        raise ValueError(
            f"{corpus.path}: the corpus was tokenized with a vocabulary of {corpus_vocab}, larger than "
            f"the model's vocab_size={model_cfg.vocab_size}; its token ids would not fit the embedding"
        )
    return corpus


def _prepare(run_dir: Path, model_cfg, train_cfg, corpus_dir, resume: bool):
    """The run's model and train configs and its corpus, checked; writes nothing (see
    ``_write_run``), so that a bad layout found afterwards leaves no run directory behind."""
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
        run = json.loads(run_file.read_text())
        corpus = _open_corpus(corpus_dir if corpus_dir is not None else run["corpus"], saved_model)
        check_same_corpus(run, corpus, run_file, given=corpus_dir is not None)
        return saved_model, saved_train, corpus
    if ckpt.list_checkpoints(run_dir):
        raise ValueError(
            f"{run_dir}: already holds checkpoints; pass --resume to continue it or choose another --out"
        )
    if model_cfg is None or train_cfg is None or corpus_dir is None:
        raise ValueError("a new run needs a model config, a train config and a corpus")
    return model_cfg, train_cfg, _open_corpus(corpus_dir, model_cfg)


def _write_run(run_dir: Path, model_cfg, train_cfg, corpus: Corpus) -> None:
    """config.json and run.json of a new run (what ``--resume`` reads back)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_file(run_dir / "config.json", model_cfg, train_cfg)
    fingerprint = corpus_fingerprint(corpus)
    run = {
        "corpus": str(Path(corpus.path).resolve()),
        "corpus_sha256": fingerprint["sha256"],
        "corpus_tokens": fingerprint["tokens"],
    }
    (run_dir / "run.json").write_text(json.dumps(run) + "\n")


class _NoLog:
    """What ranks other than the main one log to."""

    val_steps: frozenset[int] = frozenset()

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _distributed_world(parallel: sd.ParallelConfig | None) -> int:
    """The world size torchrun launched (1 without torchrun); starts the process group if > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if sd.launched_by_torchrun() else 1
    if world > 1:
        sd.init_distributed((parallel or sd.ParallelConfig()).timeout_s)
    elif parallel is not None:
        parallel.resolve(1, 1)  # reject e.g. --ep 2 without torchrun before any work
    return world


def train(
    run_dir: str | Path,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    corpus_dir: str | Path | None = None,
    resume: bool = False,
    init_model: Transformer | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    parallel: sd.ParallelConfig | None = None,
) -> dict[str, Any]:
    """Train (or with ``resume=True`` continue) the run in ``run_dir``; returns the summary.

    ``init_model`` starts from given weights (e.g. an upcycled checkpoint) instead of a fresh
    init. ``stop_after=N`` saves a checkpoint and stops after step N, as SIGINT/SIGTERM do.
    ``parallel`` is the layout (dp, ep, ddp/fsdp) used when launched by torchrun with more
    than one process; without torchrun it must be the 1 x 1 default. Resuming a run that
    already finished changes nothing and returns its summary, marked ``already_complete``; one
    killed after its final checkpoint but before summary.json gets its validation, plots,
    model/ and summary from that checkpoint, without a training step (marked
    ``finished_from_checkpoint``).
    """
    world = _distributed_world(parallel)
    try:
        return _train(run_dir, model_cfg, train_cfg, corpus_dir, resume, init_model, stop_after, progress,
                      parallel or sd.ParallelConfig(), world)  # fmt: skip
    finally:
        if world > 1:
            sd.shutdown()


def _train(
    run_dir, model_cfg, train_cfg, corpus_dir, resume, init_model, stop_after, progress, parallel, world
):
    run_dir = Path(run_dir)
    main, rank = sd.is_main(), sd.rank()
    model_cfg, cfg, corpus = _prepare(run_dir, model_cfg, train_cfg, corpus_dir, resume)
    # Every rank checks the layout (e.g. --ep 4 on 2 ranks) and the device before the main rank
    # writes the run's files: a run that cannot start leaves no directory to clean up.
    layout = parallel.resolve(world, model_cfg.num_experts) if world > 1 else None
    saved, path = None, None
    if resume:  # every rank reads the same (full) checkpoint
        path = ckpt.latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"{ckpt.checkpoint_dir(run_dir)}: no checkpoint to resume from")
        saved = ckpt.load_checkpoint(path)
        # Refuse another layout first: "already complete" must not hide a wrong command line.
        train_state.check_resumable(saved, path, world, dataclasses.asdict(layout) if layout else None)
        if saved["step"] >= cfg.steps and (summary := _final_summary(run_dir, saved["step"])):
            return _already_complete(run_dir, summary, cfg.steps, main)
    device = torch.device(cfg.device)
    if world > 1:
        device = sd.local_device()
        if device.type != torch.device(cfg.device).type:
            raise ValueError(
                f"train config device={cfg.device!r}, but this torchrun rank runs on {device} "
                f"({torch.distributed.get_backend()}); pass --device {device.type}"
            )
    if main and not resume:
        _write_run(run_dir, model_cfg, cfg, corpus)
    if init_model is not None:
        if init_model.config != model_cfg:
            raise ValueError(f"init model config {init_model.config} differs from the run's {model_cfg}")
        model = init_model.to(device=device, dtype=torch.float32)
    else:  # the same seed on every rank: parallelize expects the same full model everywhere
        model = build_model(model_cfg, device=device, dtype=torch.float32, seed=cfg.seed)
    if saved is not None:  # the full weights, before parallelize cuts each rank's piece
        model.load_state_dict(saved["model"])
    model = sd.parallelize(model, parallel)  # unchanged with one process
    if cfg.dtype == "bf16":
        wrap_engines_for_autocast(model)  # after parallelize: bf16 outside the EP engine
    # The global RNG drives router jitter only (init and data have their own generators). One
    # stream per rank, or every rank would draw the same noise for its own tokens; rank 0 keeps
    # the single-process stream. A resume restores each rank's state from the checkpoint.
    torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * rank)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    sampler = TrainSampler(corpus, cfg.seq_len, cfg.batch_size, cfg.seed)
    val = {
        d: [b.to(device) for b in val_batches(corpus, d, cfg.seq_len, cfg.batch_size, cfg.eval_batches)]
        for d in corpus.domains
    }

    start = 0
    if saved is not None:
        start = train_state.restore(model, optimizer, scheduler, sampler, saved, path, world, rank)
        if main:
            print(f"resuming {run_dir} from {path.name} (step {start} of {cfg.steps})")
            was = train_state.describe(world, saved.get("layout"))
            now = train_state.describe(world, dataclasses.asdict(layout) if layout else None)
            if was != now:  # allowed: the checkpoint holds whole tensors
                print(f"layout changed: saved by {was}, now {now} (equal up to float32 round-off)")
        del saved  # the full tensors: each rank keeps only its pieces
    log = (
        MetricsLog(run_dir / "metrics.jsonl", keep_until_step=start if resume else None) if main else _NoLog()
    )

    def save(step: int) -> Path:
        # Distributed: the full weights and optimizer state are gathered (a collective on every
        # rank) and rank 0 writes them in the single-process format (see state.py).
        state = train_state.capture(model, optimizer, scheduler, sampler, model_cfg, cfg, world, layout)
        path = ckpt.checkpoint_dir(run_dir) / f"step_{step:08d}.pt"
        if main:
            path = ckpt.save_checkpoint(run_dir, step, state, cfg.keep_last)
        sd.barrier()
        return path

    def validate(step: int) -> dict[str, float]:
        # Every rank evaluates the same batches (expert parallelism needs all ranks in the forward).
        losses = {d: eval_loss(model, batches, cfg) for d, batches in val.items()}
        if step not in log.val_steps:  # a run finished on resume may have logged it already
            log.write({"kind": "val", "step": step, "val": losses})
        return losses

    def say(msg: str) -> None:
        if main:
            bar.write(msg)

    flag, stopped, last_saved, val_losses = _StopFlag(), None, start, {}
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    finishing = start >= cfg.steps  # killed after its final checkpoint: the loop below is empty
    try:
        if finishing:
            say(f"step {start} of {cfg.steps} was saved, but not the run's results: writing them")
            val_losses = validate(start)
        with _catch_signals(flag):
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                # Rank r of N: micro-batches r, N + r, 2N + r, ... (one process: 0, 1, 2, ...).
                micro = [sampler.batch(step, m * world + rank).to(device) for m in range(cfg.grad_accum)]
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
                signalled = flag.signal is not None
                counts_LE = metrics.pop("tokens_per_expert", None)
                if world > 1:
                    signalled = _reduce_over_ranks(metrics, counts_LE, signalled, world, device)
                done = step + 1
                tok_s = cfg.tokens_per_step * world / (time.perf_counter() - t0)
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
                    say(f"step {done}: val " + " ".join(f"{d}={v:.3f}" for d, v in val_losses.items()))
                # A stop request on the last step changes nothing: the run is complete (its final
                # checkpoint, plots and distributed model/ are written as for any finished run).
                stop_now = done < cfg.steps and (signalled or (stop_after is not None and done >= stop_after))
                if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps or stop_now:
                    save(done)
                    last_saved = done
                if stop_now:
                    stopped = flag.signal or (
                        "signal on another rank" if signalled else f"stop_after={stop_after}"
                    )
                    how = "continue with --resume" + (f" under {world} processes" if world > 1 else "")
                    say(f"stopped ({stopped}) after step {done}; checkpoint saved, {how}")
                    break
        if world > 1 and stopped is None:
            sd.save_distributed(model, run_dir / "model")
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
    if finishing:
        summary["finished_from_checkpoint"] = True
    if world > 1:
        summary.update(world_size=world, layout=dataclasses.asdict(layout))
    if not main:
        return summary
    if stopped is None:
        from smoe.train.plots import plot_run  # matplotlib only when a run finishes

        summary["plots"] = [str(p) for p in plot_run(run_dir)]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _final_summary(run_dir: Path, step: int) -> dict[str, Any] | None:
    """summary.json if it is that of the run finished at ``step``. It is written last, so a run
    killed after its final checkpoint lacks it, holds one cut mid-write, or still holds the one
    an earlier stop wrote; then the run's end-of-run work is still to do."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    done = isinstance(summary, dict) and summary.get("step") == step and summary.get("stopped") is None
    return summary if done else None


def _already_complete(run_dir: Path, summary: dict[str, Any], steps: int, main: bool) -> dict[str, Any]:
    """The summary of a finished run, which --resume leaves as it is."""
    if main:
        print(
            f"{run_dir}: already complete (step {summary['step']} of {steps}); nothing to train. "
            f"Its results: {run_dir / 'summary.json'}, {run_dir / 'metrics.jsonl'}, {run_dir / 'plots'}/"
        )
    return summary | {"already_complete": True}


def _reduce_over_ranks(
    metrics: dict, counts_LE: list | None, signalled: bool, world: int, device: torch.device
) -> bool:
    """One all_reduce per step: replace this rank's loss terms by their mean over ranks (the
    loss of the whole global batch) and ``imbalance`` by that of the tokens per expert summed
    over ranks, in place; returns whether any rank was signalled, so that all stop at the same
    step. ``grad_norm`` is already global."""
    keys = [k for k in ("loss", "balance_loss", "z_loss") if k in metrics]
    parts = [torch.tensor([float(metrics[k]) for k in keys] + [float(signalled)], dtype=torch.float64)]
    if counts_LE is not None:
        parts.append(torch.tensor(counts_LE, dtype=torch.float64).reshape(-1))
    t = torch.cat(parts).to(device)
    torch.distributed.all_reduce(t)
    values = t.cpu()
    for k, v in zip(keys, values[: len(keys)].tolist()):
        metrics[k] = v / world
    if counts_LE is not None:
        summed_LE = values[len(keys) + 1 :].reshape(len(counts_LE), -1)
        metrics["imbalance"] = imbalance(summed_LE).tolist()
    return bool(values[len(keys)] > 0)
