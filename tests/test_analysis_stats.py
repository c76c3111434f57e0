"""Routing statistics against closed forms, brute-force enumeration and naive loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from smoe.analysis.record import windows
from smoe.analysis.stats import DomainStats, chance_any, chance_first, router_entropy


@pytest.mark.parametrize("E,k", [(8, 2), (4, 1), (4, 2), (6, 3), (10, 3), (3, 3)])
def test_chance_baselines_match_enumeration(E, k):
    subsets = list(itertools.combinations(range(E), k))
    overlap = sum(bool(set(a) & set(b)) for a in subsets for b in subsets) / len(subsets) ** 2
    first = sum(a == b for a in range(E) for b in range(E)) / E**2
    assert chance_any(E, k) == pytest.approx(overlap, abs=1e-12)
    assert chance_first(E, k) == pytest.approx(first, abs=1e-12)


def test_chance_baselines_paper_values():
    assert chance_first(8, 2) == 0.125
    assert round(100 * chance_any(8, 2), 1) == 46.4  # the Mixtral paper's 46.4%
    with pytest.raises(ValueError, match="top_k"):
        chance_any(4, 5)


def _random_routing(rng, N, L, E, K):
    return np.argsort(rng.random((N, L, E)), axis=-1)[:, :, :K]  # K distinct uniform experts


@pytest.mark.parametrize("E,K", [(8, 2), (4, 1), (16, 4)])
def test_random_router_lands_near_chance(E, K):
    rng = np.random.default_rng(E * 10 + K)
    N, L = 20000, 2
    s = DomainStats(L, E, K)
    s.update(np.zeros(N, np.int64), _random_routing(rng, N, L, E, K), np.zeros((N, L)))
    for observed, p in ((s.repeat_first(), chance_first(E, K)), (s.repeat_any(), chance_any(E, K))):
        bound = 5 * math.sqrt(p * (1 - p) / (N - 1))  # 5 standard deviations of a binomial proportion
        assert np.all(np.abs(observed - p) < bound), (observed, p, bound)
    assert np.allclose(s.expert_share(), 1 / E, atol=5 * math.sqrt(1 / E / (N * K)))


def _naive(doc_ids, ids_NLK, E):
    N, L, K = ids_NLK.shape
    same, anyo, pairs = np.zeros(L), np.zeros(L), 0
    for t in range(N - 1):
        if doc_ids[t] != doc_ids[t + 1]:
            continue
        pairs += 1
        for layer in range(L):
            same[layer] += ids_NLK[t, layer, 0] == ids_NLK[t + 1, layer, 0]
            anyo[layer] += bool(set(ids_NLK[t, layer]) & set(ids_NLK[t + 1, layer]))
    share = np.zeros((L, E))
    for t in range(N):
        for layer in range(L):
            for e in ids_NLK[t, layer]:
                share[layer, e] += 1
    return same / pairs, anyo / pairs, share / (N * K), pairs


def test_pairs_never_cross_documents_and_chunking_does_not_matter():
    rng = np.random.default_rng(0)
    N, L, E, K = 600, 3, 6, 2
    doc_ids = np.sort(rng.integers(0, 40, N))
    ids = _random_routing(rng, N, L, E, K)
    # Make every document boundary a first-choice repeat, so counting across one would show.
    for t in np.flatnonzero(np.diff(doc_ids)):
        ids[t + 1, :, 0] = ids[t, :, 0]
        ids[t + 1, :, 1] = (ids[t, :, 0] + 1) % E
    want_first, want_any, want_share, want_pairs = _naive(doc_ids, ids, E)
    assert want_pairs == N - len(np.unique(doc_ids))
    cuts = np.sort(rng.choice(np.arange(1, N), 25, replace=False))
    for bounds in ([0, N], [0, *cuts, N]):
        s = DomainStats(L, E, K)
        for a, b in zip(bounds[:-1], bounds[1:]):
            s.update(doc_ids[a:b], ids[a:b], np.zeros((b - a, L)))
        assert s.pairs == want_pairs
        assert s.documents == len(np.unique(doc_ids))
        np.testing.assert_allclose(s.repeat_first(), want_first)
        np.testing.assert_allclose(s.repeat_any(), want_any)
        np.testing.assert_allclose(s.expert_share(), want_share)
        assert np.allclose(s.expert_share().sum(1), 1.0)


def test_coselection_counts_pairs_of_chosen_experts():
    ids = np.array([[[0, 1]], [[1, 0]], [[2, 3]]])  # (N=3, L=1, K=2)
    s = DomainStats(1, 4, 2)
    s.update(np.arange(3), ids, np.zeros((3, 1)))
    want = np.zeros((4, 4), int)
    want[0, 1] = want[1, 0] = 2
    want[2, 3] = want[3, 2] = 1
    np.testing.assert_array_equal(s.cosel_LEE[0], want)
    assert s.pairs == 0 and np.isnan(s.repeat_first()).all()  # three one-token documents


def test_router_entropy_closed_form():
    assert router_entropy(np.zeros((1, 8)))[0] == pytest.approx(math.log(8))
    p = np.array([0.5, 0.25, 0.25])
    assert router_entropy(np.log(p)[None])[0] == pytest.approx(-(p * np.log(p)).sum())


@pytest.mark.parametrize("n,seq_len,overlap", [(7, 4, 2), (1, 4, 0), (8, 4, 0), (9, 4, 3), (100, 7, 2)])
def test_windows_record_every_token_once_within_the_context(n, seq_len, overlap):
    ws = windows(n, seq_len, overlap)
    recorded = [t for _, s, e in ws for t in range(s, e)]
    assert recorded == list(range(n))
    for run_start, s, e in ws:
        assert e - run_start <= seq_len
        assert s - run_start == (0 if s == 0 else overlap)
    assert windows(7, 4, 2) == [(0, 0, 4), (2, 4, 6), (4, 6, 7)]  # the docstring's example
    assert windows(10, 4, 1) == [(0, 0, 4), (3, 4, 7), (6, 7, 10)]  # window 0 records [0, seq_len)
