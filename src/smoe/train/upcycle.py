"""Sparse upcycling (Komatsuzaki et al., 2022): a dense Mistral-style model becomes a mixture
of experts whose every expert starts as a copy of the dense feed-forward, with a fresh router.

Before any training step the upcycled model computes exactly the dense function (up to float
rounding): whichever K experts the router picks, they are identical, and their top-K softmax
weights sum to 1, so sum_k w_k * FFN(x) = FFN(x).

Legend: E experts, F hidden dim, D model dim.
"""

from __future__ import annotations

import torch

from smoe.model.moe import FeedForward, MoE
from smoe.model.transformer import Transformer


@torch.no_grad()
def upcycle(
    dense: Transformer, num_experts: int, top_k: int, seed: int = 0, router_std: float = 0.02
) -> Transformer:
    """Return a new SMoE Transformer in ``dense``'s dtype and device; ``dense`` is left unchanged.

    Every expert's w1/w2/w3 is a copy of the dense FFN's; every other weight is the dense one.
    Each layer's router weight (E, D) is drawn from N(0, router_std^2) with a CPU generator
    seeded by ``seed`` (layer by layer, in float32, then cast), so the same seed gives the same
    router. Any router keeps the output equal to the dense model's (see above); a random one,
    not zero, sends different tokens to different experts, so the copies diverge in training."""
    cfg = dense.config
    if cfg.is_moe:
        raise ValueError(
            f"upcycle needs a dense model (num_experts=1), got one with {cfg.num_experts} experts"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
        raise ValueError(
            f"upcycle: experts must be an integer >= 2 (one expert is the dense model), got {num_experts!r}"
        )
    moe_cfg = cfg.replace(num_experts=num_experts, top_k=top_k)  # validates top_k <= num_experts
    dtype = dense.tok_embeddings.weight.dtype
    device = dense.tok_embeddings.weight.device
    with torch.device("meta"):
        model = Transformer(moe_cfg).to(dtype)  # free on meta: memory is allocated once, in dtype
    model.to_empty(device=device)
    dense_state = dense.state_dict()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name in dense_state and dense_state[name].shape == p.shape:
            p.copy_(dense_state[name])
    for i, (block, dense_block) in enumerate(zip(model.layers, dense.layers)):
        moe, ffn = block.feed_forward, dense_block.feed_forward
        assert isinstance(moe, MoE) and isinstance(ffn, FeedForward), f"layer {i}"
        moe.w1.copy_(ffn.w1.weight.expand(num_experts, -1, -1))  # w1_EFD
        moe.w2.copy_(ffn.w2.weight.expand(num_experts, -1, -1))  # w2_EDF
        moe.w3.copy_(ffn.w3.weight.expand(num_experts, -1, -1))  # w3_EFD
        router = torch.randn(moe.gate.weight.shape, generator=gen) * router_std
        moe.gate.weight.copy_(router.to(dtype))
    if moe_cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    copied = {n for n, p in model.named_parameters() if n in dense_state and dense_state[n].shape == p.shape}
    fresh = {n for n, _ in model.named_parameters()} - copied
    unexpected = {n for n in fresh if not n.endswith((".w1", ".w2", ".w3", ".gate.weight"))}
    if unexpected:  # every non-FFN weight must come from the dense model
        raise ValueError(f"upcycle: parameters not found in the dense model: {sorted(unexpected)[:3]}")
    return model.eval()
