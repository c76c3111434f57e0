"""``smoe init`` (a fresh model from a preset) and ``smoe info`` (what a checkpoint holds)."""

from __future__ import annotations

import argparse

from smoe.checkpoint import load_config, load_model, parse_dtype, save_model
from smoe.config import PRESETS, ModelConfig
from smoe.model import build_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a freshly initialised model from a preset")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="hf", choices=["hf", "consolidated"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=_init)

    p = sub.add_parser("info", help="print a checkpoint's config and parameter counts")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--load", action="store_true", help="also load (and so validate) every weight")
    p.set_defaults(func=_info)


def _init(args: argparse.Namespace) -> int:
    cfg = ModelConfig.preset(args.preset)
    model = build_model(cfg, seed=args.seed, dtype=parse_dtype(args.dtype))
    save_model(model, args.out, fmt=args.format)
    print(f"wrote {args.preset} ({model.num_params() / 1e6:.1f}M parameters) to {args.out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    cfg = load_config(args.model)
    for k, v in cfg.to_dict().items():
        print(f"{k:>16}: {v}")
    print(
        f"{'parameters':>16}: {cfg.num_params() / 1e9:.3f}B total, {cfg.num_params(active=True) / 1e9:.3f}B active"
    )
    if args.load:
        model = load_model(args.model)
        print(f"{'loaded':>16}: {model.num_params() / 1e6:.1f}M parameters, all keys matched")
    return 0
