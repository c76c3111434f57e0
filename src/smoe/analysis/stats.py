"""Routing statistics accumulated while streaming over a corpus, and their chance baselines.

Legend: N tokens in a chunk, L analysed layers, K experts chosen per token, E experts, V vocabulary.

Every statistic here is a sum of counts, so a corpus of any size is processed chunk by chunk in
bounded memory and the result does not depend on how the corpus was cut into chunks or windows.
A chunk is a run of tokens in corpus order with the document id of each token; two consecutive
tokens form a *pair* (for the repeat rates of the Mixtral paper, Table 5) only when they belong to
the same document, including a pair split across two chunks (the last token of a chunk is kept).
"""

from __future__ import annotations

from math import comb

import numpy as np


def chance_first(num_experts: int, top_k: int) -> float:
    """P(two tokens share their first-choice expert) when each picks uniformly at random: 1/E."""
    _check_ek(num_experts, top_k)
    return 1.0 / num_experts


def chance_any(num_experts: int, top_k: int) -> float:
    """P(two uniformly random k-subsets of E experts overlap) = 1 - C(E-k, k) / C(E, k).

    The second token's k experts miss all of the first token's k in C(E-k, k) of the C(E, k)
    equally likely subsets. For E=8, k=2: 1 - 15/28 = 46.4%.
    """
    _check_ek(num_experts, top_k)
    return 1.0 - comb(num_experts - top_k, top_k) / comb(num_experts, top_k)


