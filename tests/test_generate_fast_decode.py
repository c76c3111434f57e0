"""The lean CPU decode step (smoe.fast_decode) against the readable model: per-step logits equal
the model's own cached forward and the full forward over the whole sequence, with rolling
buffers that wrap, left-padded rows of different lengths, dense and tied-embedding models; the
weight layout (smoe.decode_layout) keeps every value."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

try:
    import numba
except ImportError:
    numba = None

import smoe
from smoe import cpu_kernels
from smoe.cache import KVCache
from smoe.config import ModelConfig
from smoe.decode_layout import apply_decode_layout
from smoe.dispatch import split_rows
from smoe.fast_decode import FastDecodeStep, supports
from smoe.generate import GenerationConfig, Generator

LENS = [9, 3, 6]  # prompt lengths of the batch rows (left-padded to the longest)
STEPS = 12


def _prefill(model, toks_BT: torch.Tensor, lens: list[int], max_len: int) -> tuple[KVCache, torch.Tensor]:
    """Left-padded prefill through the model's forward (as smoe.generate does)."""
    B, L = len(lens), max(lens)
    tokens_BL = torch.zeros(B, L, dtype=torch.long)
    pos_BL = torch.full((B, L), -1)
    for b, n in enumerate(lens):
        tokens_BL[b, L - n :] = toks_BT[b, :n]
        pos_BL[b, L - n :] = torch.arange(n)
    cache = KVCache.for_model(model, B, max_len)
    model(tokens_BL, pos_BL, cache)
    return cache, pos_BL


def _decode_both(model, lens: list[int], seed: int = 0):
    """Decode STEPS tokens per row with the fast step and with the model, each on its own cache,
    feeding the same (random) tokens. Returns both logits (B, STEPS, V), the tokens and caches."""
    B = len(lens)
    V = model.config.vocab_size
    toks_BT = torch.randint(3, V, (B, max(lens) + STEPS), generator=torch.Generator().manual_seed(seed))
    max_len = max(lens) + STEPS
    with torch.inference_mode():
        ref_cache, _ = _prefill(model, toks_BT, lens, max_len)
        fast_cache, _ = _prefill(model, toks_BT, lens, max_len)
        step = FastDecodeStep(model)
        assert step.kernels == (cpu_kernels.available() and model.output.weight.dtype == torch.float32)
        ref, got = [], []
        for j in range(STEPS):
            tok_B1 = torch.stack([toks_BT[b, n + j] for b, n in enumerate(lens)])[:, None]
            pos_B1 = torch.tensor(lens)[:, None] + j
            ref.append(model(tok_B1, pos_B1, ref_cache)[:, -1])
            got.append(step(tok_B1, pos_B1, fast_cache))
    return torch.stack(ref, 1), torch.stack(got, 1), toks_BT, ref_cache, fast_cache


CASES = {
    "moe-full-buffer": dict(),
    "moe-window-wraps": dict(sliding_window=4),  # 4 < 9 + 12: the rolling buffer wraps
    "moe-mqa-top1": dict(num_key_value_heads=1, num_experts_per_tok=1),
    "moe-top3": dict(num_experts_per_tok=3),
    "moe-no-gqa-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "dense-mistral-window": dict(num_local_experts=1, sliding_window=5),
}


