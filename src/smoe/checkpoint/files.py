"""Finding and opening the weight files of a checkpoint directory, lazily and strictly.

Safetensors files are memory-mapped: only headers are read until a tensor is asked for.
Pickle files (``.pt`` / ``.pth`` / ``.bin``) are opened only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and key."""


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file is missing")


class TensorSource:
    """All tensors of a checkpoint, by key, without reading them until asked."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        for f in files:
            for key in self._open(f):
                if key in self._where:
                    raise CheckpointError(f"{f}: key {key!r} also appears in {self._where[key]}")
                self._where[key] = f

    def _open(self, f: Path) -> list[str]:
        _check_file(f)
        if f.suffix == ".safetensors":
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
                keys = list(h.keys())
            except Exception as e:  # safetensors raises several types for corrupt files
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
            self._handles[f] = h
            return keys
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot be read with torch.load(weights_only=True) ({e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{f}: expected a flat dict of tensors")
        self._pickled[f] = sd
        return list(sd)

    def keys(self) -> set[str]:
        return set(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._where[key]
        if f in self._handles:
            return tuple(self._handles[f].get_slice(key).get_shape())  # type: ignore[attr-defined]
        return tuple(self._pickled[f][key].shape)

    def get(self, key: str) -> torch.Tensor:
        f = self._where[key]
        if f in self._handles:
            try:
                return self._handles[f].get_tensor(key)  # type: ignore[attr-defined]
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e})") from None
        return self._pickled[f][key]


def hf_weight_files(directory: Path) -> list[Path]:
    """``model.safetensors``, or the shards listed in ``model.safetensors.index.json``
    (likewise for ``pytorch_model.bin``)."""
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = directory / f"{stem}.{ext}.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed shard index ({e!r})") from None
            return [directory / name for name in sorted(set(weight_map.values()))]
        single = directory / f"{stem}.{ext}"
        if single.exists():
            return [single]
    raise CheckpointError(
        f"{directory}: no weights found (expected model.safetensors, or model.safetensors.index.json with shards)"
    )


def consolidated_weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("consolidated*.safetensors")) or sorted(directory.glob("consolidated*.pth"))
    if not files:
        raise CheckpointError(f"{directory}: no consolidated.safetensors or consolidated.*.pth next to params.json")
    return files
