"""GPU benchmark of one MoE layer at Mixtral 8x7B shapes (dim 4096, hidden 14336, E 8, k 2),
bfloat16: smoe's engines vs transformers' MixtralSparseMoeBlock, forward and forward+backward
TFLOP/s for T from 1 to 32768. One call, well under 8 minutes on an H200.

    python benchmarks/gpu_moe.py            # CUDA, Mixtral shapes
    python benchmarks/gpu_moe.py --tiny     # tiny shapes; runs on CPU too (a test does)

FLOPs counted: 2 * T * k * 3 * D * F forward (the expert products only; router and permutation
are overhead), three times that for forward+backward. Targets on H200: smoe forward >= 600
TFLOP/s and forward+backward >= 550 at T=8192. Times are whole blocks (router + experts),
CUDA-event medians after warm-up. Legend: T tokens, D dim, F hidden, E experts, K chosen.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import time

import torch

from smoe.config import ModelConfig
from smoe.dispatch import ENGINES, choose_engine, triton_available
from smoe.model.moe import MoE


def build(D: int, F: int, E: int, K: int, device, dtype, seed: int = 0) -> MoE:
    gen = torch.Generator(device).manual_seed(seed)  # on the device: 1.4G values at Mixtral shapes
    cfg = ModelConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, n_layers=1, n_heads=1, n_kv_heads=1)
    with torch.device("meta"):
        moe = MoE(cfg)
    moe.to_empty(device=device)
    with torch.no_grad():
        for p, fan_in in ((moe.gate.weight, D), (moe.w1, D), (moe.w2, F), (moe.w3, D)):
            p.copy_(torch.randn(p.shape, generator=gen, device=device) / fan_in**0.5)
    return moe.to(dtype)


def hf_block(moe: MoE, implementation: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    E, F, D = moe.w1.shape
    cfg = MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=moe.gate.top_k
    )
    cfg._experts_implementation = implementation
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(cfg)
    block.to_empty(device=moe.w1.device)
    block = block.to(moe.w1.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(moe.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([moe.w1, moe.w3], dim=1))
        block.experts.down_proj.copy_(moe.w2)
    return block


class Timer:
    """CUDA events on CUDA, perf_counter elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, iters: int) -> float:
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def step(module, x_BTD, backward: bool, params):
    def run():
        for p in params:
            p.grad = None
        if backward:
            x = x_BTD.detach().requires_grad_()
            y = module(x)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                module(x_BTD)

    return run


def engines_for(device, T: int, K: int, E: int) -> list[str]:
    names = ["auto", "sorted"]
    if device.type == "cuda" and triton_available():
        names.append("triton")
    if T * K <= E:  # gather copies K experts' weights per token: only for a handful of tokens
        names.append("gather")
    return names


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU-friendly)")
    ap.add_argument("--tokens", type=int, nargs="*")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' block")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        D, F, E, K, dtype = 64, 128, 8, 2, (torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokens = args.tokens or [1, 16, 256]
    else:
        if device.type != "cuda":
            raise SystemExit("gpu_moe.py: no CUDA device; use --tiny to check the script on CPU")
        D, F, E, K, dtype = 4096, 14336, 8, 2, torch.bfloat16
        tokens = args.tokens or [1, 16, 128, 1024, 4096, 8192, 16384, 32768]
    moe = build(D, F, E, K, device, dtype)
    modules = {}
    if not args.no_hf:
        for impl in ("grouped_mm", "eager"):
            modules[f"hf {impl}"] = hf_block(moe, impl)
    timer, rows = Timer(device), []
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` ends a run with SIGTERM
    try:
        for T in tokens:
            x_BTD = torch.randn(1, T, D, device=device, dtype=dtype)
            flops = 2 * T * K * 3 * D * F
            cands = {f"smoe {n}": n for n in engines_for(device, T, K, E)} | {n: None for n in modules}
            for name, engine in cands.items():
                if engine is not None:
                    moe.engine = ENGINES[engine]
                module = moe if engine is not None else modules[name]
                if name == "hf eager" and T > 8192:
                    continue  # a Python loop with host syncs; minutes at the largest T
                params = list(module.parameters())
                for mode, backward, mult in (("fwd", False, 1), ("fwd+bwd", True, 3)):
                    run = step(module, x_BTD, backward, params)
                    try:
                        run()  # warm-up: compiles triton kernels, grows the allocator
                        sec = timer(run, args.iters)
                    except Exception as e:  # one failing engine or shape must not lose the others' rows
                        print(
                            f"T={T} {mode} {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                        )
                        rows.append((T, mode, name, float("nan"), float("nan")))
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    rows.append((T, mode, name, sec, mult * flops / sec / 1e12))
                    print(
                        f"T={T} {mode} {name}: {1e3 * sec:.3f} ms {mult * flops / sec / 1e12:.1f} TFLOP/s",
                        flush=True,
                    )
            del x_BTD
    except KeyboardInterrupt:
        print("stopped early (SIGTERM or Ctrl-C): the table holds the rows measured so far", flush=True)
    auto_at = {T: choose_engine(torch.empty(T, D, device=device), torch.empty(T, K), E) for T in tokens}
    print(f"\n{device} D={D} F={F} E={E} K={K} {dtype}, median of {args.iters}; auto runs: {auto_at}\n")
    print("| T | mode | engine | ms | TFLOP/s |")
    print("|---|---|---|---|---|")
    for T, mode, name, sec, tflops in rows:
        print(f"| {T} | {mode} | {name} | {1e3 * sec:.3f} | {tflops:.1f} |")


if __name__ == "__main__":
    main()
