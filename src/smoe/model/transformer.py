"""The Mixtral / Mistral decoder: embedding, N pre-norm blocks, final norm, output head.

Legend: B batch, T tokens, D model dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smoe.config import ModelConfig
from smoe.model.head_loss import linear_cross_entropy
from smoe.model.layers import Attention, KVCache, RMSNorm, causal_mask, rope_cos_sin
from smoe.model.moe import FeedForward, MoE, RouterOutput


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward: MoE | FeedForward = MoE(cfg) if cfg.is_moe else FeedForward(cfg)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        pos_BT: torch.Tensor,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), cos, sin, mask, pos_BT, cache)
        ff_BTD, routing = self.feed_forward(self.ffn_norm(h_BTD))
        return h_BTD + ff_BTD, routing


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        tokens_BT: torch.Tensor,
        pos_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_router: bool = False,
        logits_to_keep: int = 0,
        targets_BT: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[RouterOutput]]:
        """Logits (B, T, V); with ``return_router=True`` also each MoE layer's routing.

        ``pos_BT`` defaults to 0..T-1 for every row. With a ``cache`` the keys/values of
        earlier calls are attended to as well, and the cache supplies the mask.
        ``logits_to_keep=n > 0`` returns only the last n positions' logits (B, n, V): a prefill
        needs one row, and the head is the largest single product of a small model.
        ``targets_BT`` (token ids, -100 = ignore) returns the mean cross-entropy instead of the
        logits, from head and loss fused over row chunks (``head_loss``), never holding (B, T, V)
        logits. It runs inside ``forward`` so that wrappers that act on forward (FSDP's
        unsharding, DDP) see the head used.
        """
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 = every position), got {logits_to_keep}")
        B, T = tokens_BT.shape
        if targets_BT is not None and targets_BT.shape != (B, T):
            raise ValueError(f"targets_BT must be {(B, T)} like the tokens, got {tuple(targets_BT.shape)}")
        cfg = self.config
        if pos_BT is None:
            pos_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
        # Positions are read only where that is free (CPU, not while compiling): on an
        # accelerator it would sync with the host, and smoe.generate checks there on the host.
        host_pos = pos_BT.device.type == "cpu" and pos_BT.numel() and not torch.compiler.is_compiling()
        last = int(pos_BT.max()) if host_pos else T - 1
        if last >= cfg.max_seq_len:
            raise ValueError(f"position {last} is past the model's max_seq_len of {cfg.max_seq_len}")
        if cache is not None and host_pos and last >= cache.max_len:
            # Past max_len a full buffer wraps and silently overwrites keys later queries need.
            raise ValueError(f"KVCache: position {last} is past the cache's max_len of {cache.max_len}")
        x_BTD = self.tok_embeddings(tokens_BT)
        if cache is not None and not cache.matches(x_BTD):
            raise ValueError(
                f"the KV cache's dtype or device differs from the model's ({x_BTD.dtype} on "
                f"{x_BTD.device}); build it with KVCache.for_model(model, ...)"
            )
        cos, sin = rope_cos_sin(pos_BT, cfg.head_dim, cfg.rope_theta, x_BTD.dtype)
        if cache is not None:
            mask = cache.mask(pos_BT)
        elif cfg.sliding_window is not None and cfg.sliding_window < T:
            mask = causal_mask(pos_BT, pos_BT, cfg.sliding_window)
        else:
            mask = None  # plain causal: lets SDPA pick its fastest kernel
        routings: list[RouterOutput] = []
        for layer in self.layers:
            x_BTD, routing = layer(x_BTD, cos, sin, mask, pos_BT, cache)
            if return_router and routing is not None:
                routings.append(routing)
        if targets_BT is not None:
            h_ND = self.norm(x_BTD).reshape(B * T, cfg.dim)
            loss = linear_cross_entropy(h_ND, self.output.weight, targets_BT.reshape(B * T))
            return (loss, routings) if return_router else loss
        if logits_to_keep:
            x_BTD = x_BTD[:, -logits_to_keep:]
        logits_BTV = self.output(self.norm(x_BTD))
        return (logits_BTV, routings) if return_router else logits_BTV

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def init_weights(model: Transformer, seed: int | None = None, std: float = 0.02) -> Transformer:
    """Initialise for training: normal(0, std) weights, output projections scaled by
    1/sqrt(2 * n_layers) (GPT-2 style), norms at 1. A separate step from construction so that
    loading a checkpoint never pays for (or silently keeps) a random init."""
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    out_std = std / math.sqrt(2 * model.config.n_layers)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0)
            continue
        s = out_std if name.endswith(("wo.weight", "w2.weight", ".w2")) else std
        p.copy_(torch.randn(p.shape, generator=gen) * s)
    return model


def build_model(
    cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> Transformer:
    """A freshly initialised model for training or tests (built on meta, then materialised)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives each module its own storage: tie again
        model.output.weight = model.tok_embeddings.weight
    init_weights(model, seed=seed)
    return model.to(dtype)
