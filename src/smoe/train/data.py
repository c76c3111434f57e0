"""Training and validation batches from a token corpus (``smoe.data.shards``).

Legend: B sequences per batch, T tokens per sequence.

Training windows of T + 1 tokens are drawn uniformly over every train token of every domain
(so domains are mixed in proportion to their size); documents are packed, BOS/EOS inside a
window separate them. The window offsets of micro-batch m of optimizer step s come from a
generator seeded with (seed, s, m): the data-loader position is just the step number, so a
resumed run sees exactly the batches the uninterrupted run would have.

Validation uses fixed, non-overlapping windows spread evenly over each domain's val split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoe.data.shards import Corpus, CorpusError


@dataclass
class Batch:
    inputs_BT: torch.Tensor  # int64 token ids
    targets_BT: torch.Tensor  # inputs shifted by one
    mask_BT: torch.Tensor | None = None  # 1 = real token; None = no padding

    def to(self, device: str | torch.device) -> Batch:
        mask = None if self.mask_BT is None else self.mask_BT.to(device, non_blocking=True)
        return Batch(
            self.inputs_BT.to(device, non_blocking=True), self.targets_BT.to(device, non_blocking=True), mask
        )

    @property
    def num_tokens(self) -> int:
        return int(self.inputs_BT.numel() if self.mask_BT is None else self.mask_BT.sum())


def _windows(tokens: np.ndarray, starts: np.ndarray, T: int) -> Batch:
    rows = np.stack([np.asarray(tokens[s : s + T + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(rows)
    return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous())


class TrainSampler:
    def __init__(self, corpus: Corpus | str | Path, seq_len: int, batch_size: int, seed: int):
        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
        self.T, self.B, self.seed = seq_len, batch_size, seed
        self.domains = self.corpus.domains
        # Load the (small) train shards once; windows never cross a domain boundary.
        self.tokens = [np.asarray(self.corpus.tokens(d, "train")) for d in self.domains]
        starts = np.array([max(0, len(t) - seq_len) for t in self.tokens], dtype=np.int64)
        short = [d for d, t in zip(self.domains, self.tokens) if len(t) < seq_len + 1]
        if short:
            sizes = {d: len(t) for d, t in zip(self.domains, self.tokens) if d in short}
            raise CorpusError(
                f"{self.corpus.path}: train split of domain(s) {sizes} has fewer than seq_len + 1 = "
                f"{seq_len + 1} tokens; lower --seq-len or build a larger corpus"
            )
        self.cum_starts = np.concatenate([[0], np.cumsum(starts)])

    def batch(self, step: int, micro: int = 0) -> Batch:
        rng = np.random.default_rng([self.seed, step, micro])
        flat = rng.integers(0, self.cum_starts[-1], size=self.B)
        domain = np.searchsorted(self.cum_starts, flat, side="right") - 1
        starts = flat - self.cum_starts[domain]
        rows = [
            np.asarray(self.tokens[d][s : s + self.T + 1], dtype=np.int64) for d, s in zip(domain, starts)
        ]
        t = torch.from_numpy(np.stack(rows))
        return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous())

    def state_dict(self) -> dict:
        # Stateless beyond the seed: the position is the step number the loop passes in.
        return {"seed": self.seed, "seq_len": self.T, "batch_size": self.B, "domains": self.domains}

    def check_state(self, state: dict, source: str) -> None:
        mine = self.state_dict()
        if state != mine:
            raise ValueError(f"{source}: the checkpoint's data loader {state} differs from this run's {mine}")


def val_batches(
    corpus: Corpus, domain: str, seq_len: int, batch_size: int, n_batches: int | None
) -> list[Batch]:
    """Up to ``n_batches`` fixed batches of non-overlapping windows spread evenly over the
    domain's val split (``None``: every window, i.e. the whole split).

    Spread, not the first windows: a val split is a handful of whole documents, and the first
    ``n_batches * batch_size * seq_len`` tokens can be one document. Example: 9,000 val tokens,
    T 128 -> 70 grid windows; 16 wanted -> grid windows 0, 5, 9, ..., 69.
    """
    tokens = corpus.tokens(domain, "val")
    grid = (len(tokens) - 1) // seq_len  # non-overlapping windows that fit
    if grid < 1:
        raise CorpusError(
            f"{corpus.path}: val split of domain {domain!r} has {len(tokens)} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1}; lower --seq-len or build a larger corpus"
        )
    n_windows = grid if n_batches is None else min(n_batches * batch_size, grid)
    starts = np.round(np.linspace(0, grid - 1, n_windows)).astype(np.int64) * seq_len
    return [_windows(tokens, starts[i : i + batch_size], seq_len) for i in range(0, n_windows, batch_size)]


def corpus_fingerprint(corpus: Corpus) -> dict[str, Any]:
    """What a run records of its corpus, so that ``--resume`` can tell it from another one: the
    SHA-256 of every domain's train and val tokens (what the sampler and validation read), and
    the token counts, for messages. The path is left out: a moved or copied corpus is the same.

    Example: ``{"sha256": "9f2c...", "tokens": {"code": {"train": 1260, "val": 252}, ...}}``.
    """
    h = hashlib.sha256()
    tokens: dict[str, dict[str, int]] = {}
    for d in corpus.domains:
        for split in ("train", "val"):
            t = np.ascontiguousarray(corpus.tokens(d, split))  # a memmap: hashed page by page
            h.update(f"{d}/{split}/{t.dtype}/{len(t)}\n".encode())
            h.update(t)
            tokens.setdefault(d, {})[split] = len(t)
    return {"sha256": h.hexdigest(), "tokens": tokens}


def check_same_corpus(run: dict[str, Any], corpus: Corpus, run_file: Path, given: bool) -> None:
    """Refuse to resume on other tokens than the run started on (``run``: its run.json, read
    from ``run_file``; ``given``: the corpus came from --data): every later batch would silently
    differ. Runs from before run.json held the hash are not checked."""
    if "corpus_sha256" not in run:
        return
    now = corpus_fingerprint(corpus)
    if now["sha256"] == run["corpus_sha256"]:
        return
    which = f"--data {corpus.path}" if given else f"the corpus {corpus.path} (from {run_file})"
    raise ValueError(
        f"--resume: {which} holds other tokens than the corpus this run started on ({run['corpus']}; "
        f"tokens per domain and split then {run.get('corpus_tokens')}, now {now['tokens']}). Resuming "
        "on other data would not continue the run; resume with its corpus, or start a new run from "
        "its weights (smoe export, then --init)"
    )
