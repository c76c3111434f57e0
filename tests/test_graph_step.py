"""The graphed decode step's protocol, on CPU without a graph: its warm-up (which a CUDA capture
runs after the prefill) writes only the cache's junk slot, and generation through it equals the
plain step, greedy and sampled, with left-padded batches and a rolling window that wraps.
The capture itself needs CUDA (benchmarks/gpu_session.sh runs the CUDA tests)."""

from __future__ import annotations

import pytest
import torch

import smoe
from smoe.cache import KVCache
from smoe.cli.main import main
from smoe.dispatch import triton_available
from smoe.generate import GenerationConfig, Generator
from smoe.graph_step import GraphedDecodeStep


@pytest.mark.parametrize("window", [None, 5], ids=["full", "rolling_window"])
def test_warmup_writes_only_the_junk_slot(make_hf, window):
    directory, _ = make_hf(sliding_window=window)
    model = smoe.load_model(directory).eval()
    B, T = 3, 9
    cache = KVCache.for_model(model, B, 24)
    tokens_BT = torch.randint(3, 97, (B, T), generator=torch.Generator().manual_seed(0))
    pos_BT = torch.arange(T).expand(B, T)
    with torch.inference_mode():
        model(tokens_BT, pos_BT, cache)
    S = cache.n_slots
    before = [t[:, :, :S].clone() for t in cache.k_BGSd + cache.v_BGSd], cache.pos_BS.clone()

    step = GraphedDecodeStep(lambda tok, pos, c: model(tok, pos, c)[:, -1], cuda_graph=False)
    step(tokens_BT[:, :1], torch.full((B, 1), T), cache)  # warm-up (pos -1), then the real step
    after = [t[:, :, :S] for t in cache.k_BGSd + cache.v_BGSd]
    # The real step wrote position T's slot; every other real slot is as the prefill left it.
    slot = T % S
    keep = [s for s in range(S) if s != slot]
    for b, a in zip(before[0], after):
        assert torch.equal(b[:, :, keep], a[:, :, keep])
    assert torch.equal(cache.pos_BS[:, keep], before[1][:, keep])
    assert (cache.pos_BS[:, S] == -1).all() and (cache.pos_BS[:, slot] == T).all()


@pytest.mark.parametrize("window", [None, 4], ids=["full", "rolling_window"])
@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_generator_through_the_graph_step_protocol_equals_the_plain_step(make_hf, window, temperature):
    directory, _ = make_hf(sliding_window=window)
    model = smoe.load_model(directory)
    prompts = [[5, 9, 11, 40, 7, 3, 8], [12, 60], [33, 34, 35, 36]]  # left-padded batch
    cfg = GenerationConfig(max_new_tokens=10, temperature=temperature, seed=3, stop_at_eos=False)
    plain = Generator(model, graph_step=False)
    graphed = Generator(model, graph_step=True)
    assert isinstance(graphed._decode_step, GraphedDecodeStep)
    assert not isinstance(plain._decode_step, GraphedDecodeStep)
    want = [c.token_ids for c in plain.generate(prompts, cfg)]
    for _ in range(2):  # the second run reuses the cache and the prepared step
        assert [c.token_ids for c in graphed.generate(prompts, cfg)] == want
    assert [c.token_ids for c in graphed.generate(prompts[:2], cfg)] == want[:2]  # a new cache


def test_graph_step_is_off_by_default_on_cpu(make_hf):
    directory, _ = make_hf()
    assert not isinstance(Generator(smoe.load_model(directory))._decode_step, GraphedDecodeStep)


def test_cli_accepts_no_cuda_graph(make_hf, capsys):
    directory, _ = make_hf(vocab_size=32000)
    rc = main(["generate", "--model", str(directory), "--prompt", "Hi", "--max-new-tokens", "3",
               "--temperature", "0", "--no-cuda-graph"])  # fmt: skip
    assert rc == 0
    assert "3 tokens" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_session.sh runs it)")
@pytest.mark.parametrize("dispatch", ["auto", "gather", "sorted"])
def test_cuda_graph_generation_equals_eager_steps(make_hf, dispatch):
    """On CUDA: the captured step gives the tokens of eager steps. "sorted" reads per-expert
    counts on the host for float32 (its loop path), so its capture must fail and fall back."""
    directory, _ = make_hf(sliding_window=4)
    model = smoe.load_model(directory, device="cuda", dispatch=dispatch)
    prompts = [[5, 9, 11, 40, 7, 3, 8], [12, 60], [33, 34, 35, 36]]
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.9, seed=3, stop_at_eos=False)
    want = [c.token_ids for c in Generator(model, graph_step=False).generate(prompts, cfg)]
    graphed = Generator(model)
    assert [c.token_ids for c in graphed.generate(prompts, cfg)] == want
    step = graphed._decode_step
    assert isinstance(step, GraphedDecodeStep)
    # "auto" runs triton on CUDA when it is installed (else gather or sorted, by token count).
    capturable = dispatch == "gather" or (dispatch == "auto" and triton_available())
    if dispatch != "auto" or capturable:
        assert (step._graph is not None) == capturable != step._eager
