"""The on-disk token corpus: one folder per domain, uint16 token shards, memory-mapped.

Layout written by ``smoe data build`` (and read by training and routing analysis)::

    CORPUS/
      manifest.json              {"format": "smoe-corpus-v1", "vocab_size": 32000,
                                  "domains": {"code": {"source": ..., "train": {"documents": N, "tokens": M},
                                                       "val": {...}, "skipped": {...}}, ...}}
      code/train.bin             uint16 token ids, documents concatenated
      code/train.idx             int64 document boundaries, N + 1 offsets into train.bin (0 first)
      code/val.bin, code/val.idx

Each document is stored as ``BOS, tokens..., EOS``. Document d of a split is
``tokens[idx[d]:idx[d + 1]]``.

``smoe.data.build`` adds further manifest fields (seed, caps, per-domain candidates/examined,
skipped counts by reason, unigram entropies in nats); readers need only the ones above.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FORMAT = "smoe-corpus-v1"
SPLITS = ("train", "val")


class CorpusError(ValueError):
    """A corpus directory that is missing, incomplete or inconsistent."""


def write_split(directory: Path, split: str, docs: list[list[int]]) -> dict[str, int]:
    """Write one split of one domain; returns its document and token counts."""
    directory.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    idx = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=idx[1:])
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=int(idx[-1]))
    if flat.size and (flat.min() < 0 or flat.max() >= 2**16):
        raise CorpusError(f"{directory}: token ids must fit uint16, got range [{flat.min()}, {flat.max()}]")
    flat.astype(np.uint16).tofile(directory / f"{split}.bin")
    idx.tofile(directory / f"{split}.idx")
    return {"documents": len(docs), "tokens": int(idx[-1])}


class Corpus:
    """Read-only view of a built corpus."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise CorpusError(
                f"{self.path}: not a corpus directory (no manifest.json; build one with `smoe data build`)"
            )
        try:
            self.manifest = json.loads(manifest.read_text())
        except ValueError as e:
            raise CorpusError(f"{manifest}: malformed JSON ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise CorpusError(f"{manifest}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.domains: list[str] = sorted(self.manifest["domains"])

    def _check(self, domain: str, split: str) -> Path:
        if domain not in self.manifest["domains"]:
            raise CorpusError(f"{self.path}: no domain {domain!r}; it has {self.domains}")
        if split not in SPLITS:
            raise CorpusError(f"split must be one of {SPLITS}, got {split!r}")
        return self.path / domain

    def tokens(self, domain: str, split: str = "train") -> np.ndarray:
        """All tokens of a split, memory-mapped (uint16)."""
        d = self._check(domain, split)
        f = d / f"{split}.bin"
        if not f.is_file():
            raise CorpusError(f"{f}: missing shard")
        if f.stat().st_size == 0:
            return np.zeros(0, dtype=np.uint16)
        return np.memmap(f, dtype=np.uint16, mode="r")

    def offsets(self, domain: str, split: str = "train") -> np.ndarray:
        """Document boundaries: N + 1 int64 offsets."""
        d = self._check(domain, split)
        idx = np.fromfile(d / f"{split}.idx", dtype=np.int64)
        if idx.size == 0 or idx[0] != 0 or (np.diff(idx) < 0).any():
            raise CorpusError(f"{d / (split + '.idx')}: malformed document index")
        n_tokens = (d / f"{split}.bin").stat().st_size // 2
        if idx[-1] != n_tokens:
            raise CorpusError(
                f"{d / (split + '.idx')}: index ends at {idx[-1]} but the shard has {n_tokens} tokens"
            )
        return idx

    def documents(self, domain: str, split: str = "train") -> Iterator[np.ndarray]:
        toks, idx = self.tokens(domain, split), self.offsets(domain, split)
        for a, b in zip(idx[:-1], idx[1:]):
            yield toks[a:b]

    def num_tokens(self, domain: str, split: str = "train") -> int:
        return int(self.offsets(domain, split)[-1])
