"""RMSNorm, rotary position embeddings and grouped-query attention with an optional sliding window.

Legend: B batch, T query tokens, S key/value slots, D model dim, H query heads, G kv heads,
Hd head dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype, then scale in the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    pos_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (B, 1, T, Hd) for the "rotate half" rotary layout.

    Frequencies are computed in float32 from the positions on every call: that is a few
    hundred flops, keeps no state that a meta-device build would have to re-create, and
    keeps the function free of Python-side caches so that it compiles with static shapes.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos_BT.device).float() / head_dim))
    freqs_BTh = pos_BT.float().unsqueeze(-1) * inv_freq
    emb_BTHd = torch.cat([freqs_BTh, freqs_BTh], dim=-1)
    return emb_BTHd.cos().to(dtype).unsqueeze(1), emb_BTHd.sin().to(dtype).unsqueeze(1)


def apply_rope(x_BHTd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Hugging Face layout: the two halves of each head are the real and imaginary parts.
    # (Mistral's consolidated checkpoints interleave them instead; the loader permutes wq/wk.)
    x1, x2 = x_BHTd.chunk(2, dim=-1)
    return x_BHTd * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_mask(q_pos_BT: torch.Tensor, k_pos_BS: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: True where query t may attend to key s.

    Key s is visible from query t when ``k_pos <= q_pos`` and, with a window W,
    ``q_pos - k_pos < W``. Example with W = 3 and positions 0..4::

        q=4 sees k=2,3,4     q=2 sees k=0,1,2     q=0 sees k=0

    A negative key position marks an empty cache slot and is never visible.
    """
    q = q_pos_BT.unsqueeze(-1)  # (B, T, 1)
    k = k_pos_BS.unsqueeze(-2)  # (B, 1, S)
    mask = (k <= q) & (k >= 0)
    if sliding_window is not None:
        mask &= q - k < sliding_window
    return mask.unsqueeze(1)


class KVCache(Protocol):
    """What attention needs from a key/value cache (implemented in ``smoe.cache``)."""

    max_len: int  # positions 0 .. max_len - 1 fit

    def update(
        self, layer: int, pos_BT: torch.Tensor, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values at ``pos_BT``; return all keys/values (B, G, S, Hd)."""
        ...

    def mask(self, pos_BT: torch.Tensor) -> torch.Tensor:
        """Boolean (B, 1, T, S) attention mask for queries at ``pos_BT`` over the cache slots."""
        ...

    def matches(self, x: torch.Tensor) -> bool:
        """Whether the cache holds keys and values of ``x``'s dtype on ``x``'s device."""
        ...


def masked_gqa_falls_to_math(q_BHTd: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether SDPA would run a masked grouped-query attention of several queries in its math
    kernel. On CUDA the flash kernel takes no mask and the memory-efficient one no
    ``enable_gqa``, so a prefill into the cache (which has a mask) would materialise the
    (B, H, T, S) scores; with the kv heads repeated the memory-efficient kernel runs instead.
    One query (decode) costs the math kernel little, and repeating would copy the whole cache."""
    return mask is not None and q_BHTd.shape[2] > 1 and q_BHTd.device.type == "cuda"


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        pos_BT: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``mask=None`` means plain causal attention over exactly these T tokens."""
        B, T, _ = x_BTD.shape
        q_BHTd = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGTd = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTd = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTd, k_BGTd = apply_rope(q_BHTd, cos, sin), apply_rope(k_BGTd, cos, sin)
        if cache is not None:
            k_BGTd, v_BGTd = cache.update(self.layer_id, pos_BT, k_BGTd, v_BGTd)
        gqa = self.n_heads != self.n_kv_heads
        if gqa and masked_gqa_falls_to_math(q_BHTd, mask):
            rep = self.n_heads // self.n_kv_heads  # query head h reads kv head h // rep
            k_BGTd, v_BGTd = k_BGTd.repeat_interleave(rep, dim=1), v_BGTd.repeat_interleave(rep, dim=1)
            gqa = False
        out_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BGTd, v_BGTd, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
        )
        return self.wo(out_BHTd.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
