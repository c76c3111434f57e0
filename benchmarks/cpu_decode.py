"""CPU decode speed: smoe's Generator against transformers' ``generate`` on the same weights.

smoe is measured two ways: ``smoe (ENGINE)`` decodes with the model's own forward and the given
dispatch engine (the readable reference path), and ``smoe fast`` with ``cpu_layout=True``: the
CPU weight layout (``smoe.decode_layout``) and the lean decode step (``smoe.fast_decode``), what
``smoe generate``/``chat`` use on CPU (on ``smoe.cpu_kernels`` when numba is installed, which
it is by default).

The model is the ``small`` preset (about 36M parameters, 4 layers, 8 experts, top-2), built
with a fixed seed, saved with ``smoe.save_model`` and loaded by both libraries. Both decode
greedily for a fixed number of tokens (EOS ignored) from the same random prompts.

Decode tokens/s = B * (N - 1) / (time(N new tokens) - time(1 new token)): the difference
removes prefill and setup, leaving N - 1 decode steps. Each measurement is repeated and the
median taken; implementations alternate within a repeat so that load on the shared machine
hits them alike.

    python benchmarks/cpu_decode.py                      # batch 1 and 8, torch's default threads
    python benchmarks/cpu_decode.py --threads 1 --dispatch auto reference
    python benchmarks/cpu_decode.py --dispatch          # only smoe fast and transformers
    python benchmarks/cpu_decode.py --dispatch --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import smoe
from smoe.config import ModelConfig
from smoe.generate import GenerationConfig, Generator


def _time_ours(gen: Generator, prompts: list[list[int]], n: int) -> float:
    cfg = GenerationConfig(max_new_tokens=n, stop_at_eos=False, prefill_chunk=4096)
    t0 = time.perf_counter()
    out = gen.generate(prompts, cfg)
    dt = time.perf_counter() - t0
    assert all(len(c.token_ids) == n for c in out)
    return dt


def _time_hf(model, prompts: list[list[int]], n: int) -> float:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    # inference_mode, as smoe's Generator; no EOS (eos_token_id=None, no min_new_tokens), so no
    # logits processors and exactly n tokens: min_new_tokens with an EOS id added two
    # processors and an EOS check (~0.65 ms a step) that smoe, with stop_at_eos=False, skips.
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + n
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=torch.get_num_threads(),
        help="intra-op threads for both libraries (default: torch's default here, one per core)",
    )  # fmt: skip
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights of both libraries")
    ap.add_argument(
        "--dispatch", nargs="*", default=["auto"], help="engines for the model-forward rows (none: skip them)"
    )
    ap.add_argument(
        "--compile", action="store_true", help="also measure smoe with a torch.compile'd decode step"
    )
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (then no ratios)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = ModelConfig.preset(args.preset)
    tmp = tempfile.TemporaryDirectory()
    smoe.save_model(smoe.build_model(cfg, seed=0), tmp.name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    impls: dict[str, object] = {}
    impls["smoe fast"] = Generator(smoe.load_model(tmp.name, dtype=dtype), cpu_layout=True)
    for engine in args.dispatch:
        impls[f"smoe ({engine})"] = Generator(smoe.load_model(tmp.name, dtype=dtype, dispatch=engine))
        if args.compile:
            impls[f"smoe ({engine}, compiled)"] = Generator(
                smoe.load_model(tmp.name, dtype=dtype, dispatch=engine), compile=True
            )
    if not args.no_hf:
        import transformers

        impls["transformers"] = transformers.MixtralForCausalLM.from_pretrained(tmp.name, dtype=dtype).eval()
    params = sum(p.numel() for p in next(iter(impls.values())).model.parameters()) / 1e6
    print(
        f"preset {args.preset}: {params:.1f}M parameters, {args.dtype}, threads {args.threads}, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )

    gen_rng = torch.Generator().manual_seed(0)
    rows = []
    for B in args.batch:
        prompts = torch.randint(3, cfg.vocab_size, (B, args.prompt_len), generator=gen_rng).tolist()
        times: dict[str, list[float]] = {name: [] for name in impls}
        for name, impl in impls.items():  # warm-up (and compilation)
            fn = _time_hf if name == "transformers" else _time_ours
            fn(impl, prompts, 4)
        for _ in range(args.repeats):
            for name, impl in impls.items():
                fn = _time_hf if name == "transformers" else _time_ours
                t_n, t_1 = fn(impl, prompts, args.new_tokens), fn(impl, prompts, 1)
                times[name].append(B * (args.new_tokens - 1) / max(t_n - t_1, 1e-9))
            print(f"batch {B}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in times.items()), flush=True)
        hf = times.get("transformers")
        for name, v in times.items():
            # Ratio within each repeat (same load), then the median over repeats.
            ratio = f"{statistics.median(a / b for a, b in zip(v, hf)):.2f}x" if hf else "-"
            rows.append(
                f"| {name} | {B} | {statistics.median(v):.0f} | {min(v):.0f}-{max(v):.0f} | {ratio} |"
            )

    print(f"\nDecode, {args.preset} preset, {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"threads {args.threads}, median of {args.repeats}\n")  # fmt: skip
    print("| implementation | batch | decode tok/s (total) | range | vs transformers (paired median) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
