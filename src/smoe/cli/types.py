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
    if d.type not in ("cpu", "cuda", "mps"):
        # "meta" holds no data and "xpu"/"hpu"/... need a backend this build may lack: torch
        # accepts the name, then fails at the first allocation with an AssertionError or a
        # ModuleNotFoundError. Accept another type only when its backend says it is usable.
        backend = getattr(torch, d.type, None)
        if not callable(getattr(backend, "is_available", None)) or not backend.is_available():
            raise argparse.ArgumentTypeError(
                f"{value!r}: no usable {d.type} device here (use cpu, or cuda/mps where available)"
            )
    return value


def positive_int(value: str) -> int:
    n = _int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def non_negative_int(value: str) -> int:
    n = _int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return n


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
