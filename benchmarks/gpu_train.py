"""GPU training MFU for a ~1B-parameter SMoE (d 1024, 12 layers, 8 experts of 2816, top-2,
vocab 32000) in bf16 autocast with float32 master weights and fused AdamW, batch 8 x 2048,
through smoe's own ``train_step`` (the loop's forward + losses + backward + clip + step).

    python benchmarks/gpu_train.py                 # the 1B model on CUDA (about a minute)
    python benchmarks/gpu_train.py --tiny          # a tiny model on the CPU: checks the script runs

Model FLOPs per token (PaLM appendix B convention, no recomputation counted):
    6 * active matmul parameters (attention projections, top_k experts, router, output head;
    the embedding lookup is not a matmul) + attention scores and values: 6 * n_layers * T *
    n_heads * head_dim (12 * ... halved for the causal mask).
MFU = achieved model FLOP/s / peak (``--peak-tflops``, default 774: the bf16 dense matmul peak measured on
the H200 for these issues; the spec sheet says 989 dense, so MFU against the spec is 0.78x this).
Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from smoe.config import ModelConfig  # noqa: E402
from smoe.model.transformer import build_model  # noqa: E402
from smoe.train.config import TrainConfig  # noqa: E402
from smoe.train.data import Batch  # noqa: E402
from smoe.train.optim import build_optimizer, build_scheduler  # noqa: E402
from smoe.train.precision import wrap_engines_for_autocast  # noqa: E402
from smoe.train.step import train_step  # noqa: E402

ONE_B = dict(
    dim=1024, n_layers=12, head_dim=64, hidden_dim=2816, n_heads=16, n_kv_heads=8, vocab_size=32000,
    max_seq_len=2048, num_experts=8, top_k=2, rope_theta=1e4,
)  # fmt: skip
TINY = dict(
    dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=256,
    max_seq_len=64, num_experts=4, top_k=2,
)  # fmt: skip


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    attn_proj = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    ffn = 3 * cfg.dim * cfg.hidden_dim * cfg.top_k + (cfg.dim * cfg.num_experts if cfg.is_moe else 0)
    matmul_params = cfg.n_layers * (attn_proj + ffn) + cfg.vocab_size * cfg.dim  # output head
    attention = 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim  # causal: half of 12*L*T*d_attn
    return 6 * matmul_params + attention


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dispatch", default="auto")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--peak-tflops", type=float, default=774.0)
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model and batch on the CPU (smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.steps, args.warmup, args.device = 2, 32, 2, 1, "cpu"
    cfg = ModelConfig(**(TINY if args.tiny else ONE_B), dispatch=args.dispatch)
    device = torch.device(args.device)
    fused = device.type == "cuda"
    tcfg = TrainConfig(
        steps=1000, warmup_steps=10, lr=3e-4, dtype=args.dtype, device=args.device, fused_adamw=fused,
        batch_size=args.batch, seq_len=args.seq,
    )  # fmt: skip
    model = build_model(cfg, device=device, seed=0)
    if args.dtype == "bf16":
        wrap_engines_for_autocast(model)
    opt = build_optimizer(model, tcfg)
    sched = build_scheduler(opt, tcfg)
    stepped = torch.compile(model) if args.compile else model
    data_gen = torch.Generator(device).manual_seed(0)  # the same tokens in every run
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device, generator=data_gen)
    batch = Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        metrics = train_step(stepped, opt, sched, [batch], tcfg)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        metrics = train_step(stepped, opt, sched, [batch], tcfg)  # syncs once for the NaN check
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    tflops = fpt * tokens / step_s / 1e12
    result = {
        "params_b": cfg.num_params() / 1e9,
        "active_b": cfg.num_params(active=True) / 1e9,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "gflop_per_token": fpt / 1e9,
        "tflops": tflops,
        "mfu": tflops / args.peak_tflops,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "loss": metrics["loss"],
    }
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"\n{name}, torch {torch.__version__}, {'tiny test model' if args.tiny else '1B SMoE'}: "
        f"{result['params_b']:.3f}B params ({result['active_b']:.3f}B active), batch {args.batch}x{args.seq}, "
        f"{args.dtype} autocast, fused AdamW={fused}, dispatch={args.dispatch}, compile={args.compile}, "
        f"median of {args.steps} steps after {args.warmup} warmup\n"
    )
    print("| step (s) | tokens/s | GFLOP/token | TFLOP/s | MFU | peak mem (GiB) | loss |")
    print("|---|---|---|---|---|---|---|")
    r = result
    print(
        f"| {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['gflop_per_token']:.2f} | {r['tflops']:.1f} "
        f"| {100 * r['mfu']:.1f}% | {r['peak_mem_gib']:.1f} | {r['loss']:.3f} |"
    )
    return result


if __name__ == "__main__":
    main()
