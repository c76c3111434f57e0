"""Logits equal transformers' Mixtral / Mistral on the same weights."""

from __future__ import annotations

import pytest
import torch

import smoe

CASES = {
    "mixtral-8e-top2": dict(num_local_experts=8, num_experts_per_tok=2),
    "4e-top1": dict(num_local_experts=4, num_experts_per_tok=1),
    "4e-top3-mha": dict(num_local_experts=4, num_experts_per_tok=3, num_key_value_heads=4),
    "8e-top2-gqa4": dict(
        num_local_experts=8, num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=2
    ),
    "window-shorter-than-seq": dict(sliding_window=7),
    "head-dim-not-dim/heads": dict(head_dim=16, num_attention_heads=4, num_key_value_heads=1),
    "mistral-dense": dict(num_local_experts=1, sliding_window=5),
    "mistral-dense-mqa": dict(num_local_experts=1, num_key_value_heads=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(make_hf, case):
    directory, ref = make_hf(**CASES[case])
    ours = smoe.load_model(directory)
    tokens = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_router_matches_transformers(make_hf):
    directory, ref = make_hf(num_local_experts=8, num_experts_per_tok=2)
    ours = smoe.load_model(directory)
    tokens = torch.randint(0, 97, (1, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_out = ref(tokens, output_router_logits=True)
        logits, routing = ours(tokens, return_router=True)
    assert len(routing) == 2
    for layer, r in enumerate(routing):
        ref_logits = ref_out.router_logits[layer]
        torch.testing.assert_close(r.logits_TE, ref_logits.float(), atol=1e-5, rtol=0)
        # transformers: softmax over all, top-k, renormalise. Ours: top-k logits, softmax.
        probs = torch.softmax(ref_logits.float(), dim=-1)
        top_p, top_i = probs.topk(2, dim=-1)
        assert torch.equal(r.expert_ids_TK, top_i)
        torch.testing.assert_close(r.weights_TK, top_p / top_p.sum(-1, keepdim=True))
    assert routing[0].tokens_per_expert().sum().item() == 23 * 2


def test_tied_embeddings(make_hf):
    directory, ref = make_hf(tie_word_embeddings=True)
    ours = smoe.load_model(directory)
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=1e-4, rtol=0)
    assert ours.output.weight is ours.tok_embeddings.weight


def test_build_model_keeps_embeddings_tied(tmp_path):
    import transformers

    model = smoe.build_model(smoe.ModelConfig.preset("tiny", vocab_size=97, tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    smoe.save_model(model, tmp_path)
    ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("keep", [1, 3])
def test_logits_to_keep_matches_transformers(make_hf, keep):
    directory, ref = make_hf(num_local_experts=4, num_experts_per_tok=2, sliding_window=7)
    ours = smoe.load_model(directory)
    tokens = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(tokens, logits_to_keep=keep).logits
        got = ours(tokens, logits_to_keep=keep)
        full = ours(tokens)
    assert got.shape == expected.shape == (2, keep, 97)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, full[:, -keep:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        ours(tokens, logits_to_keep=-1)


PREFILL_CASES = {
    # Nemo-style head_dim, one kv head, rope_theta 1e6; chunks not aligned with the window.
    "headdim-mqa-theta1e6": (dict(head_dim=24, num_key_value_heads=1, sliding_window=5, rope_theta=1e6), [7, 3, 1, 6, 1, 1, 4]),
    "mha-tied": (dict(num_key_value_heads=4, sliding_window=6, tie_word_embeddings=True), [4, 9, 1, 1, 8]),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_chunked_prefill_matches_transformers(make_hf, case, dtype):
    """Through the rolling cache, in float32 and bfloat16 (both models in bfloat16)."""
    from smoe.cache import KVCache

    overrides, chunks = PREFILL_CASES[case]
    directory, ref = make_hf(**overrides)
    ours, ref = smoe.load_model(directory).to(dtype), ref.to(dtype)
    tokens = torch.randint(3, 97, (2, sum(chunks)), generator=torch.Generator().manual_seed(4))
    cache, out, s = KVCache.for_model(ours, 2, 32), [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(ours(tokens[:, s : s + n], torch.arange(s, s + n).expand(2, n), cache))
            s += n
        expected = ref(tokens).logits
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(torch.cat(out, dim=1).float(), expected.float(), atol=atol, rtol=0)
