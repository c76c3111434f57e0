"""Products of a few rows through a large weight, spread over every CPU thread.

Legend: N rows (a handful), K inputs, M outputs, S blocks (one per intra-op thread).

On this team's CPUs (torch's MKL build, AVX2) a product with one row runs on one core whatever
the intra-op thread count: ``torch.mv`` of an expert's 3584 x 1024 weight took 0.82 ms with one
thread and with two, and products of 2-16 rows cost 2-4x one row. One core cannot draw the
memory bandwidth that two can. Cut the weight's M outputs into S contiguous blocks, which is a
view, not a copy, and ``bmm`` runs one block per thread: 0.51 ms for that product with two
threads, and 1.6-1.7x faster than ``mm`` from 4 rows up (docs/benchmarks.md).

Both helpers fall back to one plain product where splitting does not pay: one thread (what a
process sharing its cores should set anyway), another device, a dtype other than float32 (the
16-bit products of an AVX2 CPU are compute-bound), M not divisible by the thread count, a
non-contiguous weight, a weight under ``SPLIT_MIN_WEIGHT`` elements (an expert of the
``small`` preset, 1408 x 256, decoded no faster split), or more than ``SPLIT_MAX_ROWS`` rows
(there the product is threaded already).
"""

from __future__ import annotations

import torch

SPLIT_MAX_ROWS = 16
SPLIT_MIN_WEIGHT = 1 << 20  # elements (4 MB in float32)


def blocks(x_NK: torch.Tensor, n_out: int) -> int:
    """How many output blocks to cut ``x_NK`` times a (K, n_out) weight into; 1: don't cut."""
    if (
        x_NK.device.type != "cpu"
        or x_NK.dtype != torch.float32
        or x_NK.shape[0] > SPLIT_MAX_ROWS
        or x_NK.shape[1] * n_out < SPLIT_MIN_WEIGHT
    ):
        return 1
    s = torch.get_num_threads()
    return s if s > 1 and n_out % s == 0 else 1


def _into(y_SNm: torch.Tensor, out_NM: torch.Tensor | None) -> torch.Tensor:
    """(S, N, M/S) blocks as one (N, M) tensor: a view when N == 1, else a copy (into out)."""
    S, N, m = y_SNm.shape
    y_NSm = y_SNm.transpose(0, 1)
    if out_NM is None:
        return y_NSm.reshape(N, S * m)
    out_NM.view(N, S, m).copy_(y_NSm)
    return out_NM


def rows_times_wt(x_NK: torch.Tensor, w_MK: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T for a weight stored (out, in), as ``nn.Linear`` stores it; into ``out`` if given."""
    N, K = x_NK.shape
    M = w_MK.shape[0]
    S = blocks(x_NK, M) if w_MK.is_contiguous() else 1
    if S == 1:
        return torch.mm(x_NK, w_MK.t(), out=out)
    # x repeated per block (a few KB): with a stride-0 x this bmm took a slow path, 12 ms for
    # the 3584 x 1024 example instead of 0.75 ms.
    y_SNm = torch.bmm(x_NK.expand(S, N, K).contiguous(), w_MK.view(S, M // S, K).transpose(1, 2))
    return _into(y_SNm, out)


def rows_times_w(x_NK: torch.Tensor, w_KM: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w for a weight stored (in, out), as ``smoe.decode_layout`` stores wide matrices."""
    N, K = x_NK.shape
    M = w_KM.shape[1]
    S = blocks(x_NK, M) if w_KM.is_contiguous() else 1
    if S == 1:
        return torch.mm(x_NK, w_KM, out=out)
    y_SNm = torch.bmm(x_NK.expand(S, N, K).contiguous(), w_KM.view(K, S, M // S).transpose(0, 1))
    return _into(y_SNm, out)
