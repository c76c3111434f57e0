"""Back-of-envelope GPU memory for training under a (dp, ep) layout; the numbers in
docs/distributed.md come from ``python -m smoe.distributed.memory``.

Legend: D model dim, F expert hidden dim, E experts, K experts per token, V vocabulary,
L layers, T tokens per GPU per micro-batch.

Model state, 16 bytes per parameter: bf16 weights (2) + bf16 gradients (2) + float32 master
weights (4) + Adam's two float32 moments (8). (smoe's own loop keeps float32 weights and
gradients under bf16 autocast: 4 + 4 + 8, also 16.) Sharding divides it:

    dense params (attention, norms, embeddings, routers): over all N = dp * ep ranks (FSDP),
                                                           or not at all (DDP)
    expert params: over ep (each rank holds E / ep experts), and over dp as well under FSDP

Activations kept for backward, per token and layer, in bf16 (2 bytes), with a fused
attention kernel (no T x T scores stored) and balanced routing (every rank computes T * K
expert rows on average; a skewed router raises the busiest rank's share):

    attention: norm out D, q D, k and v 2 * D * G / H, attention out D, residual D  ~ 4.5 D
    MoE: norm out D, permuted inputs K * D, four F-wide tensors per chosen expert
         (w1 x, w3 x, silu, product) 4 * K * F, expert outputs K * D, router logits E (fp32)
    plus, for the output head, the input gradient that the fused head + loss keeps: 2 * D
    (``smoe.model.head_loss``; it never holds (tokens, V) logits)

Full activation checkpointing keeps only each block's input (D) and recomputes one block at a
time in backward. FSDP also needs one block's gathered bf16 weights (two with prefetch).
Not counted: temporary buffers (among them the head loss's one chunk of at most 2**27 float32
logits and its float32 head gradient), communication buckets, allocator fragmentation, the CUDA
context (~1 GB): keep 10-20 % headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

from smoe.config import ModelConfig

GB = 1e9


@dataclass
class Estimate:
    dense_params: int
    expert_params: int
    state_gb: float  # weights, gradients, master copy, Adam moments on one GPU
    gathered_gb: float  # FSDP: gathered bf16 weights of the blocks in flight
    activations_gb: float
    total_gb: float


def split_params(cfg: ModelConfig) -> tuple[int, int]:
    """(dense, expert) parameter counts; they add up to ``cfg.num_params()``."""
    expert = cfg.n_layers * cfg.num_experts * 3 * cfg.dim * cfg.hidden_dim if cfg.is_moe else 0
    return cfg.num_params() - expert, expert


def activation_bytes_per_token(cfg: ModelConfig, checkpointing: bool) -> float:
    D, F, K, E = cfg.dim, cfg.hidden_dim, cfg.top_k, cfg.num_experts
    attn = 4 * D + 2 * D * cfg.n_kv_heads / cfg.n_heads
    ffn = D + 2 * K * D + 4 * K * F if cfg.is_moe else D + 4 * F
    layer = 2 * (attn + ffn) + (4 * E if cfg.is_moe else 0)
    head = 2 * D  # the fused head + loss keeps the gradient of its input, not logits
    if checkpointing:  # block inputs for every layer, one block's full activations at a time
        return 2 * D * cfg.n_layers + layer + head
    return layer * cfg.n_layers + head


def estimate(
    cfg: ModelConfig, dp: int, ep: int, fsdp: bool, tokens_per_gpu: int, checkpointing: bool = False
) -> Estimate:
    """Memory of one GPU of a dp x ep run (see the module docstring for what is counted)."""
    if cfg.num_experts % ep:
        raise ValueError(f"ep={ep} does not divide num_experts={cfg.num_experts}")
    n = dp * ep
    dense, expert = split_params(cfg)
    dense_here = dense / n if fsdp else dense
    expert_here = expert / ep / (dp if fsdp else 1)
    state = 16 * (dense_here + expert_here)
    gathered = 0.0
    if fsdp:  # two blocks in flight: the one computing and the one prefetched
        block = (dense - cfg.vocab_size * cfg.dim * 2) / cfg.n_layers + expert / ep / cfg.n_layers
        gathered = 2 * 2 * block
    act = tokens_per_gpu * activation_bytes_per_token(cfg, checkpointing)
    return Estimate(dense, expert, state / GB, gathered / GB, act / GB, (state + gathered + act) / GB)


LAYOUTS = [  # (GPUs, dp, ep, fsdp)
    (8, 8, 1, True),
    (8, 1, 8, False),
    (8, 1, 8, True),
    (64, 8, 8, True),
    (64, 64, 1, True),
]


def table(cfg: ModelConfig, tokens_per_gpu: int = 4096) -> str:
    rows = [
        "| GPUs | dp x ep | dense params | model state GB | FSDP gathered GB | act. GB (no ckpt / full ckpt) | total GB (no ckpt / full ckpt) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for gpus, dp, ep, fsdp in LAYOUTS:
        a = estimate(cfg, dp, ep, fsdp, tokens_per_gpu, checkpointing=False)
        b = estimate(cfg, dp, ep, fsdp, tokens_per_gpu, checkpointing=True)
        how = "FSDP over all" if fsdp else "replicated (DDP)"
        rows.append(
            f"| {gpus} | {dp} x {ep} | {how} | {a.state_gb:.1f} | {a.gathered_gb:.1f} | "
            f"{a.activations_gb:.1f} / {b.activations_gb:.1f} | {a.total_gb:.1f} / {b.total_gb:.1f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    cfg = ModelConfig.preset("mixtral-8x7b")
    dense, expert = split_params(cfg)
    print(
        f"mixtral-8x7b: {cfg.num_params() / 1e9:.2f}B params = {dense / 1e9:.2f}B dense + {expert / 1e9:.2f}B expert"
    )
    print(f"activations per token: {activation_bytes_per_token(cfg, False) / 1e6:.2f} MB without checkpointing, "
          f"{activation_bytes_per_token(cfg, True) / 1e6:.3f} MB with full checkpointing (+ one block)")  # fmt: skip
    print(
        "\nOne micro-batch of 4096 tokens per GPU (e.g. 1 x 4096 or 4 x 1024), bf16 mixed precision, AdamW:\n"
    )
    print(table(cfg))
