"""GPU decode and prefill speed on Mixtral-8x7B shapes with random bf16 weights.

The weights are created directly on the GPU (built on meta, ``to_empty`` on the device, then
initialised in place), so no 90 GB host copy is ever made. Measured:

- greedy decode tokens/s at batch 1 and batch 16 (total over rows), with the step captured
  in a CUDA graph (smoe.decode_loop.GreedyDecodeLoop): no host sync per token;
- the same through smoe.generate.Generator, what ``smoe generate`` runs: a graphed step, but
  each token read on the host (sampling, stop strings, streaming);
- prefill of a 2048-token prompt into the KV cache, in TFLOP/s of matmul work
  (2 * active non-embedding, non-head parameters per token, the head once: a prefill keeps
  only the last logits, plus causal attention).

Before timing, the graphed decode is checked against eager decode of the same prompt.

    python benchmarks/gpu_decode.py              # H200, about 3-5 minutes
    python benchmarks/gpu_decode.py --tiny       # logic check on CPU in seconds
"""

from __future__ import annotations

import argparse
import signal
import time

import torch

from smoe.cache import KVCache
from smoe.config import ModelConfig
from smoe.decode_loop import GreedyDecodeLoop
from smoe.generate import GenerationConfig, Generator
from smoe.model.transformer import Transformer


