"""Recording each token's routing while running a model over documents, outside the model.

Legend: B windows in a batch, T positions in a window, N recorded tokens, L analysed layers,
K experts chosen per token, E experts.

The model is called with ``return_router=True`` (no hooks, no change to the model; its
``return_router=False`` path is untouched, so recording costs nothing when it is off).

Long documents are cut into windows that run at most ``seq_len`` tokens each. Window 0 runs and
records tokens ``[0, seq_len)``; every later window records the next ``stride = seq_len - overlap``
tokens and also runs the ``overlap`` tokens before them, as context only. So window w >= 1 records
``[seq_len + (w-1)*stride, seq_len + w*stride)`` (cut at the document's end). Example with
seq_len=4, overlap=2 on a 7-token document::

    window 0: run 0..3, record 0..3
    window 1: run 2..5, record 4..5
    window 2: run 4..6, record 6

Every token is recorded exactly once and nothing is truncated; with overlap 0 (the default) a
token at the start of a window sees no earlier context. Windows of several documents are batched,
right-padded with token 0, and padded positions are dropped before anything is recorded.

What is recorded is the router's top-k choice for each token, *dropless*: a model built with a
capacity factor has it switched off while recording (``dropless``) and restored afterwards. A
capacity limit is shared by every token of a batch, so it would let padding and the other windows
in the batch change which assignments a token loses, hence the hidden states of later layers and
their routing. Without it, under causal attention nothing outside a window reaches its tokens,
and the recording does not depend on batching or padding.

On disk (``RecordWriter``), one folder per domain, written incrementally and read back memory-mapped::

    meta.json       {"tokens": N, "layers": [...], "top_k": K, "num_experts": E, "probs": bool}
    token_ids.bin   int32 [N]
    doc_ids.bin     int32 [N]      (0, 1, ... in the order documents were given)
    expert_ids.bin  uint8 [N, L, K]  (best first; uint16 when E > 256)
    weights.bin     float16 [N, L, K]
    probs.bin       float16 [N, L, E]  (optional: softmax over all E router logits)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def windows(n: int, seq_len: int, overlap: int = 0) -> list[tuple[int, int, int]]:
    """(run_start, record_start, end) for each window of an n-token document: the model runs on
    ``[run_start, end)`` and the tokens ``[record_start, end)`` are recorded. Window 0 records
    ``[0, seq_len)``; each later one records the next ``seq_len - overlap`` tokens after ``overlap``
    tokens of context, so no window runs more than ``seq_len`` tokens::

        windows(10, 4, 1) == [(0, 0, 4), (3, 4, 7), (6, 7, 10)]
        windows(7, 4, 2) == [(0, 0, 4), (2, 4, 6), (4, 6, 7)]
    """
    if seq_len <= 0 or not 0 <= overlap < seq_len:
        raise ValueError(
            f"need seq_len > 0 and 0 <= overlap < seq_len, got seq_len={seq_len}, overlap={overlap}"
        )
    stride, out, s = seq_len - overlap, [], 0
    while s < n:
        out.append((max(0, s - overlap) if s else 0, s, min(n, s + (stride if s else seq_len))))
        s = out[-1][2]
    return out


@dataclass
class Chunk:
    """Recorded routing for N consecutive tokens of one domain (in document order)."""

    token_ids_N: np.ndarray
    doc_ids_N: np.ndarray
    expert_ids_NLK: np.ndarray
    weights_NLK: np.ndarray
    logits_NLE: np.ndarray  # float32


def moe_layer_indices(model: torch.nn.Module) -> list[int]:
    """Indices (into model.layers) of the layers with a router, in the order the model returns them."""
    from smoe.model.moe import MoE

    return [i for i, layer in enumerate(model.layers) if isinstance(layer.feed_forward, MoE)]


@contextmanager
def dropless(model: torch.nn.Module) -> Iterator[None]:
    """Switch off the capacity limit of every MoE layer of ``model`` inside the block; the
    factors are restored afterwards, also when the block raises."""
    from smoe.model.moe import MoE

    saved = [(m, m.capacity_factor) for m in model.modules() if isinstance(m, MoE)]
    try:
        for m, _ in saved:
            m.capacity_factor = None
        yield
    finally:
        for m, factor in saved:
            m.capacity_factor = factor


@torch.inference_mode()
def route_documents(
    model: torch.nn.Module,
    documents: Iterable[np.ndarray],
    layers: list[int],
    seq_len: int,
    batch_size: int = 8,
    overlap: int = 0,
) -> Iterator[Chunk]:
    """Run ``model`` over ``documents`` (token id arrays) in batched windows; yield the routing of
    ``layers`` (indices into model.layers) one batch at a time. The caller sets eval mode.

    Each forward pass runs dropless (see the module docstring); the model is as it was between
    batches, so the caller may use it while consuming the chunks."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of windows, got {batch_size}")
    moe = moe_layer_indices(model)
    missing = [i for i in layers if i not in moe]
    if missing:
        raise ValueError(f"layers {missing} have no router; the model's MoE layers are {moe}")
    pick = [moe.index(i) for i in layers]
    device = next(model.parameters()).device
    pending: list[tuple[int, np.ndarray, int]] = []  # (doc id, tokens run, tokens of context to skip)
    for doc_id, doc in enumerate(documents):
        toks = np.asarray(doc, dtype=np.int64)
        for a, s, b in windows(len(toks), seq_len, overlap):
            pending.append((doc_id, toks[a:b], s - a))
            if len(pending) == batch_size:
                yield _run_batch(model, pending, pick, device)
                pending = []
    if pending:
        yield _run_batch(model, pending, pick, device)


