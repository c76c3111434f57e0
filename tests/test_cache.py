"""KV cache: incremental decode equals one full forward (ours and transformers'), with full and
rolling buffers, chunked prefill (chunks shorter and longer than the window) and left padding."""

from __future__ import annotations

import pytest
import torch

import smoe
from smoe.cache import KVCache

SEQ = 23


def _tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def _incremental(
    model, tokens_BT: torch.Tensor, chunks: list[int], max_len: int
) -> tuple[torch.Tensor, KVCache]:
    """Logits from feeding ``tokens_BT`` in the given chunk sizes through one cache."""
    B, T = tokens_BT.shape
    cache = KVCache.for_model(model, B, max_len)
    out, s = [], 0
    with torch.no_grad():
        for n in chunks:
            pos_BT = torch.arange(s, s + n).expand(B, n)
            out.append(model(tokens_BT[:, s : s + n], pos_BT, cache))
            s += n
    assert s == T
    return torch.cat(out, dim=1), cache


# (sliding window, chunk sizes): every prefill chunking ends in single-token decode steps.
CASES = {
    "full-buffer-decode": (None, [1] * SEQ),
    "full-buffer-chunked": (None, [6, 6, 1, 1, 4] + [1] * 5),
    "window-rolls-decode": (5, [1] * SEQ),
    "window-chunk-shorter": (5, [3, 3, 2] + [1] * 15),
    "window-chunk-longer": (5, [9, 7] + [1] * 7),  # chunk > window: needs pre-write keys
    "window-one-big-chunk": (5, [SEQ - 2, 1, 1]),
    "window-equal-chunk": (5, [5, 5, 5, 1, 1, 1, 5]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_incremental_equals_full_forward(make_hf, case):
    window, chunks = CASES[case]
    directory, ref = make_hf(sliding_window=window)
    model = smoe.load_model(directory)
    tokens = _tokens(2, SEQ)
    with torch.no_grad():
        full = model(tokens)
        theirs = ref(tokens).logits
    got, cache = _incremental(model, tokens, chunks, max_len=SEQ + 4)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, theirs, atol=1e-4, rtol=0)
    if window is not None:  # memory bounded by the window, not the sequence
        assert cache.rolling and cache.n_slots == window
        assert cache.k_BGSd[0].shape[2] == window + 1


def test_dense_mistral_rolling(make_hf):
    directory, ref = make_hf(num_local_experts=1, sliding_window=4)
    model = smoe.load_model(directory)
    tokens = _tokens(1, 17, seed=3)
    got, _ = _incremental(model, tokens, [6, 1, 1, 9], max_len=40)
    with torch.no_grad():
        torch.testing.assert_close(got, ref(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("window", [None, 4])
def test_left_padded_rows_equal_solo(make_hf, window):
    """Rows of different lengths, left-padded with position -1, give their solo logits; the
    pad query rows stay finite (SDPA would give NaN for a fully masked row)."""
    directory, _ = make_hf(sliding_window=window)
    model = smoe.load_model(directory)
    lens = [9, 4, 7]
    L = max(lens)
    toks = _tokens(3, L, seed=5)
    tokens_BL = torch.zeros(3, L, dtype=torch.long)
    pos_BL = torch.full((3, L), -1)
    for b, n in enumerate(lens):
        tokens_BL[b, L - n :] = toks[b, :n]
        pos_BL[b, L - n :] = torch.arange(n)
    cache = KVCache.for_model(model, 3, 20)
    with torch.no_grad():
        pre = model(tokens_BL[:, :5], pos_BL[:, :5], cache)  # a chunk made of padding for row 1
        pre = torch.cat([pre, model(tokens_BL[:, 5:], pos_BL[:, 5:], cache)], dim=1)
        nxt_B1 = torch.tensor([[11], [12], [13]])
        step = model(nxt_B1, torch.tensor(lens).unsqueeze(1), cache)
        assert torch.isfinite(pre).all()
        for b, n in enumerate(lens):
            solo_tokens = torch.cat([toks[b : b + 1, :n], nxt_B1[b : b + 1]], dim=1)
            solo = model(solo_tokens)
            torch.testing.assert_close(pre[b, L - n :], solo[0, :n], atol=1e-5, rtol=0)
            torch.testing.assert_close(step[b, 0], solo[0, n], atol=1e-5, rtol=0)


def test_rolling_slots_hold_latest_positions(make_hf):
    """The docstring's example: W = 4, positions 0..5 -> slots hold 4 5 2 3, junk slot -1."""
    directory, _ = make_hf(sliding_window=4)
    model = smoe.load_model(directory)
    _, cache = _incremental(model, _tokens(1, 6), [3, 1, 2], max_len=30)
    assert cache.pos_BS.tolist() == [[4, 5, 2, 3, -1]]
    cache.reset()
    assert (cache.pos_BS == -1).all()


def test_cache_rejects_wrong_batch(make_hf):
    directory, _ = make_hf()
    model = smoe.load_model(directory)
    cache = KVCache.for_model(model, 2, 8)
    with pytest.raises(ValueError, match="built for 2"):
        model(_tokens(3, 2), torch.zeros(3, 2, dtype=torch.long), cache)


def test_repeated_kv_heads_path_equals_gqa(make_hf, monkeypatch):
    """The CUDA prefill path that repeats kv heads instead of SDPA's enable_gqa (so a masked
    prefill avoids the math kernel), forced on the CPU: the same logits."""
    import smoe.model.layers as layers

    directory, _ = make_hf(sliding_window=5)
    model = smoe.load_model(directory)
    assert model.config.n_heads != model.config.n_kv_heads
    tokens = _tokens(2, SEQ)
    chunks = CASES["window-chunk-longer"][1]
    want, _ = _incremental(model, tokens, chunks, max_len=SEQ + 4)
    monkeypatch.setattr(layers, "masked_gqa_falls_to_math", lambda q, mask: mask is not None)
    got, _ = _incremental(model, tokens, chunks, max_len=SEQ + 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