def build_random(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prefill(model: Transformer, cache: KVCache, tokens_BT: torch.Tensor, chunk: int) -> torch.Tensor:
    B, T = tokens_BT.shape
    pos_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
    with torch.inference_mode():
        for s in range(0, T, chunk):
            chunk_BT, chunk_pos_BT = tokens_BT[:, s : s + chunk], pos_BT[:, s : s + chunk]
            logits_BV = model(chunk_BT, chunk_pos_BT, cache, logits_to_keep=1)[:, -1]
    return logits_BV


def bench_decode(
    model, cfg, B: int, prompt_len: int, steps: int, device, graph: bool
) -> tuple[float, bool, str]:
    """Decode tokens/s (total over rows), whether graphed decode matched eager decode, and how
    the steps ran ("CUDA graph", or "eager" when capture failed, e.g. an engine that syncs)."""
    cache = KVCache.for_model(model, B, prompt_len + steps + 8)
    kind = "CUDA graph" if graph else "eager"
    try:
        loop = GreedyDecodeLoop(model, cache, max_steps=steps + 8, cuda_graph=graph)
    except RuntimeError as e:  # keep measuring, and say so in the table
        print(f"batch {B}: CUDA graph capture failed ({str(e).splitlines()[0][:200]}); measuring eager steps")
        torch.cuda.synchronize()
        cache.reset()
        loop, kind = (
            GreedyDecodeLoop(model, cache, max_steps=steps + 8, cuda_graph=False),
            "eager, capture failed",
        )
    prompt = torch.randint(
        3, cfg.vocab_size, (B, prompt_len), device=device, generator=torch.Generator(device).manual_seed(B)
    )
    first = prefill(model, cache, prompt, 512).argmax(-1)
    pos = torch.full((B,), prompt_len, device=device)
    # Correctness: the first 8 graphed tokens equal eager steps from the same cache state.
    eager_cache = KVCache.for_model(model, B, prompt_len + 16)
    e_first = prefill(model, eager_cache, prompt, 512).argmax(-1)
    eager = GreedyDecodeLoop(model, eager_cache, max_steps=8, cuda_graph=False)
    eager.start(e_first, pos)
    loop.start(first, pos)
    ok = torch.equal(loop.run(8)[:, :8], eager.run(8)[:, :8])
    del eager_cache, eager
    loop.start(first, pos)  # the cache keeps prompt_len + 8 written slots; they are rewritten
    loop.run(4)  # warm
    sync(device)
    t0 = time.perf_counter()
    loop.run(steps)
    sync(device)
    return B * steps / (time.perf_counter() - t0), ok, kind


def bench_generator(model, cfg, B: int, prompt_len: int, steps: int) -> float:
    """Decode tokens/s (total over rows) of smoe.generate.Generator, the path of ``smoe
    generate``/``chat``: on CUDA its step is replayed from a CUDA graph (smoe.graph_step), and
    every token goes to the host for sampling, stop checks and streaming."""
    gen = Generator(model)
    prompts = torch.randint(
        3, cfg.vocab_size, (B, prompt_len), generator=torch.Generator().manual_seed(B)
    ).tolist()

    def timed(n: int) -> float:
        sync(model.tok_embeddings.weight.device)
        t0 = time.perf_counter()
        out = gen.generate(prompts, GenerationConfig(max_new_tokens=n, temperature=0.0, stop_at_eos=False))
        assert all(len(c.token_ids) == n for c in out)
        return time.perf_counter() - t0

    # Warm up with the timed length: the Generator keeps its cache (and the graph captured for
    # it) only while batch and length stay the same, so a shorter warm-up would leave the
    # timed run to pay a new cache, eager warm-up steps and a recapture.
    timed(steps)
    return B * (steps - 1) / max(timed(steps) - timed(1), 1e-9)


def bench_prefill(model, cfg, T: int, device, repeats: int = 3) -> tuple[float, float]:
    """(seconds, TFLOP/s) for one T-token prompt into a fresh cache."""
    prompt = torch.randint(
        3, cfg.vocab_size, (1, T), device=device, generator=torch.Generator(device).manual_seed(0)
    )
    cache = KVCache.for_model(model, 1, T)
    prefill(model, cache, prompt, T)  # warm (kernels, autotuning)
    times = []
    for _ in range(repeats):
        cache.reset()
        sync(device)
        t0 = time.perf_counter()
        prefill(model, cache, prompt, T)
        sync(device)
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    head = cfg.vocab_size * cfg.dim
    embed = head * (1 if cfg.tie_embeddings else 2)
    body = cfg.num_params(active=True) - embed  # the matmul weights a token passes, head excluded
    flops = (
        2 * T * body + 2 * head + 2 * T * T * cfg.n_heads * cfg.head_dim * cfg.n_layers
    )  # + the head on the last row only (one chunk of T, logits_to_keep=1) + causal QK^T and PV
    return dt, flops / dt / 1e12


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny preset (runs on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dispatch", default="auto")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--no-graph", action="store_true", help="eager decode steps (still no host sync)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        raise SystemExit(
            "gpu_decode.py: Mixtral-8x7B shapes need a CUDA device; use --tiny to check the logic on CPU"
        )
    name = "tiny" if args.tiny else "mixtral-8x7b"
    cfg = ModelConfig.preset(name, dispatch=args.dispatch)
    if cfg.max_seq_len < args.prefill_len:
        cfg = cfg.replace(max_seq_len=args.prefill_len)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    graph = device.type == "cuda" and not args.no_graph

    t0 = time.perf_counter()
    model = build_random(cfg, device, dtype)
    print(
        f"built {name} ({cfg.num_params() / 1e9:.2f}B params, {dtype}) on {device} in {time.perf_counter() - t0:.1f}s"
    )
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")

    rows = []
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` ends a run with SIGTERM: keep the rows
    try:  # the target figures first (greedy loop, prefill), then the Generator's rows
        for B in args.batch:
            t0 = time.perf_counter()
            tps, ok, kind = bench_decode(model, cfg, B, args.prompt_len, args.steps, device, graph)
            print(
                f"decode batch {B}: {tps:.1f} tok/s, graphed == eager: {ok} ({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
            rows.append(
                f"| greedy decode, batch {B} ({kind}, {args.steps} steps) | {tps:.1f} tok/s | {'yes' if ok else 'NO'} |"
            )
        dt, tflops = bench_prefill(model, cfg, args.prefill_len, device)
        print(f"prefill {args.prefill_len}: {dt * 1e3:.1f} ms, {tflops:.1f} TFLOP/s", flush=True)
        rows.append(f"| prefill {args.prefill_len} tokens ({dt * 1e3:.1f} ms) | {tflops:.1f} TFLOP/s | - |")
        for B in args.batch:
            tps = bench_generator(model, cfg, B, args.prompt_len, min(args.steps, 64))
            print(f"Generator batch {B}: {tps:.1f} tok/s", flush=True)
            rows.append(f"| smoe Generator (smoe generate's path), batch {B}, greedy | {tps:.1f} tok/s | - |")
    except KeyboardInterrupt:
        print("stopped early (SIGTERM or Ctrl-C): the table holds the rows measured so far", flush=True)

    print(f"\n{name}, {dtype}, dispatch {args.dispatch}, prompt {args.prompt_len}\n")
    print("| measurement | result | graphed tokens == eager |")
    print("|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
