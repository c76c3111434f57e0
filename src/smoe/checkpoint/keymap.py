"""Name maps between smoe's parameters and the two on-disk layouts.

Each smoe parameter is made from one or more checkpoint tensors. A ``Recipe`` names those
keys and the two functions that go between them: ``to_smoe(list of tensors) -> tensor`` and
``from_smoe(tensor) -> list of tensors``. Example for layer 0 of an 8-expert Mixtral in the
Hugging Face layout::

    layers.0.feed_forward.w1  (8, F, D)  <-  model.layers.0.block_sparse_moe.experts.{0..7}.w1.weight  (F, D) each

Mistral's consolidated layout comes in two versions for MoE layers. mistral-inference stores
one tensor per expert, like Hugging Face; the first Mixtral-8x7B release (December 2023,
``consolidated.00.pt`` ...) fused each layer's experts into one tensor per weight, w2 with
each expert's block transposed (as Hugging Face's convert_mixtral_weights_to_hf.py reads it)::

    layers.0.feed_forward.w1  (E, F, D)  <-  layers.0.block_sparse_moe.w1  (E*F, D)
    layers.0.feed_forward.w2  (E, D, F)  <-  layers.0.block_sparse_moe.w2  (E*F, D), block e = w2[e].T
    layers.0.feed_forward.gate.weight    <-  layers.0.block_sparse_moe.gate.weight  (E, D)

Loading picks the version each layer's keys show; saving writes mistral-inference's.

Mistral's consolidated layout differs from Hugging Face's in one more way: its rotary
embedding rotates interleaved pairs (x0, x1), (x2, x3), ... while Hugging Face (and smoe)
rotate the two halves of each head. The rows of wq and wk are permuted accordingly, as in
Hugging Face's own conversion script.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from smoe.config import ModelConfig

# The output projection's key in each layout; with tied embeddings it has no recipe of its own.
HEAD_KEYS = {"hf": "lm_head.weight", "consolidated": "output.weight"}


@dataclass
class Recipe:
    keys: list[str]
    to_smoe: Callable[[list[torch.Tensor]], torch.Tensor]
    from_smoe: Callable[[torch.Tensor], list[torch.Tensor]]
    stacked: bool = False  # to_smoe is torch.stack over the keys (experts)
    # The stored shape of each key, given the smoe parameter's shape; None: the same shape,
    # or for a stacked recipe the shape of one slice.
    key_shape: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.key_shape is not None:
            return self.key_shape(shape)
        return shape[1:] if self.stacked else shape


def _one(key: str) -> Recipe:
    return Recipe([key], lambda ts: ts[0], lambda t: [t])


def _stacked(keys: list[str]) -> Recipe:
    return Recipe(keys, torch.stack, lambda t: [t[e].contiguous() for e in range(t.shape[0])], stacked=True)


def _fused_experts(key: str, n_experts: int, transposed: bool) -> Recipe:
    """All experts of one layer in one (E*F, D) tensor, expert e in rows e*F..(e+1)*F; with
    ``transposed`` (w2) each block is the transpose of the expert's (D, F) weight."""

    def to_smoe(ts: list[torch.Tensor]) -> torch.Tensor:
        w_EFD = ts[0].unflatten(0, (n_experts, -1))
        return w_EFD.transpose(1, 2) if transposed else w_EFD

    def from_smoe(t: torch.Tensor) -> list[torch.Tensor]:
        w_EFD = t.transpose(1, 2) if transposed else t
        return [w_EFD.reshape(-1, w_EFD.shape[-1])]

    def key_shape(s: tuple[int, ...]) -> tuple[int, ...]:
        return (s[0] * s[2], s[1]) if transposed else (s[0] * s[1], s[2])

    return Recipe([key], to_smoe, from_smoe, key_shape=key_shape)


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute wq/wk rows from Mistral's interleaved rotary pairs to the rotate-half layout."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _rotary(key: str, n_heads: int) -> Recipe:
    return Recipe(
        [key],
        lambda ts: interleaved_to_halves(ts[0], n_heads),
        lambda t: [halves_to_interleaved(t, n_heads)],
    )


