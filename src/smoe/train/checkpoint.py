"""Atomic train-state checkpoints: ``RUN_DIR/checkpoints/step_00000100.pt``.

A checkpoint is written to a hidden temporary file in the same directory, flushed and fsynced,
then renamed over its final name (``os.replace`` is atomic on POSIX), and the directory is
fsynced so the rename itself survives a crash. A process killed at any point therefore leaves
either the complete new checkpoint or none: only names matching ``step_*.pt`` are ever read,
and leftover temporaries are removed by the next save. After a save all but the newest
``keep_last`` checkpoints are deleted.

The file holds everything a resumed run needs to reproduce the uninterrupted one bit for bit:
model and optimizer state, the LR scheduler, the data loader position, and the RNG states.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "smoe-train-state-v1"
_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries never match the name pattern)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Atomically write ``state`` (plus the step and format tag) as the checkpoint of ``step``."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".step_*.tmp"):  # left by a process killed mid-write
        stale.unlink()
    final = d / f"step_{step:08d}.pt"
    tmp = d / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(d)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink()
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        # numpy/python RNG states hold numpy arrays and tuples, which weights_only refuses.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"{path}: not a readable train-state checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a smoe train-state checkpoint (expected format {FORMAT!r})")
    return state