@pytest.mark.parametrize("lens", [LENS, [7], [5, 9, 2, 7, 4, 8, 3, 6, 1]], ids=["3-rows", "1-row", "9-rows"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_step_equals_model(make_hf, decode_engine, case, lens):
    """One row takes the residual-accumulating expert path, several rows the grouped one (and
    the oneDNN head; with the kernels from 5 rows), 9 rows take every remainder of the
    kernels' four-row groups."""
    directory, ref_hf = make_hf(**CASES[case])
    model = smoe.load_model(directory)
    ref, got, toks_BT, ref_cache, fast_cache = _decode_both(model, lens)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    # The cache the fast step leaves behind is the model's: same slot positions, same keys.
    assert torch.equal(fast_cache.pos_BS, ref_cache.pos_BS)
    for k_fast, k_ref in zip(fast_cache.k_BGSd + fast_cache.v_BGSd, ref_cache.k_BGSd + ref_cache.v_BGSd):
        torch.testing.assert_close(k_fast, k_ref, atol=2e-5, rtol=0)
    # And each row's decode logits are those of one full forward over its whole sequence,
    # in smoe and in transformers.
    with torch.no_grad():
        for b, n in enumerate(lens):
            seq_1T = toks_BT[b : b + 1, : n + STEPS]
            full = model(seq_1T)[0, n : n + STEPS]
            torch.testing.assert_close(got[b], full, atol=2e-5, rtol=0)
            torch.testing.assert_close(got[b], ref_hf(seq_1T).logits[0, n : n + STEPS], atol=1e-4, rtol=0)


def test_model_forward_continues_after_fast_steps(make_hf, decode_engine):
    """Fast steps then a multi-token chunk through the model (which reads the cache the fast
    steps wrote, rolling buffer included) equal the full forward."""
    directory, _ = make_hf(sliding_window=5)
    model = smoe.load_model(directory)
    toks_1T = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, 20)
        model(toks_1T[:, :6], None, cache)
        step = FastDecodeStep(model)
        for p in range(6, 13):
            step(toks_1T[:, p : p + 1], torch.tensor([[p]]), cache)
        tail = model(toks_1T[:, 13:], torch.arange(13, 20)[None], cache)
        torch.testing.assert_close(tail, model(toks_1T)[:, 13:], atol=2e-5, rtol=0)


def test_layout_keeps_values_and_checkpoints(make_hf, tmp_path):
    directory, _ = make_hf(tie_word_embeddings=True)
    model = smoe.load_model(directory)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
    w = apply_decode_layout(model)
    assert apply_decode_layout(model) is w  # idempotent
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model.output.weight is model.tok_embeddings.weight  # still tied
    # The parameters are views of the fused buffers, e.g. wk is the middle block of wqkv.
    a = model.layers[0].attention
    assert a.wk.weight.data_ptr() == w.layers[0].wqkv_DQ[:, a.wq.weight.shape[0]].data_ptr()
    assert model.layers[1].feed_forward.w3.data_ptr() == w.layers[1].w13_EDF2[0, 0, 48].data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), logits, atol=1e-5, rtol=0)
    smoe.save_model(model, tmp_path / "saved")
    reloaded = smoe.load_model(tmp_path / "saved")
    assert all(torch.equal(reloaded.state_dict()[k], before[k]) for k in before)


def test_refresh_after_parameters_are_replaced(make_hf, decode_engine):
    """load_state_dict(assign=True) replaces the parameters: the step must not keep decoding
    with the old buffers."""
    directory, _ = make_hf()
    model = smoe.load_model(directory)
    gen = Generator(model, cpu_layout=True)
    assert isinstance(gen._decode_step, FastDecodeStep)
    cfg = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    new_sd = {k: v.clone() * 1.5 for k, v in model.state_dict().items()}
    model.load_state_dict(new_sd, assign=True)
    assert not gen._decode_step.w.is_current()
    got = gen.generate([[1, 5, 9]], cfg)[0].token_ids
    assert gen._decode_step.w.is_current()
    expected = smoe.load_model(directory)
    expected.load_state_dict(new_sd)
    assert Generator(expected).generate([[1, 5, 9]], cfg)[0].token_ids == got


def test_in_place_weight_change_reaches_the_packed_head(decode_engine):
    """The head's packed copy (2+ rows, 5+ with the kernels) follows in-place updates: loading
    other weights into a model that a Generator already decoded with must decode with the new
    ones."""
    cfg = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2,
                      vocab_size=97, max_seq_len=64, num_experts=4, top_k=2)  # fmt: skip
    a, b = smoe.build_model(cfg, seed=1), smoe.build_model(cfg, seed=2)
    prompts = [[1, 5, 6, 7], [1, 9], [2], [3, 4], [1, 8, 8], [7]]
    gcfg = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    gen = Generator(a, cpu_layout=True)
    gen.generate(prompts, gcfg)
    a.load_state_dict(b.state_dict())  # in place, like an optimizer step
    got = [c.token_ids for c in gen.generate(prompts, gcfg)]
    assert got == [c.token_ids for c in Generator(b).generate(prompts, gcfg)]


