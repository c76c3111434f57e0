"""Few-row float32 products and the decode step's attention and feed-forward as numba kernels,
for CPU decoding.

Legend: R rows (a handful), K inputs, N outputs, B batch rows, D model dim, E experts, F expert
hidden dim, X = 2F, A = B * top_k assignments, Q = (H + 2G) * Hd fused q/k/v outputs for H query
and G key/value heads of Hd, S cache slots.

Why: torch's CPU products with 1-8 rows (MKL on this team's AMD CPUs) read a weight at about
10 GB/s, half of what two cores draw, and cost nearly rows x the one-row time. A dot product
per output over the usual (out, in) row-major weight, with up to four rows sharing each loaded
weight vector and the outputs spread over the threads, reads the weight once at the memory's
speed: an expert's 256 -> 1408 up projection took 68-110 us for 1-4 rows against MKL's
91-243 us (docs/benchmarks.md). The feed-forward kernel also does RMSNorm, routing, SwiGLU and
the weighted sum, which are ~15 small tensor calls per layer in torch, in one call; the
attention kernel does RMSNorm, q/k/v, rope, the cache write, attention and wo in another.

Every kernel takes numpy views of contiguous float32 CPU tensors (``Tensor.numpy()`` shares
the memory) and writes its result in place. Sums are reordered (``fastmath``), so results equal
torch's to float rounding, not bitwise. numba is optional: ``available()`` says whether these
kernels can run, and ``smoe.fast_decode`` falls back to torch products without it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except ImportError:  # smoe runs without numba, on torch's products
    njit = None

_F32 = np.float32


def available() -> bool:
    """Whether numba is installed, so that the kernels below exist."""
    return njit is not None


_pool_started = False


def match_torch_threads() -> None:
    """Run the kernels on as many threads as torch's intra-op pool (``torch.set_num_threads``),
    within numba's own pool (``NUMBA_NUM_THREADS``).

    numba's OpenMP pool shares the OpenMP runtime with torch's CPU build, and starting it (on
    the first ``numba.get_num_threads``) sets that runtime's thread count to numba's pool
    size, so torch's count is put back once the pool runs; ``numba.set_num_threads`` later
    leaves it alone."""
    global _pool_started
    n_torch = torch.get_num_threads()
    if not _pool_started:
        numba.get_num_threads()
        _pool_started = True
        if torch.get_num_threads() != n_torch:
            torch.set_num_threads(n_torch)
    n = min(n_torch, numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def _dot_rows(x_RK, r0, nr, w_NK, n, out_RN, o0):
    """out[o0 + i, n] = dot(x[r0 + i], w[n]) for i < nr, four rows per pass over w[n].

    The three remainders each have a pass of their own: doing three rows as a pair and a single
    row made the ``small`` preset's batch-8 step ~10% slower (interleaved A/B, 5 pairs)."""
    K = x_RK.shape[1]
    i = 0
    while i + 4 <= nr:
        s0 = _F32(0.0)
        s1 = _F32(0.0)
        s2 = _F32(0.0)
        s3 = _F32(0.0)
        r = r0 + i
        for k in range(K):
            wv = w_NK[n, k]
            s0 += x_RK[r, k] * wv
            s1 += x_RK[r + 1, k] * wv
            s2 += x_RK[r + 2, k] * wv
            s3 += x_RK[r + 3, k] * wv
        out_RN[o0 + i, n] = s0
        out_RN[o0 + i + 1, n] = s1
        out_RN[o0 + i + 2, n] = s2
        out_RN[o0 + i + 3, n] = s3
        i += 4
    rest = nr - i
    r = r0 + i
    if rest == 3:
        s0 = _F32(0.0)
        s1 = _F32(0.0)
        s2 = _F32(0.0)
        for k in range(K):
            wv = w_NK[n, k]
            s0 += x_RK[r, k] * wv
            s1 += x_RK[r + 1, k] * wv
            s2 += x_RK[r + 2, k] * wv
        out_RN[o0 + i, n] = s0
        out_RN[o0 + i + 1, n] = s1
        out_RN[o0 + i + 2, n] = s2
    elif rest == 2:
        s0 = _F32(0.0)
        s1 = _F32(0.0)
        for k in range(K):
            wv = w_NK[n, k]
            s0 += x_RK[r, k] * wv
            s1 += x_RK[r + 1, k] * wv
        out_RN[o0 + i, n] = s0
        out_RN[o0 + i + 1, n] = s1
    elif rest == 1:
        s0 = _F32(0.0)
        for k in range(K):
            s0 += x_RK[r, k] * w_NK[n, k]
        out_RN[o0 + i, n] = s0


