"""The original Mixtral-8x7B release (Dec 2023, consolidated.00.pt ... consolidated.07.pt with
params.json) stores each layer's experts fused, unlike mistral-inference's later
``feed_forward.experts.{e}.w1.weight``::

    layers.0.block_sparse_moe.gate.weight  (E, D)
    layers.0.block_sparse_moe.w1           (E*F, D)  expert e: rows e*F..(e+1)*F
    layers.0.block_sparse_moe.w2           (E*F, D)  expert e: the same rows, transposed to (D, F)
    layers.0.block_sparse_moe.w3           (E*F, D)

as read by Hugging Face's convert_mixtral_weights_to_hf.py. Such a directory, in several
pickle shards, must give transformers' logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import smoe

TOKENS = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))


def write_release(hf_dir, out_dir, suffix: str, n_shards: int) -> None:
    """Hugging Face weights -> the release layout, written without smoe's key map: inverse of
    the conversion script (rotary rows back to interleaved pairs, experts concatenated, w2
    transposed), split over ``n_shards`` pickles by layer."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    E, F = cfg["num_local_experts"], cfg["intermediate_size"]
    sd = load_file(hf_dir / "model.safetensors")

    def unpermute(w, heads):
        o, i = w.shape
        return w.view(heads, 2, o // heads // 2, i).transpose(1, 2).reshape(o, i).contiguous()

    def layer(i):
        hf, p = f"model.layers.{i}", f"layers.{i}"
        experts = f"{hf}.block_sparse_moe.experts"
        out = {
            f"{p}.attention_norm.weight": sd[f"{hf}.input_layernorm.weight"],
            f"{p}.ffn_norm.weight": sd[f"{hf}.post_attention_layernorm.weight"],
            f"{p}.attention.wq.weight": unpermute(sd[f"{hf}.self_attn.q_proj.weight"], cfg["num_attention_heads"]),
            f"{p}.attention.wk.weight": unpermute(sd[f"{hf}.self_attn.k_proj.weight"], cfg["num_key_value_heads"]),
            f"{p}.attention.wv.weight": sd[f"{hf}.self_attn.v_proj.weight"],
            f"{p}.attention.wo.weight": sd[f"{hf}.self_attn.o_proj.weight"],
            f"{p}.block_sparse_moe.gate.weight": sd[f"{hf}.block_sparse_moe.gate.weight"],
            f"{p}.block_sparse_moe.w1": torch.cat([sd[f"{experts}.{e}.w1.weight"] for e in range(E)]),
            f"{p}.block_sparse_moe.w2": torch.cat([sd[f"{experts}.{e}.w2.weight"].T for e in range(E)]),
            f"{p}.block_sparse_moe.w3": torch.cat([sd[f"{experts}.{e}.w3.weight"] for e in range(E)]),
        }  # fmt: skip
        assert out[f"{p}.block_sparse_moe.w2"].shape == (E * F, cfg["hidden_size"])
        return {k: v.contiguous() for k, v in out.items()}

    n_layers = cfg["num_hidden_layers"]
    shards = [{} for _ in range(n_shards)]
    shards[0]["tok_embeddings.weight"] = sd["model.embed_tokens.weight"]
    for i in range(n_layers):
        shards[min(i * n_shards // n_layers, n_shards - 1)].update(layer(i))
    shards[-1]["norm.weight"] = sd["model.norm.weight"]
    shards[-1]["output.weight"] = sd["lm_head.weight"]
    out_dir.mkdir()
    for s, shard in enumerate(shards):
        torch.save(shard, out_dir / f"consolidated.{s:02d}{suffix}")
    # params.json as in the release: no rope_theta there then; it is given here because the
    # reference model uses 1e4.
    params = {
        "dim": cfg["hidden_size"], "n_layers": n_layers, "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"],
        "hidden_dim": F, "n_heads": cfg["num_attention_heads"], "n_kv_heads": cfg["num_key_value_heads"],
        "norm_eps": cfg["rms_norm_eps"], "vocab_size": cfg["vocab_size"], "rope_theta": cfg["rope_parameters"]["rope_theta"],
        "moe": {"num_experts_per_tok": cfg["num_experts_per_tok"], "num_experts": E},
    }  # fmt: skip
    (out_dir / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_original_release_layout_in_shards_gives_transformers_logits(make_hf, tmp_path, suffix):
    hf_dir, ref = make_hf(num_local_experts=4, num_hidden_layers=3)
    write_release(hf_dir, tmp_path / "release", suffix, n_shards=3)
    model = smoe.load_model(tmp_path / "release")
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), ref(TOKENS).logits, atol=1e-5, rtol=0)
    # The same weights as from the Hugging Face copy, bit for bit.
    from_hf = smoe.load_model(hf_dir).state_dict()
    assert all(torch.equal(t, from_hf[k]) for k, t in model.state_dict().items())
    # And the key map's inverse gives back the stored tensors.
    from smoe.checkpoint.keymap import consolidated_recipes

    stored = {}
    for f in sorted((tmp_path / "release").glob("consolidated.*")):
        stored |= torch.load(f, weights_only=True)
    state = model.state_dict()
    for name, recipe in consolidated_recipes(model.config, stored.keys()).items():
        assert all(
            torch.equal(a, stored[k]) for k, a in zip(recipe.keys, recipe.from_smoe(state[name]), strict=True)
        )


def test_release_layout_with_wrong_expert_rows_names_the_key(make_hf, tmp_path):
    hf_dir, _ = make_hf(num_local_experts=4)
    write_release(hf_dir, tmp_path / "release", ".pt", n_shards=1)
    path = tmp_path / "release" / "consolidated.00.pt"
    sd = torch.load(path, weights_only=True)
    sd["layers.1.block_sparse_moe.w2"] = sd["layers.1.block_sparse_moe.w2"][:-1].clone()
    torch.save(sd, path)
    with pytest.raises(
        smoe.CheckpointError, match=r"layers\.1\.block_sparse_moe\.w2.*\(191, 32\).*\(192, 32\)"
    ):
        smoe.load_model(tmp_path / "release")
