"""argparse value types shared by the subcommands: each checks a flag where it is parsed, so a
bad value ends in one line that names the flag, not a traceback from deep inside torch."""

from __future__ import annotations

import argparse

import torch


def device(value: str) -> str:
    """A torch device that this torch can use: "cuda" on a CPU-only build fails here (torch's
    own message is a bare AssertionError from the first allocation)."""
    try:
        d = torch.device(value)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"not a torch device: {value!r} ({e})") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: this torch build or machine has no CUDA device")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value!r}: there are {torch.cuda.device_count()} CUDA devices")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: MPS is not available here")
    return value