def test_training_after_the_decode_layout_equals_training_without_it():
    """The layout's strided parameter views must train like plain parameters (torch's fused
    AdamW stepped column slices wrongly)."""
    from smoe.train.config import TrainConfig
    from smoe.train.optim import build_optimizer

    cfg = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2,
                      vocab_size=97, max_seq_len=64, num_experts=4, top_k=2)  # fmt: skip
    plain, laid = smoe.build_model(cfg, seed=3), smoe.build_model(cfg, seed=3)
    apply_decode_layout(laid)
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    tcfg = TrainConfig(lr=1e-2, warmup_steps=1, steps=3)
    for model in (plain, laid):
        opt = build_optimizer(model, tcfg)
        for _ in range(3):
            loss = model(tokens[:, :-1], targets_BT=tokens[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(plain.named_parameters(), laid.parameters()):
        assert (q - p).abs().max() < 5e-5, name  # rounding: ~1e-6; the fused bug: ~0.1


def test_generator_uses_fast_step_only_where_exact(make_hf, decode_engine):
    directory, _ = make_hf()
    assert isinstance(Generator(smoe.load_model(directory), cpu_layout=True)._decode_step, FastDecodeStep)
    assert not isinstance(Generator(smoe.load_model(directory))._decode_step, FastDecodeStep)
    capped = smoe.load_model(directory)
    for block in capped.layers:
        block.feed_forward.capacity_factor = 1.0
    assert "capacity" in supports(capped)
    with pytest.raises(ValueError, match="capacity"):
        FastDecodeStep(capped)
    gen = Generator(capped, cpu_layout=True)  # falls back to the model's step, laid out
    assert not isinstance(gen._decode_step, FastDecodeStep)
    # laid out: (in, out) storage for torch's products, (out, in) kept for the kernels
    assert capped.output.weight.is_contiguous() == (decode_engine == "numba")


def test_fast_step_rejects_wrong_shapes(make_hf):
    directory, _ = make_hf()
    model = smoe.load_model(directory)
    step, cache = FastDecodeStep(model), KVCache.for_model(model, 2, 8)
    with pytest.raises(ValueError, match="one token per row"):
        step(torch.ones(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="built for 2"):
        step(torch.ones(3, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long), cache)


def test_fast_step_with_a_padding_query(make_hf, decode_engine):
    """A row at a negative position (padding) writes the junk slot and sees every key, as in
    the model, and stays finite; the other rows are unaffected. (The padding row itself is
    rotated as position 0 rather than -1: its outputs are never used.)"""
    directory, _ = make_hf(sliding_window=4)
    model = smoe.load_model(directory)
    toks_BT = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        caches = [_prefill(model, toks_BT, [6, 6], 16)[0] for _ in range(2)]
        step = FastDecodeStep(model)
        for p in range(6, 8):
            pos_B1 = torch.tensor([[-1], [p]])
            ref = model(toks_BT[:, p : p + 1], pos_B1, caches[0])[:, -1]
            got = step(toks_BT[:, p : p + 1], pos_B1, caches[1])
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got[1], ref[1], atol=2e-5, rtol=0)
        assert torch.equal(caches[0].pos_BS, caches[1].pos_BS)
        for k_ref, k_fast in zip(caches[0].k_BGSd, caches[1].k_BGSd):  # all but the junk slot
            torch.testing.assert_close(k_fast[:, :, :-1], k_ref[:, :, :-1], atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_step_in_16_bit_keeps_the_usual_layout(make_hf, dtype):
    """16-bit weights stay (out, in) row-major (the transposed layout is several times slower
    for them on CPU); the step still equals the model's own cached forward within the dtype's
    rounding, on 3 left-padded rows and on 1."""
    directory, _ = make_hf(sliding_window=4)
    model = smoe.load_model(directory, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for lens in (LENS, [7]):
        ref, got, *_ = _decode_both(model, lens)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ref.float(), atol=0.05, rtol=0.02)
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    ff, attn = model.layers[0].feed_forward, model.layers[0].attention
    for p in (model.output.weight, attn.wq.weight, attn.wo.weight, ff.w1, ff.w2, ff.gate.weight):
        assert p.stride(-1) == 1 and p.stride(-2) == p.shape[-1]  # (out, in) rows, as loaded
    assert ff.w3.data_ptr() == ff.w1.data_ptr() + ff.w1.numel() // ff.w1.shape[0] * ff.w1.element_size()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_decode_benchmark_runs(monkeypatch, capsys, dtype):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_decode.py"
    spec = importlib.util.spec_from_file_location("cpu_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["cpu_decode.py", "--preset", "tiny", "--batch", "1", "2", "--new-tokens", "3", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--dispatch", "--dtype", dtype])
    mod.main()
    lines = capsys.readouterr().out.strip().splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| implementation | batch |") and f"tiny preset, {dtype}" in "\n".join(lines)
    assert [row.split(" | ")[:2] for row in table[1:]] == [
        ["| smoe fast", "1"], ["| transformers", "1"], ["| smoe fast", "2"], ["| transformers", "2"]
    ]  # fmt: skip


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("lens", [LENS, [7]], ids=["3-rows", "1-row"])
def test_fast_step_on_several_threads_equals_model(make_hf, monkeypatch, decode_engine, lens, threads):
    """With several threads the head and expert products are cut into one block per thread
    (smoe.dispatch.split_rows; here down to the smallest weights): hidden 48, dim 32 and vocab
    96 divide by 2 and 3, so every product splits (the head from 2 rows up uses oneDNN). The
    kernels follow torch's thread count."""
    monkeypatch.setattr(split_rows, "SPLIT_MIN_WEIGHT", 0)
    directory, _ = make_hf(vocab_size=96)
    model = smoe.load_model(directory)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref, got, *_ = _decode_both(model, lens)
        if decode_engine == "numba":
            assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_kernel_choice_is_explicit(make_hf):
    """kernels=False decodes on torch's products with their (in, out) float32 layout even with
    numba installed; kernels=True refuses 16-bit weights, or says numba is missing."""
    directory, _ = make_hf()
    model = smoe.load_model(directory)
    step = FastDecodeStep(model, kernels=False)
    assert not step.kernels and not model.output.weight.is_contiguous()
    if cpu_kernels.available():
        step = FastDecodeStep(model, kernels=True)
        assert step.kernels and model.output.weight.is_contiguous()
        with pytest.raises(ValueError, match="float32 only"):
            FastDecodeStep(smoe.load_model(directory, dtype=torch.bfloat16), kernels=True)
    else:
        with pytest.raises(ValueError, match="needs numba"):
            FastDecodeStep(model, kernels=True)


@pytest.mark.parametrize("n_experts", [2, 4, 8])
def test_tied_router_logits_pick_the_models_experts(decode_engine, n_experts):
    """A zeroed router ties every logit: the step must run the experts the model's torch.topk
    takes (which differ with the expert count), not its own choice."""
    cfg = ModelConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2,
                      vocab_size=97, max_seq_len=64, num_experts=n_experts, top_k=2)  # fmt: skip
    model = smoe.build_model(cfg, seed=1)
    with torch.no_grad():
        for block in model.layers:
            block.feed_forward.gate.weight.zero_()
    toks_B1, pos_B1 = torch.tensor([[5], [9], [11]]), torch.tensor([[0], [0], [0]])
    with torch.inference_mode():
        ref = model(toks_B1, pos_B1, KVCache.for_model(model, 3, 4))[:, -1]
        for rows in (slice(0, 1), slice(0, 3)):
            step = FastDecodeStep(model)
            got = step(toks_B1[rows], pos_B1[rows], KVCache.for_model(model, rows.stop, 4))
            torch.testing.assert_close(got, ref[rows], atol=2e-5, rtol=0)


def test_fast_step_refuses_positions_past_the_cache_or_the_model(decode_engine):
    """As the model's forward: a position past the cache's max_len (a full buffer would wrap
    onto position 0) or the model's max_seq_len is a clear error, and nothing is written."""
    cfg = ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2,
                      vocab_size=97, max_seq_len=64, num_experts=4, top_k=2)  # fmt: skip
    model = smoe.build_model(cfg, seed=0)
    tok_11, step = torch.tensor([[5]]), FastDecodeStep(model)
    with torch.inference_mode():
        step(tok_11, torch.tensor([[0]]), KVCache.for_model(model, 1, 16))  # a longer rope table first
        cache = KVCache.for_model(model, 1, 8)
        with pytest.raises(ValueError, match="position 8 is past the cache's max_len of 8"):
            step(tok_11, torch.tensor([[8]]), cache)
        assert (cache.pos_BS == -1).all()
        with pytest.raises(ValueError, match="past the model's max_seq_len of 64"):
            step(tok_11, torch.tensor([[64]]), KVCache.for_model(model, 1, 80))
