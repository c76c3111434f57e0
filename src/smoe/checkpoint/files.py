"""Finding and opening the weight files of a checkpoint directory, lazily and strictly.

Only headers are read until a tensor is asked for. Safetensors tensors are then read with
positioned reads straight into a fresh buffer: unlike a memory map, whose file pages count as
resident for as long as any tensor still points into the mapping, this keeps peak memory at
about one copy of the weights (see docs/formats.md for the measurement).
Pickle files (``.pt`` / ``.pth`` / ``.bin``) are opened only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and key."""


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file is missing")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor table of a safetensors file and the byte offset where its data starts,
    checked against the file's size so that a truncated file fails here, not mid-load."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a readable safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(
                f"{path}: not a readable safetensors file (header length {n} > file size {size})"
            )
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (bad header: {e})") from None
    if not isinstance(table, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (header is not a JSON object)")
    table.pop("__metadata__", None)
    data_start = 8 + n
    for key, info in table.items():
        if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] not in _ST_DTYPES:
            # Valid safetensors (e.g. an FP8 release, F8_E4M3) that this loader cannot convert.
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {info['dtype']}, which is not supported "
                f"(supported: {', '.join(_ST_DTYPES)})"
            )
        try:
            begin, end = info["data_offsets"]
            dtype = _ST_DTYPES[info["dtype"]]
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: not a readable safetensors file (bad entry for {key!r})"
            ) from None
        if begin < 0 or end - begin != numel * dtype.itemsize or data_start + end > size:
            raise CheckpointError(
                f"{path}: not a readable safetensors file (tensor {key!r} needs bytes up to "
                f"{data_start + end}, file has {size}; truncated?)"
            )
    _check_disjoint(path, table)
    return table, data_start


def _check_disjoint(path: Path, table: dict[str, dict]) -> None:
    # The format forbids tensors sharing bytes (the safetensors library refuses such files);
    # reading them anyway would give two parameters the same or partly the same values.
    spans = sorted((*info["data_offsets"], key) for key, info in table.items())
    spans = [s for s in spans if s[1] > s[0]]  # empty tensors occupy no bytes
    for (_, prev_end, prev_key), (begin, _, key) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointError(
                f"{path}: not a readable safetensors file (tensors {prev_key!r} and {key!r} "
                f"overlap; each tensor must have bytes of its own)"
            )


class TensorSource:
    """All tensors of a checkpoint, by key, without reading them until asked."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._where: dict[str, Path] = {}
        self._tables: dict[Path, tuple[dict[str, dict], int]] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        for f in files:
            for key in self._open(f):
                if key in self._where:
                    raise CheckpointError(f"{f}: key {key!r} also appears in {self._where[key]}")
                self._where[key] = f

    def _open(self, f: Path) -> list[str]:
        _check_file(f)
        if f.suffix == ".safetensors":
            self._tables[f] = read_safetensors_header(f)
            return list(self._tables[f][0])
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
        if f in self._tables:
            return tuple(self._tables[f][0][key]["shape"])
        return tuple(self._pickled[f][key].shape)

    def dtype(self, key: str) -> torch.dtype:
        f = self._where[key]
        if f in self._tables:
            return _ST_DTYPES[self._tables[f][0][key]["dtype"]]
        return self._pickled[f][key].dtype

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key``; read into ``out`` (a contiguous CPU tensor of the file's dtype and
        shape) when given, which saves a copy when stacking experts."""
        f = self._where[key]
        if f not in self._tables:
            return self._pickled[f][key] if out is None else out.copy_(self._pickled[f][key])
        table, data_start = self._tables[f]
        info = table[key]
        if out is None:
            out = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        begin, end = info["data_offsets"]
        with open(f, "rb", buffering=0) as fh:
            done = 0
            while done < end - begin:
                n = os.preadv(fh.fileno(), [buf[done:]], data_start + begin + done)
                if n <= 0:
                    raise CheckpointError(f"{f}: cannot read tensor {key!r} (file ended early)")
                done += n
        return out


def hf_weight_files(directory: Path) -> list[Path]:
    """``model.safetensors``, or the shards listed in ``model.safetensors.index.json``
    (likewise for ``pytorch_model.bin``).

    The single file comes before the index, and safetensors before pickles, in the order
    transformers uses (``_get_resolved_checkpoint_files`` in transformers/modeling_utils.py,
    v5.24: SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME), so
    that both libraries load the same weights from a directory that holds more than one."""
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        single = directory / f"{stem}.{ext}"
        if single.exists():
            return [single]
        index = directory / f"{stem}.{ext}.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed shard index ({e!r})") from None
            return [directory / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(
        f"{directory}: no weights found (expected model.safetensors, or model.safetensors.index.json with shards)"
    )


def consolidated_weight_files(directory: Path) -> list[Path]:
    """``consolidated.safetensors`` (or several), else the pickles: mistral-inference names them
    ``consolidated.00.pth``, the first Mixtral release ``consolidated.00.pt`` ... ``.07.pt``."""
    pickles = {*directory.glob("consolidated*.pt"), *directory.glob("consolidated*.pth")}
    files = sorted(directory.glob("consolidated*.safetensors")) or sorted(pickles)
    if not files:
        raise CheckpointError(
            f"{directory}: no consolidated.safetensors or consolidated.*.pt(h) next to params.json"
        )
    return files
