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
        """All tokens of a split, memory-mapped (uint16), after checking them against the index."""
        d = self._check(domain, split)
        n_tokens = int(self.offsets(domain, split)[-1])
        if n_tokens == 0:
            return np.zeros(0, dtype=np.uint16)
        return np.memmap(d / f"{split}.bin", dtype=np.uint16, mode="r", shape=(n_tokens,))

    def offsets(self, domain: str, split: str = "train") -> np.ndarray:
        """Document boundaries: N + 1 int64 offsets, checked against the .bin and the manifest.

        A truncated or mismatched shard would otherwise read as fewer (or shifted) tokens; training
        reads ``tokens`` alone, so both go through here.
        """
        d = self._check(domain, split)
        bin_path, idx_path = d / f"{split}.bin", d / f"{split}.idx"
        for f in (bin_path, idx_path):
            if not f.is_file():
                raise CorpusError(f"{f}: missing shard file")
        bin_bytes, idx_bytes = bin_path.stat().st_size, idx_path.stat().st_size
        if bin_bytes % 2:
            raise CorpusError(
                f"{bin_path}: {bin_bytes} bytes is not a whole number of uint16 tokens (truncated?)"
            )
        if idx_bytes % 8 or idx_bytes == 0:
            raise CorpusError(
                f"{idx_path}: {idx_bytes} bytes is not a whole, non-empty int64 index (truncated?)"
            )
        idx = np.fromfile(idx_path, dtype=np.int64)
        if idx[0] != 0 or (np.diff(idx) < 0).any():
            raise CorpusError(f"{idx_path}: malformed document index")
        n_tokens = bin_bytes // 2
        if idx[-1] != n_tokens:
            raise CorpusError(f"{idx_path}: index ends at {idx[-1]} but the shard has {n_tokens} tokens")
        want = self.manifest["domains"][domain].get(split)
        if isinstance(want, dict) and (want.get("documents"), want.get("tokens")) != (idx.size - 1, n_tokens):
            raise CorpusError(
                f"{d}: {split} shards hold {idx.size - 1} documents and {n_tokens} tokens, but manifest.json "
                f"says {want.get('documents')} and {want.get('tokens')}"
            )
        return idx

    def documents(self, domain: str, split: str = "train") -> Iterator[np.ndarray]:
        toks, idx = self.tokens(domain, split), self.offsets(domain, split)
        for a, b in zip(idx[:-1], idx[1:]):
            yield toks[a:b]

    def num_tokens(self, domain: str, split: str = "train") -> int:
        return int(self.offsets(domain, split)[-1])