def _rms_norm_rows(x_BD, w_D, eps, out_BD):
    """out = x / sqrt(mean(x^2) + eps) * w, per row (the sum of squares in float64)."""
    B, D = x_BD.shape
    for b in range(B):
        ss = 0.0
        for d in range(D):
            ss += float(x_BD[b, d]) * float(x_BD[b, d])
        inv = _F32(1.0 / math.sqrt(ss / D + eps))
        for d in range(D):
            out_BD[b, d] = (x_BD[b, d] * inv) * w_D[d]


def _rows_times_wt(x_RK, w_NK, out_RN):
    """out = x @ w.T for a few rows; the outputs are spread over the threads."""
    R = x_RK.shape[0]
    for n in prange(w_NK.shape[0]):
        _dot_rows(x_RK, 0, R, w_NK, n, out_RN, 0)


def _route(h_BD, gate_ED, top_k, expert_A, weight_A, logits_BE):
    """Each row's top-k experts by router logit and their softmax weights over the chosen k,
    as the model routes; a dense layer (``gate_ED`` with 0 rows) sends every row to expert 0
    with weight 1. Fills expert_A and weight_A (A = B * k) and the logits_BE scratch.

    Returns True, with expert_A and weight_A unfinished, if a row's k-th largest logit ties
    with an expert left out: which of them ``torch.topk`` takes differs with the expert count
    (all-equal logits, top 2: experts 0 and 1 of 2, 2 and 3 of 4, 6 and 5 of 8), so the caller
    routes those layers with ``torch.topk`` itself."""
    B, D = h_BD.shape
    E = gate_ED.shape[0]
    if E == 0:
        for b in range(B):
            expert_A[b] = 0
            weight_A[b] = 1.0
        return False
    for b in range(B):  # every row's logits first: a tie hands them all to the caller
        for e in range(E):
            s = _F32(0.0)
            for d in range(D):
                s += h_BD[b, d] * gate_ED[e, d]
            logits_BE[b, e] = s
    chosen_K = np.empty(top_k, np.int64)
    for b in range(B):
        for j in range(top_k):  # the largest logit not yet taken
            best = -1
            for e in range(E):
                taken = False
                for i in range(j):
                    taken = taken or chosen_K[i] == e
                if not taken and (best < 0 or logits_BE[b, e] > logits_BE[b, best]):
                    best = e
            chosen_K[j] = best
        last = logits_BE[b, chosen_K[top_k - 1]]
        for e in range(E):
            taken = False
            for i in range(top_k):
                taken = taken or chosen_K[i] == e
            if not taken and logits_BE[b, e] == last:
                return True
        top = logits_BE[b, chosen_K[0]]
        total = 0.0
        for j in range(top_k):
            total += math.exp(float(logits_BE[b, chosen_K[j]] - top))
        for j in range(top_k):
            expert_A[b * top_k + j] = chosen_K[j]
            weight_A[b * top_k + j] = math.exp(float(logits_BE[b, chosen_K[j]] - top)) / total
    return False