def hf_recipes(cfg: ModelConfig) -> dict[str, Recipe]:
    """smoe name -> Recipe over Hugging Face hub key names (MixtralForCausalLM / MistralForCausalLM)."""
    r: dict[str, Recipe] = {
        "tok_embeddings.weight": _one("model.embed_tokens.weight"),
        "norm.weight": _one("model.norm.weight"),
    }
    if not cfg.tie_embeddings:
        r["output.weight"] = _one(HEAD_KEYS["hf"])
    for i in range(cfg.n_layers):
        hf, us = f"model.layers.{i}", f"layers.{i}"
        r[f"{us}.attention_norm.weight"] = _one(f"{hf}.input_layernorm.weight")
        r[f"{us}.ffn_norm.weight"] = _one(f"{hf}.post_attention_layernorm.weight")
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            r[f"{us}.attention.{ours}.weight"] = _one(f"{hf}.self_attn.{theirs}.weight")
        if cfg.is_moe:
            moe = f"{hf}.block_sparse_moe"
            r[f"{us}.feed_forward.gate.weight"] = _one(f"{moe}.gate.weight")
            for w in ("w1", "w2", "w3"):
                keys = [f"{moe}.experts.{e}.{w}.weight" for e in range(cfg.num_experts)]
                r[f"{us}.feed_forward.{w}"] = _stacked(keys)
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                r[f"{us}.feed_forward.{ours}.weight"] = _one(f"{hf}.mlp.{theirs}.weight")
    return r


def consolidated_recipes(cfg: ModelConfig, stored_keys: Collection[str] = ()) -> dict[str, Recipe]:
    """smoe name -> Recipe over mistral-inference's consolidated key names, or, for each MoE
    layer whose fused ``block_sparse_moe.w1`` is among ``stored_keys``, the first Mixtral
    release's."""
    r: dict[str, Recipe] = {
        "tok_embeddings.weight": _one("tok_embeddings.weight"),
        "norm.weight": _one("norm.weight"),
    }
    if not cfg.tie_embeddings:
        r["output.weight"] = _one(HEAD_KEYS["consolidated"])
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        r[f"{p}.attention_norm.weight"] = _one(f"{p}.attention_norm.weight")
        r[f"{p}.ffn_norm.weight"] = _one(f"{p}.ffn_norm.weight")
        r[f"{p}.attention.wq.weight"] = _rotary(f"{p}.attention.wq.weight", cfg.n_heads)
        r[f"{p}.attention.wk.weight"] = _rotary(f"{p}.attention.wk.weight", cfg.n_kv_heads)
        r[f"{p}.attention.wv.weight"] = _one(f"{p}.attention.wv.weight")
        r[f"{p}.attention.wo.weight"] = _one(f"{p}.attention.wo.weight")
        if cfg.is_moe and f"{p}.block_sparse_moe.w1" in stored_keys:
            moe = f"{p}.block_sparse_moe"
            r[f"{p}.feed_forward.gate.weight"] = _one(f"{moe}.gate.weight")
            for w in ("w1", "w2", "w3"):
                r[f"{p}.feed_forward.{w}"] = _fused_experts(
                    f"{moe}.{w}", cfg.num_experts, transposed=w == "w2"
                )
        elif cfg.is_moe:
            r[f"{p}.feed_forward.gate.weight"] = _one(f"{p}.feed_forward.gate.weight")
            for w in ("w1", "w2", "w3"):
                keys = [f"{p}.feed_forward.experts.{e}.{w}.weight" for e in range(cfg.num_experts)]
                r[f"{p}.feed_forward.{w}"] = _stacked(keys)
        else:
            for w in ("w1", "w2", "w3"):
                r[f"{p}.feed_forward.{w}.weight"] = _one(f"{p}.feed_forward.{w}.weight")
    return r


# Keys that some checkpoints carry but that hold no weights (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