def _run_batch(model, pending, pick, device) -> Chunk:
    B, T = len(pending), max(len(t) for _, t, _ in pending)
    tokens_BT = np.zeros((B, T), np.int64)
    for r, (_, t, _) in enumerate(pending):
        tokens_BT[r, : len(t)] = t
    # Only the routing is recorded: the head runs for one position instead of all T (the (B, T, V)
    # logits were the largest product of a small model, and 0.5 GB per 4096 tokens at V = 32000).
    with dropless(model):
        _, routings = model(torch.from_numpy(tokens_BT).to(device), return_router=True, logits_to_keep=1)
    ids_BTLK = (
        torch.stack([routings[i].expert_ids_TK for i in pick], 1).view(B, T, len(pick), -1).cpu().numpy()
    )
    w_BTLK = (
        torch.stack([routings[i].weights_TK for i in pick], 1).view(B, T, len(pick), -1).float().cpu().numpy()
    )
    lg_BTLE = (
        torch.stack([routings[i].logits_TE for i in pick], 1).view(B, T, len(pick), -1).float().cpu().numpy()
    )
    keep = [(r, skip, len(t)) for r, (_, t, skip) in enumerate(pending)]
    sel = lambda a: np.concatenate([a[r, s:e] for r, s, e in keep])  # noqa: E731
    return Chunk(
        token_ids_N=sel(tokens_BT),
        doc_ids_N=np.concatenate([np.full(e - s, pending[r][0], np.int64) for r, s, e in keep]),
        expert_ids_NLK=sel(ids_BTLK),
        weights_NLK=sel(w_BTLK),
        logits_NLE=sel(lg_BTLE),
    )


class RecordWriter:
    """Appends chunks of one domain to flat binary files (see the module docstring)."""

    def __init__(
        self, directory: str | Path, layers: list[int], top_k: int, num_experts: int, probs: bool = False
    ):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = {
            "tokens": 0,
            "layers": list(layers),
            "top_k": top_k,
            "num_experts": num_experts,
            "probs": probs,
        }
        self.id_dtype = np.uint8 if num_experts <= 256 else np.uint16
        self.meta["expert_id_dtype"] = np.dtype(self.id_dtype).name
        names = ["token_ids", "doc_ids", "expert_ids", "weights"] + (["probs"] if probs else [])
        self.files = {n: open(self.dir / f"{n}.bin", "wb") for n in names}

    def append(self, chunk: Chunk) -> None:
        f = self.files
        f["token_ids"].write(chunk.token_ids_N.astype(np.int32).tobytes())
        f["doc_ids"].write(chunk.doc_ids_N.astype(np.int32).tobytes())
        f["expert_ids"].write(chunk.expert_ids_NLK.astype(self.id_dtype).tobytes())
        f["weights"].write(chunk.weights_NLK.astype(np.float16).tobytes())
        if "probs" in f:
            z = chunk.logits_NLE.astype(np.float64)
            p = np.exp(z - z.max(-1, keepdims=True))
            f["probs"].write((p / p.sum(-1, keepdims=True)).astype(np.float16).tobytes())
        self.meta["tokens"] += len(chunk.token_ids_N)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        (self.dir / "meta.json").write_text(json.dumps(self.meta, indent=1))


def load_records(directory: str | Path) -> dict[str, np.ndarray | dict]:
    """Memory-map a domain's records: {"meta", "token_ids", "doc_ids", "expert_ids", "weights"[, "probs"]}."""
    d = Path(directory)
    meta_file = d / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{d}: no meta.json (not a routing record folder, or recording did not finish)"
        )
    meta = json.loads(meta_file.read_text())
    N, L, K, E = meta["tokens"], len(meta["layers"]), meta["top_k"], meta["num_experts"]
    shapes = {
        "token_ids": (np.int32, (N,)),
        "doc_ids": (np.int32, (N,)),
        "expert_ids": (np.dtype(meta["expert_id_dtype"]), (N, L, K)),
        "weights": (np.float16, (N, L, K)),
    }
    if meta["probs"]:
        shapes["probs"] = (np.float16, (N, L, E))
    out: dict[str, np.ndarray | dict] = {"meta": meta}
    for name, (dtype, shape) in shapes.items():
        f = d / f"{name}.bin"
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not f.is_file() or f.stat().st_size != expected:
            size = f.stat().st_size if f.is_file() else "missing"
            raise ValueError(
                f"{f}: expected {expected} bytes for {shape} {np.dtype(dtype).name}, found {size}"
            )
        out[name] = np.memmap(f, dtype=dtype, mode="r", shape=shape) if N else np.zeros(shape, dtype)
    return out
