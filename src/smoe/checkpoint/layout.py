"""Which files in a directory belong to which checkpoint layout, so that saving replaces a
checkpoint completely and never mixes two.

A save that left an older checkpoint's files behind would be loaded instead of the new one:
a stale ``model.safetensors.index.json`` next to a new ``model.safetensors``, or a Hugging
Face ``config.json`` next to a new ``params.json`` (``load_model`` takes ``config.json``
first). So a save removes the files of its own layout that it did not write, and refuses a
directory that holds the other layout, whose files it has no business deleting.
"""

from __future__ import annotations

import json
from pathlib import Path

from smoe.checkpoint.files import CheckpointError

# Config and weight files of each layout, as globs (what the loaders in files.py read).
LAYOUT_FILES = {
    "hf": (
        "config.json",
        "model.safetensors",
        "model-*-of-*.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model-*-of-*.bin",
        "pytorch_model.bin.index.json",
    ),
    "consolidated": ("params.json", "consolidated*.safetensors", "consolidated*.pt", "consolidated*.pth"),
}

# Files a save of each layout may replace when it does not write them itself. The HF
# pickles are left alone: smoe and transformers both take model.safetensors before them.
REPLACEABLE = {
    "hf": ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"),
    "consolidated": ("consolidated*.safetensors", "consolidated*.pt", "consolidated*.pth"),
}


def _matching(directory: Path, globs: tuple[str, ...]) -> list[Path]:
    return sorted({p for g in globs for p in directory.glob(g) if p.is_file()})


def check_no_other_layout(directory: Path, fmt: str) -> None:
    """Raise if ``directory`` holds files of the layout other than ``fmt``."""
    other = "consolidated" if fmt == "hf" else "hf"
    found = _matching(directory, LAYOUT_FILES[other])
    if found:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(
            f"{directory}: cannot save a {fmt!r} checkpoint here, the directory already holds a "
            f"{other!r} checkpoint ({names}); save into an empty directory or remove those files"
        )


# A key every model config of the layout has: config.json of a transformers model names its
# model_type, params.json gives the model's dim.
CONFIG_KEY = {"hf": ("config.json", "model_type"), "consolidated": ("params.json", "dim")}


def check_config_replaceable(directory: Path, fmt: str) -> None:
    """Raise if ``directory`` holds a config file of the layout's name that is not a model config
    of that layout: a save would overwrite it. Example: ``smoe export --out RUN`` into a training
    run, whose config.json ({"model": ..., "train": ...}) is what ``--resume`` reads."""
    name, key = CONFIG_KEY[fmt]
    path = directory / name
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = None
    if not (isinstance(config, dict) and key in config):
        raise CheckpointError(
            f"{path}: is not a {fmt!r} model config (no {key!r}) and a save would overwrite it; "
            "save into an empty directory or another checkpoint's"
        )


def remove_stale(directory: Path, fmt: str, written: set[str]) -> None:
    """Delete the weight files of layout ``fmt`` that this save did not write (names in
    ``written``). Called after the new files are in place, so a crash part-way leaves extra
    files, never an empty directory."""
    for p in _matching(directory, REPLACEABLE[fmt]):
        if p.name not in written:
            p.unlink()
