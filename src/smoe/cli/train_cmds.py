"""``smoe train`` (train or resume a run), ``smoe export`` (a run's checkpoint as a Hugging
Face / Mistral model) and ``smoe upcycle`` (a dense checkpoint into a mixture of experts)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys

from smoe import distributed as sd
from smoe.cli.types import device
from smoe.config import PRESETS, ModelConfig

# Command-line overrides of TrainConfig fields: flag -> (field, type).
_OVERRIDES = {
    "--steps": ("steps", int),
    "--batch-size": ("batch_size", int),
    "--seq-len": ("seq_len", int),
    "--grad-accum": ("grad_accum", int),
    "--lr": ("lr", float),
    "--warmup-steps": ("warmup_steps", int),
    "--aux-loss-coef": ("aux_loss_coef", float),
    "--z-loss-coef": ("z_loss_coef", float),
    "--dtype": ("dtype", str),
    "--device": ("device", device),
    "--eval-every": ("eval_every", int),
    "--log-every": ("log_every", int),
    "--ckpt-every": ("ckpt_every", int),
    "--keep-last": ("keep_last", int),
    "--seed": ("seed", int),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a token corpus (or --resume a run)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="model preset (train settings from flags)")
    src.add_argument("--config", help='run file: {"model": {...}, "train": {...}} (see smoe.train.config)')
    p.add_argument(
        "--data",
        help="corpus directory from `smoe data build` (on --resume: run.json's, or a copy with the same tokens)",
    )
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, plots)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    p.add_argument(
        "--init", help="start from this model checkpoint (e.g. an upcycled one) instead of a fresh init"
    )
    p.add_argument("--dispatch", help="dispatch engine for this run (overrides the model config)")
    p.add_argument("--stop-after", type=int, help="save and stop after this step (as SIGTERM does)")
    p.add_argument("--aux-loss-per-layer", action="store_true", help="balance each layer separately")
    for flag, (_, typ) in _OVERRIDES.items():
        p.add_argument(flag, type=typ)
    p.add_argument("--no-progress", action="store_true")
    sd.add_parallel_args(p)
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "export", help="write a training run's model as a Hugging Face (or Mistral) checkpoint"
    )
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--checkpoint", help="a specific checkpoint file (default: the newest)")
    p.add_argument("--format", default="hf", choices=["hf", "consolidated"])
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=_export)

    p = sub.add_parser("upcycle", help="turn a dense Mistral-style checkpoint into a mixture of experts")
    p.add_argument("--model", required=True, help="dense checkpoint directory")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh router")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="hf", choices=["hf", "consolidated"])
    p.set_defaults(func=_upcycle)


def _configs(args: argparse.Namespace):
    from smoe.train.config import TrainConfig, load_run_file

    if args.resume:
        # --dispatch is refused too: the engines agree only to float32 round-off, and a resumed
        # run promises the very losses (bit for bit) the uninterrupted run would have logged;
        # like --device, the engine is part of that run's config.
        given = [f for f in _OVERRIDES if getattr(args, f[2:].replace("-", "_")) is not None]
        given += [f"--{f}" for f in ("preset", "config", "dispatch") if getattr(args, f)]
        given += ["--aux-loss-per-layer"] if args.aux_loss_per_layer else []
        if given:
            raise ValueError(
                f"--resume continues the run exactly as configured in {args.out}/config.json "
                f"(the same losses, bit for bit); drop {', '.join(given)}, or start a new run "
                "from its weights (smoe export, then --init)"
            )
        return None, None
    if args.config:
        model_cfg, train_cfg = load_run_file(args.config)
    else:
        model_cfg, train_cfg = ModelConfig.preset(args.preset or "tiny"), TrainConfig()
    changes = {f: getattr(args, flag[2:].replace("-", "_")) for flag, (f, _) in _OVERRIDES.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.aux_loss_per_layer:
        changes["aux_loss_per_layer"] = True
    train_cfg = dataclasses.replace(train_cfg, **changes)
    if args.dispatch:
        model_cfg = model_cfg.replace(dispatch=args.dispatch)
    return model_cfg, train_cfg


def _train(args: argparse.Namespace) -> int:
    from smoe.train.init import load_init_model
    from smoe.train.loop import train
    from smoe.train.step import NonFiniteLossError

    model_cfg, train_cfg = _configs(args)
    if not args.resume and not args.data:
        raise ValueError("--data CORPUS_DIR is required for a new run (build one with `smoe data build`)")
    init = None
    if args.init:
        if args.preset or args.resume:
            raise ValueError("--init takes the model config from the checkpoint; drop --preset/--resume")
        # With --config its runtime fields (dispatch, jitter, capacity) apply: checkpoints lack them.
        run_cfg = model_cfg if args.config else None
        init = load_init_model(args.init, run_cfg, args.config, dispatch=args.dispatch)
        model_cfg = init.config
    # Checked against the model the run trains (with --init, the checkpoint's, not the preset's).
    if model_cfg is not None and train_cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"--seq-len {train_cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}"
        )
    try:
        summary = train(
            args.out, model_cfg, train_cfg, args.data, resume=args.resume, init_model=init,
            stop_after=args.stop_after, progress=not args.no_progress,
            parallel=sd.parallel_config_from_args(args),
        )  # fmt: skip
    except NonFiniteLossError as e:
        print(f"smoe train: {e}", file=sys.stderr)
        return 3
    if summary.get("already_complete"):  # nothing was trained; train() said where the results are
        return 0
    if summary["stopped"]:
        name = summary["stopped"]
        return 128 + getattr(signal, name).value if name in ("SIGINT", "SIGTERM") else 0
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports (the group is gone now)
        return 0
    val = " ".join(f"{d}={v:.3f}" for d, v in summary["val"].items())
    if summary.get("finished_from_checkpoint"):
        print(f"finished {args.out} from its final checkpoint (step {summary['step']}); val loss {val}")
    else:
        print(f"trained {summary['step']} steps in {summary['train_seconds']:.0f}s; val loss {val}")
    print(f"run directory: {args.out} (metrics.jsonl, checkpoints/, plots/)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from smoe.checkpoint import parse_dtype, save_model
    from smoe.train.export import model_from_run

    model = model_from_run(args.run, args.checkpoint, dtype=parse_dtype(args.dtype))
    save_model(model, args.out, fmt=args.format)
    print(f"exported {args.run} ({model.num_params() / 1e6:.1f}M parameters) to {args.out} ({args.format})")
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    from smoe.checkpoint import load_model, save_model
    from smoe.train.upcycle import upcycle

    dense = load_model(args.model)
    model = upcycle(dense, args.experts, args.top_k, seed=args.seed)
    save_model(model, args.out, fmt=args.format)
    cfg = model.config
    print(
        f"upcycled {args.model} into {cfg.num_experts} experts (top-{cfg.top_k}): "
        f"{cfg.num_params() / 1e6:.1f}M parameters, {cfg.num_params(active=True) / 1e6:.1f}M active -> {args.out}"
    )
    return 0