def _group_by_expert(expert_A, weight_A, k, E):
    """A counting sort of the assignments by expert, stable in token order. Returns the
    grouped assignments' rows and weights, each expert's [start, end) in them, and the experts
    with at least one row (their count first)."""
    A = expert_A.shape[0]
    end_E = np.zeros(E, np.int64)
    for a in range(A):
        end_E[expert_A[a]] += 1
    for e in range(1, E):
        end_E[e] += end_E[e - 1]
    start_E = np.empty(E, np.int64)
    for e in range(E):
        start_E[e] = end_E[e - 1] if e > 0 else 0
    fill_E = start_E.copy()
    row_A = np.empty(A, np.int64)
    wsorted_A = np.empty(A, np.float32)
    for a in range(A):
        e = expert_A[a]
        row_A[fill_E[e]] = a // k
        wsorted_A[fill_E[e]] = weight_A[a]
        fill_E[e] += 1
    used_E = np.empty(E, np.int64)
    n_used = 0
    for e in range(E):
        if end_E[e] > start_E[e]:
            used_E[n_used] = e
            n_used += 1
    return row_A, wsorted_A, start_E, end_E, used_E[:n_used]


def _feed_forward(
    x_BD,
    norm_D,
    eps,
    gate_ED,
    w13_EXD,
    w2_EDF,
    top_k,
    routed,
    expert_A,
    weight_A,
    logits_BE,
    h_BD,
    h_AD,
    u_AX,
    g_AF,
    o_AD,
):
    """x += the layer's mixture of experts on RMSNorm(x), in place; returns False.

    ``gate_ED`` is the router, with 0 rows for a dense feed-forward (one expert, weight 1).
    ``w13_EXD`` is each expert's w1 (rows [:F]) and w3 (rows [F:]) stacked, (E, 2F, D);
    ``w2_EDF`` is (E, D, F). With A = B * top_k (B for a dense layer), expert_A (int64) and
    weight_A hold each assignment's expert and weight: written by the routing (``routed``
    False), or given (``routed`` True, with h_BD = RMSNorm(x) from the call before). If the
    routing meets a tie (``_route``) it returns True at once, x untouched, with h_BD and the
    router's logits in logits_BE (B, E). The rest is scratch: h_AD (A, D), u_AX (A, 2F),
    g_AF (A, F), o_AD (A, D).
    """
    B, D = x_BD.shape
    E, F = w2_EDF.shape[0], w2_EDF.shape[2]
    k = top_k if gate_ED.shape[0] > 0 else 1
    if not routed:
        _rms_norm_rows(x_BD, norm_D, eps, h_BD)
        if _route(h_BD, gate_ED, k, expert_A[: B * k], weight_A[: B * k], logits_BE):
            return True  # a tie: x untouched, h_BD and logits_BE filled for the caller
    row_A, wsorted_A, start_E, end_E, used_U = _group_by_expert(expert_A[: B * k], weight_A[: B * k], k, E)
    A, U = row_A.shape[0], used_U.shape[0]
    for a in range(A):
        for d in range(D):
            h_AD[a, d] = h_BD[row_A[a], d]
    # Up projections and SwiGLU: one (expert, hidden unit) pair per parallel iteration.
    for j in prange(U * F):
        e = used_U[j // F]
        f = j % F
        s, t = start_E[e], end_E[e]
        _dot_rows(h_AD, s, t - s, w13_EXD[e], f, u_AX, s)  # w1 rows
        _dot_rows(h_AD, s, t - s, w13_EXD[e], F + f, u_AX, s)  # w3 rows
        for a in range(s, t):
            u = u_AX[a, f]
            g_AF[a, f] = u / (_F32(1.0) + math.exp(-u)) * u_AX[a, F + f]
    # Down projections; each assignment's output is then scaled by its routing weight.
    for j in prange(U * D):
        e = used_U[j // D]
        d = j % D
        s, t = start_E[e], end_E[e]
        _dot_rows(g_AF, s, t - s, w2_EDF[e], d, o_AD, s)
    for a in range(A):
        b = row_A[a]
        for d in range(D):
            x_BD[b, d] += wsorted_A[a] * o_AD[a, d]
    return False


def _attention(
    x_BD,
    norm_D,
    eps,
    wqkv_QD,
    wo_DQ,
    cos_Bd,
    sin_Bd,
    k_BGSd,
    v_BGSd,
    slot_B,
    mask_BS,
    H,
    h_BD,
    qkv_BQ,
    o_BQ,
    y_BD,
):
    """x += attention(RMSNorm(x)) for one token per row, in place, with this layer's key/value
    cache: the new keys (rotated) and values are written to slot ``slot_B[b]``, then each head
    attends over the first ``mask_BS.shape[1]`` slots, ``mask_BS`` (0 or -inf) added to the
    scores. ``wqkv_QD`` is wq, wk, wv stacked by rows, ``wo_DQ`` as the model stores it.
    ``sin_Bd`` carries the "rotate half" sign: x * cos + roll(x, Hd / 2) * sin. The rest is
    scratch: h_BD, qkv_BQ (B, Q), o_BQ (B, H * Hd), y_BD (B, D)."""
    B, D = x_BD.shape
    G, Hd = k_BGSd.shape[1], k_BGSd.shape[3]
    n = mask_BS.shape[1]
    half = Hd // 2
    _rms_norm_rows(x_BD, norm_D, eps, h_BD)
    for j in prange(wqkv_QD.shape[0]):
        _dot_rows(h_BD, 0, B, wqkv_QD, j, qkv_BQ, 0)
    for b in range(B):  # rotate q and k, write k and v to the cache
        for head in range(H + G):
            o = head * Hd
            for i in range(half):
                a = qkv_BQ[b, o + i]
                c = qkv_BQ[b, o + half + i]
                qkv_BQ[b, o + i] = a * cos_Bd[b, i] + c * sin_Bd[b, i]
                qkv_BQ[b, o + half + i] = c * cos_Bd[b, half + i] + a * sin_Bd[b, half + i]
        for g in range(G):
            for i in range(Hd):
                k_BGSd[b, g, slot_B[b], i] = qkv_BQ[b, (H + g) * Hd + i]
                v_BGSd[b, g, slot_B[b], i] = qkv_BQ[b, (H + G + g) * Hd + i]
    scale = _F32(1.0 / math.sqrt(Hd))
    for j in prange(B * H):
        b = j // H
        h = j % H
        g = h // (H // G)
        scores = np.empty(n, np.float32)
        top = _F32(-np.inf)
        for s in range(n):
            acc = _F32(0.0)
            for i in range(Hd):
                acc += qkv_BQ[b, h * Hd + i] * k_BGSd[b, g, s, i]
            scores[s] = acc * scale + mask_BS[b, s]
            top = max(top, scores[s])
        total = _F32(0.0)
        for s in range(n):
            scores[s] = math.exp(scores[s] - top)
            total += scores[s]
        for i in range(Hd):
            o_BQ[b, h * Hd + i] = 0.0
        for s in range(n):
            p = scores[s] / total
            for i in range(Hd):
                o_BQ[b, h * Hd + i] += p * v_BGSd[b, g, s, i]
    for d in prange(D):
        _dot_rows(o_BQ, 0, B, wo_DQ, d, y_BD, 0)
    for b in range(B):
        for d in range(D):
            x_BD[b, d] += y_BD[b, d]


if njit is not None:
    _dot_rows = njit(inline="always", fastmath=True, cache=True)(_dot_rows)
    _rms_norm_rows = njit(fastmath=True, cache=True)(_rms_norm_rows)
    _route = njit(fastmath=True, cache=True)(_route)
    _group_by_expert = njit(cache=True)(_group_by_expert)
    rms_norm = _rms_norm_rows
    rows_times_wt = njit(parallel=True, fastmath=True, cache=True)(_rows_times_wt)
    feed_forward = njit(parallel=True, fastmath=True, cache=True)(_feed_forward)
    attention = njit(parallel=True, fastmath=True, cache=True)(_attention)
