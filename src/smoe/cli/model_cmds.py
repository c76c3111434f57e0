"""``smoe init`` (a fresh model from a preset) and ``smoe info`` (what a checkpoint holds)."""

from __future__ import annotations

import argparse

import torch

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


def _available_bytes() -> int | None:
    """Memory this process could still allocate (Linux's MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _init(args: argparse.Namespace) -> int:
    cfg = ModelConfig.preset(args.preset)
    dtype = parse_dtype(args.dtype)
    # build_model initialises in float32 and casts afterwards (one tensor at a time), so the
    # peak is the float32 model whatever --dtype says: bfloat16 needs as much as float32 here.
    bytes_per_param = max(torch.empty((), dtype=dtype).element_size(), 4)
    need = cfg.num_params() * bytes_per_param
    have = _available_bytes()
    if have is not None and need > have:  # else the allocation fails deep in torch, or the OOM killer ends us
        raise ValueError(
            f"--preset {args.preset} in {dtype} needs {_size(need)} of memory, {_size(have)} are available"
        )
    model = build_model(cfg, seed=args.seed, dtype=dtype)
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