def _check_ek(num_experts: int, top_k: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")


class DomainStats:
    """Counts for one domain over L analysed layers, updated chunk by chunk.

    share_LE     every one of the top-k assignments, per layer and expert
    first_LE     first-choice (highest-weight) assignments only
    same_first_L consecutive in-document pairs whose first-choice experts are equal
    overlap_L    consecutive in-document pairs whose top-k sets share at least one expert
    cosel_LEE    tokens that chose both expert i and expert j (i != j; symmetric, diagonal 0)
    entropy_L    sum over tokens of the entropy (nats) of the softmax over all E router logits
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        L, E = num_layers, num_experts
        self.num_experts, self.top_k = E, top_k
        self.tokens = 0
        self.documents = 0
        self.pairs = 0
        self.share_LE = np.zeros((L, E), np.int64)
        self.first_LE = np.zeros((L, E), np.int64)
        self.same_first_L = np.zeros(L, np.int64)
        self.overlap_L = np.zeros(L, np.int64)
        self.cosel_LEE = np.zeros((L, E, E), np.int64)
        self.entropy_L = np.zeros(L, np.float64)
        self._last_doc: int | None = None
        self._last_ids_LK: np.ndarray | None = None

    def update(self, doc_ids_N: np.ndarray, expert_ids_NLK: np.ndarray, entropy_NL: np.ndarray) -> None:
        """Add one chunk. ``doc_ids_N`` must be non-decreasing across all chunks of the domain."""
        N, L, K = expert_ids_NLK.shape
        if N == 0:
            return
        E = self.num_experts
        ids = expert_ids_NLK.astype(np.int64)
        docs = doc_ids_N.astype(np.int64)
        if self._last_doc is not None and docs[0] < self._last_doc:
            raise ValueError(
                f"document ids must not decrease across chunks ({self._last_doc} then {docs[0]})"
            )
        new_docs = np.count_nonzero(np.diff(docs)) + (1 if self._last_doc != docs[0] else 0)
        self.documents += int(new_docs)
        self.tokens += N
        layer_L = np.arange(L)
        flat = (layer_L[None, :, None] * E + ids).reshape(-1)
        self.share_LE += np.bincount(flat, minlength=L * E).reshape(L, E)
        self.first_LE += np.bincount(
            (layer_L[None, :] * E + ids[:, :, 0]).reshape(-1), minlength=L * E
        ).reshape(L, E)
        for a in range(K):
            for b in range(a + 1, K):
                i, j = ids[:, :, a], ids[:, :, b]
                both = np.concatenate([(layer_L * E + i) * E + j, (layer_L * E + j) * E + i]).reshape(-1)
                self.cosel_LEE += np.bincount(both, minlength=L * E * E).reshape(L, E, E)
        self.entropy_L += entropy_NL.astype(np.float64).sum(0)

        # Pairs (t, t+1) inside one document, with the previous chunk's last token in front.
        if self._last_doc is not None:
            ids = np.concatenate([self._last_ids_LK[None].astype(np.int64), ids])
            docs = np.concatenate([[self._last_doc], docs])
        same_doc = docs[1:] == docs[:-1]
        prev, nxt = ids[:-1][same_doc], ids[1:][same_doc]  # (P, L, K)
        self.pairs += int(same_doc.sum())
        self.same_first_L += (prev[:, :, 0] == nxt[:, :, 0]).sum(0)
        self.overlap_L += (prev[:, :, :, None] == nxt[:, :, None, :]).any(axis=(2, 3)).sum(0)
        self._last_doc, self._last_ids_LK = int(docs[-1]), ids[-1].copy()

    # ------------------------------------------------------------------ derived numbers
    def expert_share(self) -> np.ndarray:
        """(L, E) fraction of all top-k assignments going to each expert (rows sum to 1)."""
        return self.share_LE / max(self.tokens * self.top_k, 1)

    def first_choice_share(self) -> np.ndarray:
        return self.first_LE / max(self.tokens, 1)

    def repeat_first(self) -> np.ndarray:
        return self.same_first_L / self.pairs if self.pairs else np.full(len(self.same_first_L), np.nan)

    def repeat_first_independent(self) -> np.ndarray:
        """(L,) the first-choice repeat rate if consecutive tokens drew their experts independently
        from this domain's own first-choice distribution: sum_e share_e^2. Equals 1/E for uniform
        shares and grows with imbalance, so it separates "consecutive tokens stick together" from
        "most tokens go to the same expert anyway"."""
        return (self.first_choice_share() ** 2).sum(1)

    def repeat_any(self) -> np.ndarray:
        return self.overlap_L / self.pairs if self.pairs else np.full(len(self.overlap_L), np.nan)

    def mean_entropy(self) -> np.ndarray:
        return self.entropy_L / max(self.tokens, 1)

    def imbalance(self) -> np.ndarray:
        """(L,) max over experts of the tokens an expert received, divided by the mean (1 = balanced)."""
        mean = self.share_LE.mean(1)
        return np.where(mean > 0, self.share_LE.max(1) / np.maximum(mean, 1e-12), np.nan)


def merge(stats: list[DomainStats]) -> DomainStats:
    """All domains together (for the load and health section)."""
    first = stats[0]
    out = DomainStats(first.share_LE.shape[0], first.num_experts, first.top_k)
    for s in stats:
        out.tokens += s.tokens
        out.documents += s.documents
        out.pairs += s.pairs
        for name in ("share_LE", "first_LE", "same_first_L", "overlap_L", "cosel_LEE", "entropy_L"):
            getattr(out, name).__iadd__(getattr(s, name))
    return out


def router_entropy(logits_NE: np.ndarray) -> np.ndarray:
    """Entropy in nats of softmax(logits) along the last axis, computed in float64."""
    z = logits_NE.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


class TokenExpertCounts:
    """First-choice counts per (vocabulary item, expert) at a few layers, over all domains.

    Raw counts favour frequent tokens (every expert's top list would start with '▁the', ','),
    so tokens are ranked by P(expert | token) = count(token -> expert) / count(token), among
    tokens seen at least ``min_count`` times; ties are broken by the count itself.
    """

    def __init__(self, layers: list[int], vocab_size: int, num_experts: int):
        self.layers, self.V, self.E = list(layers), vocab_size, num_experts
        self.counts_LVE = np.zeros((len(self.layers), vocab_size, num_experts), np.int32)
        self.token_V = np.zeros(vocab_size, np.int64)

    def update(self, token_ids_N: np.ndarray, first_NL: np.ndarray) -> None:
        """``first_NL`` holds the first-choice experts at ``self.layers`` (in that order)."""
        tok = token_ids_N.astype(np.int64)
        self.token_V += np.bincount(tok, minlength=self.V)
        for i in range(len(self.layers)):
            flat = tok * self.E + first_NL[:, i].astype(np.int64)
            self.counts_LVE[i] += (
                np.bincount(flat, minlength=self.V * self.E).reshape(self.V, self.E).astype(np.int32)
            )

    def top(self, layer_pos: int, expert: int, n: int, min_count: int) -> list[tuple[int, float, int, int]]:
        """The ``n`` tokens with the highest P(expert | token) at ``self.layers[layer_pos]``:
        (token id, probability, count routed to the expert, count of the token)."""
        c_V = self.counts_LVE[layer_pos, :, expert].astype(np.int64)
        ok = np.flatnonzero((self.token_V >= min_count) & (c_V > 0))
        p = c_V[ok] / self.token_V[ok]
        order = np.lexsort((-c_V[ok], -p))[:n]
        return [(int(ok[i]), float(p[i]), int(c_V[ok[i]]), int(self.token_V[ok[i]])) for i in order]
