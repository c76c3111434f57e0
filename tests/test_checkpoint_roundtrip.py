"""Round trips between the Hugging Face layout, Mistral's consolidated layout and smoe."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import smoe
from smoe.checkpoint.keymap import halves_to_interleaved, interleaved_to_halves

TOKENS = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


@pytest.mark.parametrize(
    "overrides", [{}, {"num_local_experts": 1}, {"num_local_experts": 8, "sliding_window": 6}]
)
def test_hf_to_smoe_to_hf_to_transformers(make_hf, tmp_path, overrides):
    import transformers

    directory, ref = make_hf(**overrides)
    ours = smoe.load_model(directory)
    smoe.save_model(ours, tmp_path / "saved")
    cls = transformers.MixtralForCausalLM if ours.config.is_moe else transformers.MistralForCausalLM
    reloaded = cls.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, ref(TOKENS).logits, atol=1e-5, rtol=0)
    # And the tensors written are exactly those that were read.
    a, b = load_file(directory / "model.safetensors"), load_file(tmp_path / "saved" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _hf_to_consolidated_by_hand(hf_dir, out_dir, cfg):
    """Independent of smoe's key map: rename per mistral-inference and undo HF's rotary permutation
    the way Hugging Face's conversion script defines it (view(h, 2, d/h/2, in).transpose(1, 2))."""
    sd = load_file(hf_dir / "model.safetensors")
    out = {}

    def unpermute(w, heads):
        o, i = w.shape
        return w.view(heads, 2, o // heads // 2, i).transpose(1, 2).reshape(o, i).contiguous()

    for k, v in sd.items():
        k2 = (
            k.replace("model.embed_tokens", "tok_embeddings")
            .replace("lm_head", "output")
            .replace("model.norm", "norm")
        )
        k2 = k2.replace("model.layers", "layers").replace("self_attn.q_proj", "attention.wq")
        k2 = k2.replace("self_attn.k_proj", "attention.wk").replace("self_attn.v_proj", "attention.wv")
        k2 = k2.replace("self_attn.o_proj", "attention.wo").replace("input_layernorm", "attention_norm")
        k2 = k2.replace("post_attention_layernorm", "ffn_norm").replace("block_sparse_moe", "feed_forward")
        if k2.endswith("attention.wq.weight"):
            v = unpermute(v, cfg["num_attention_heads"])
        if k2.endswith("attention.wk.weight"):
            v = unpermute(v, cfg["num_key_value_heads"])
        out[k2] = v
    out_dir.mkdir()
    save_file(out, out_dir / "consolidated.safetensors")
    params = {
        "dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"],
        "hidden_dim": cfg["intermediate_size"], "n_heads": cfg["num_attention_heads"], "n_kv_heads": cfg["num_key_value_heads"],
        "norm_eps": cfg["rms_norm_eps"], "vocab_size": cfg["vocab_size"], "rope_theta": cfg["rope_parameters"]["rope_theta"],
        "moe": {"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"]},
    }  # fmt: skip
    (out_dir / "params.json").write_text(json.dumps(params))


def test_consolidated_equals_hf(make_hf, tmp_path):
    directory, ref = make_hf(num_local_experts=8)
    cfg = json.loads((directory / "config.json").read_text())
    _hf_to_consolidated_by_hand(directory, tmp_path / "cons", cfg)
    from_cons = smoe.load_model(tmp_path / "cons")
    from_hf = smoe.load_model(directory)
    torch.testing.assert_close(logits(from_cons), logits(from_hf), atol=1e-6, rtol=0)
    # smoe's own consolidated writer produces the same files.
    smoe.save_model(from_hf, tmp_path / "cons2", fmt="consolidated")
    a, b = (
        load_file(tmp_path / "cons" / "consolidated.safetensors"),
        load_file(tmp_path / "cons2" / "consolidated.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rotary_permutation_matches_interleaved_rope():
    """Rotating interleaved pairs (Mistral's complex-number rope) on consolidated weights equals
    rotate-half rope on the permuted weights, up to the same permutation of the output."""
    torch.manual_seed(0)
    heads, hd, dim, T = 2, 8, 16, 5
    w_cons = torch.randn(heads * hd, dim)
    x = torch.randn(T, dim)
    pos = torch.arange(T).float()
    inv = 1.0 / (1e4 ** (torch.arange(0, hd, 2).float() / hd))
    ang = pos[:, None] * inv  # (T, hd/2)
    # mistral-inference: view pairs as complex numbers and multiply by e^{i*angle}
    q = (x @ w_cons.T).view(T, heads, hd // 2, 2)
    qc = torch.view_as_complex(q.contiguous()) * torch.polar(torch.ones_like(ang), ang)[:, None, :]
    q_interleaved = torch.view_as_real(qc).reshape(T, heads, hd)
    # ours: rotate-half on the permuted weight
    from smoe.model.layers import apply_rope, rope_cos_sin

    w_hf = interleaved_to_halves(w_cons, heads)
    cos, sin = rope_cos_sin(torch.arange(T)[None], hd, 1e4, torch.float32)
    q_half = apply_rope((x @ w_hf.T).view(1, T, heads, hd).transpose(1, 2), cos, sin)[0].transpose(0, 1)
    # map back: within each head, halves -> interleaved
    q_back = q_half.reshape(T, heads, 2, hd // 2).transpose(2, 3).reshape(T, heads, hd)
    torch.testing.assert_close(q_back, q_interleaved, atol=1e-5, rtol=0)
    assert torch.equal(halves_to_interleaved(w_hf, heads), w_cons)


def test_sharded_loads_like_single(make_hf, tmp_path):
    directory, _ = make_hf(num_local_experts=4)
    model = smoe.load_model(directory)
    smoe.save_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    torch.testing.assert_close(logits(smoe.load_model(tmp_path / "sharded")), logits(model), atol=0, rtol=0)
    import transformers

    ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(TOKENS).logits, logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_on_load(make_hf, dtype):
    directory, ref = make_hf()
    model = smoe.load_model(directory, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    with torch.no_grad():
        got = model(TOKENS).float()
        want = ref(TOKENS).logits
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got, want, atol=tol, rtol=0.05)


def test_pickle_checkpoint_uses_weights_only(make_hf, tmp_path):
    directory, _ = make_hf()
    sd = load_file(directory / "model.safetensors")
    out = tmp_path / "pt"
    out.mkdir()
    (out / "config.json").write_text((directory / "config.json").read_text())
    torch.save(sd, out / "pytorch_model.bin")
    torch.testing.assert_close(
        logits(smoe.load_model(out)), logits(smoe.load_model(directory)), atol=0, rtol=0
    )
