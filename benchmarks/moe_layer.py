"""CPU benchmark of one MoE layer: smoe's dispatch engines vs transformers' MixtralSparseMoeBlock
(its default "grouped_mm" experts and "eager"; "batched_mm" at small T) vs equal-work floors,
all in one process on the same weights, interleaved, medians of repeats.

    python benchmarks/moe_layer.py            # dim 1024, hidden 3584, E 8, k 2, T in 1 16 512 4096
    python benchmarks/moe_layer.py --quick    # tiny shapes, seconds

Timed floors (no router, no permutation, inputs pre-sliced and pre-padded, touched weights
gathered once outside the timed region, same threads, timed interleaved with the candidates;
every input leaf's and weight's .grad is reset before each call):
    flop          a dense SwiGLU: T*k rows through ONE expert's weights (same FLOPs, one weight
                  read). The issue's floor for large T.
    touched       each touched expert's SwiGLU on exactly its rows, one product per weight (same
                  work, only the touched experts' weights read).
    touched rows  the same, one matrix-vector product per row (cheaper than a product of few rows
                  on this CPU build; see src/smoe/dispatch/loop_experts.py). T < 512 only.
    touched bmm   the touched experts' SwiGLU as ONE batched product per weight over their rows
                  padded to the busiest touched expert: the padded engine's form and its
                  hand-written backward (src/smoe/dispatch/padded_experts.py), on the touched
                  experts' weights only.
With backward the three touched floors also zero-fill the untouched experts' slices of the
three (E, F, D) weight gradients every engine returns for stacked weights (the touched slices
are the floors' own weight gradients, written once).
Computed, not timed:
    bw est        an ESTIMATE: the bytes that must move divided by a memory bandwidth measured
                  in this run (median of a large tensor copy, same threads, read + write bytes
                  counted, the faster of a measurement before and after the runs). Bytes: the
                  touched experts' weights read once (3*F*D each, in the weights' dtype); with
                  backward also their gradients written once and the untouched gradient slices
                  zero-filled. Activations are not counted, nor a second read of the weights
                  in the backward, so no real engine should reach it.
The target floor ("auto / target floor") is the LOWEST timed floor at each T, from T = 512 up;
below it the lowest touched floor (flop reads one expert's weights where a few tokens touch
several, so it bounds nothing there); the table names it. A candidate faster than it is reported in a warning line: a floor that is beaten is not a
floor. Times are whole blocks (router + experts) for smoe's MoE and transformers' block.
Legend: T tokens, D dim, F hidden, E experts, K chosen experts per token, Et touched experts,
M rows of the busiest touched expert.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from smoe.config import ModelConfig
from smoe.dispatch import ENGINES, choose_engine
from smoe.dispatch import sorted_engine as sorted_mod
from smoe.dispatch.grouped_experts import silu_mul_backward
from smoe.dispatch.reference import swiglu
from smoe.malloc import keep_freed_memory
from smoe.model.moe import MoE


def swiglu_mv(x_D: torch.Tensor, w1_FD, w2_DF, w3_FD) -> torch.Tensor:
    """One row through one expert with matrix-vector products (the cheapest single-row read)."""
    return torch.mv(w2_DF, torch.nn.functional.silu(torch.mv(w1_FD, x_D)) * torch.mv(w3_FD, x_D))


class PaddedFloor(torch.autograd.Function):
    """The padded engine's products without its padding and unpadding copies: x_EMD (rows
    already padded per expert) -> o_EMD, three bmm forward, its hand-written backward (which
    writes each weight gradient once, contiguous; plain autograd of bmm(x, w^T) would copy it
    into the weight's layout)."""

    @staticmethod
    def forward(ctx, x_EMD, w1_EFD, w2_EDF, w3_EFD, save: bool):
        h1_EMF = torch.bmm(x_EMD, w1_EFD.transpose(1, 2))
        h3_EMF = torch.bmm(x_EMD, w3_EFD.transpose(1, 2))
        if save:
            ctx.save_for_backward(x_EMD, w1_EFD, w2_EDF, w3_EFD, h1_EMF, h3_EMF)
            g_EMF = torch.nn.functional.silu(h1_EMF) * h3_EMF
        else:
            g_EMF = torch.nn.functional.silu(h1_EMF, inplace=True).mul_(h3_EMF)
        return torch.bmm(g_EMF, w2_EDF.transpose(1, 2))

    @staticmethod
    def backward(ctx, do_EMD):
        x_EMD, w1_EFD, w2_EDF, w3_EFD, h1_EMF, h3_EMF = ctx.saved_tensors
        do_EMD = do_EMD.contiguous()
        dh1_EMF, dh3_EMF, g_EMF = silu_mul_backward(h1_EMF, h3_EMF, torch.bmm(do_EMD, w2_EDF))
        dx_EMD = torch.baddbmm(torch.bmm(dh1_EMF, w1_EFD), dh3_EMF, w3_EFD)
        dw1 = torch.bmm(dh1_EMF.transpose(1, 2), x_EMD)
        dw2 = torch.bmm(do_EMD.transpose(1, 2), g_EMF)
        dw3 = torch.bmm(dh3_EMF.transpose(1, 2), x_EMD)
        return dx_EMD, dw1, dw2, dw3, None


def sorted_grouped_mm(*args):
    """The sorted engine on torch._grouped_mm (on CPU it defaults to its loop)."""
    return sorted_mod.sorted_dispatch(*args, grouped=True)


def build(D: int, F: int, E: int, K: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, n_layers=1, n_heads=1, n_kv_heads=1)
    moe = MoE(cfg)
    with torch.no_grad():
        for p, fan_in in ((moe.gate.weight, D), (moe.w1, D), (moe.w2, F), (moe.w3, D)):
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return moe


def hf_block(moe: MoE, implementation: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    E, F, D = moe.w1.shape
    cfg = MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=moe.gate.top_k
    )
    cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([moe.w1, moe.w3], dim=1))
        block.experts.down_proj.copy_(moe.w2)
    return block


def candidates(moe: MoE, x_BTD: torch.Tensor, quick_names: list[str] | None):
    """name -> (module or function of x, tensors whose .grad is reset before every call: the
    parameters, and the floors' pre-sliced input leaves)."""
    T, K = x_BTD.shape[1], moe.gate.top_k
    E = moe.num_experts
    out = {}
    # On CPU "gather" and "sorted" run the same loop (loop_experts.py); auto is one of them.
    for name, engine in [("smoe auto", ENGINES["auto"]), ("smoe sorted-grouped_mm", sorted_grouped_mm),
                         ("smoe reference", ENGINES["reference"])]:  # fmt: skip
        if name == "smoe reference" and T > 512:
            continue  # minutes at T=4096 on this machine, and not a target
        out[name] = (
            lambda x, engine=engine: (setattr(moe, "engine", engine), moe(x)[0])[1],
            list(moe.parameters()),
        )
    impls = ["grouped_mm", "eager"] + (
        ["batched_mm"] if T * K <= 64 else []
    )  # batched_mm copies weights per row
    for impl in impls:
        block = hf_block(moe, impl)
        out[f"hf {impl}"] = (block, list(block.parameters()))
    # Floors: routing decided up front, rows pre-sliced and contiguous, no permutation.
    with torch.no_grad():
        ids_TK = moe.gate(x_BTD[0]).expert_ids_TK
    w1, w2, w3 = (moe.w1.detach().clone(), moe.w2.detach().clone(), moe.w3.detach().clone())
    x_rows = x_BTD[0].repeat_interleave(K, dim=0).detach()
    dense = [w[0].clone().requires_grad_() for w in (w1, w2, w3)]
    out["floor flop"] = (lambda x: swiglu(x_rows.requires_grad_(x.requires_grad), *dense), dense + [x_rows])
    groups, ws = [], []
    for e in range(E):
        token_N = (ids_TK == e).nonzero()[:, 0]
        if token_N.numel():
            we = [w[e].clone().requires_grad_() for w in (w1, w2, w3)]
            groups.append((we, x_BTD[0, token_N].detach().contiguous()))
            ws += we
    xs = [xe for _, xe in groups]

    def untouched_grads():
        """The untouched experts' slices of the three (E, F, D) gradients, zero-filled: all
        that an engine returning stacked gradients must add to the touched experts' gradients
        (which the floors' own weight leaves receive)."""
        return [w.new_zeros((E - len(groups),) + w.shape[1:]) for w in (w1, w2, w3)]

    def touched(x, by_row: bool):
        """Each expert on its rows."""
        if x.requires_grad:
            untouched_grads()
        outs = []
        for we, xe in groups:
            xe.requires_grad_(x.requires_grad)
            if by_row:
                outs += [swiglu_mv(xe[i], *we) for i in range(xe.shape[0])]
            else:
                outs.append(swiglu(xe, *we))
        return outs

    out["floor touched"] = (lambda x: touched(x, by_row=False), ws + xs)
    if T < 512:  # row by row only for few rows (thousands of rows otherwise)
        out["floor touched rows"] = (lambda x: touched(x, by_row=True), ws + xs)
    # Touched experts' weights gathered once, rows padded to the busiest touched expert.
    M = max(xe.shape[0] for xe in xs)
    x_EMD = x_BTD.new_zeros(len(xs), M, x_BTD.shape[2])
    for i, xe in enumerate(xs):
        x_EMD[i, : xe.shape[0]] = xe
    wt = [torch.stack([we[j].detach() for we, _ in groups]).requires_grad_() for j in range(3)]

    def touched_bmm(x):
        if x.requires_grad:
            untouched_grads()
        return PaddedFloor.apply(x_EMD.requires_grad_(x.requires_grad), *wt, torch.is_grad_enabled())

    out["floor touched bmm"] = (touched_bmm, wt + [x_EMD])
    return {n: c for n, c in out.items() if quick_names is None or n in quick_names}


def touched_bytes(moe: MoE, x_BTD: torch.Tensor, backward: bool) -> int:
    """Bytes the bandwidth estimate counts: touched weights read once; with backward also their
    gradients written once and the untouched gradient slices zero-filled."""
    with torch.no_grad():
        ids_TK = moe.gate(x_BTD[0]).expert_ids_TK
    E, F, D = moe.w1.shape
    per_expert = 3 * F * D * moe.w1.element_size()
    touched = int(torch.unique(ids_TK).numel())
    return per_expert * (touched + (E if backward else 0))


def bandwidth(mbytes: int, repeats: int = 7) -> float:
    """Bytes per second of a large copy (read + write counted), median of ``repeats``."""
    src = torch.ones(mbytes * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for r in range(repeats + 1):  # the first warms up (page faults)
        t0 = time.perf_counter()
        dst.copy_(src)
        if r:
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def time_once(fn, x_BTD, backward: bool) -> float:
    x = x_BTD.detach().requires_grad_(backward)
    t0 = time.perf_counter()
    if backward:
        y = fn(x)
        ys = y if isinstance(y, list) else [y]
        torch.autograd.backward(ys, [torch.ones_like(t) for t in ys])
    else:
        with torch.no_grad():
            fn(x)
    return time.perf_counter() - t0


def bench(moe, T, repeats, backward, names, budget_s: float = 0.0):
    """Medians over interleaved rounds: at least ``repeats`` rounds, more while a round is short
    enough that ``budget_s`` seconds hold more (small T: a 6 ms call needs hundreds of rounds
    before its median stops moving with the machine's noise)."""
    D = moe.w1.shape[2]
    x_BTD = torch.randn(1, T, D, generator=torch.Generator().manual_seed(T))
    cands = candidates(moe, x_BTD, names)
    times = {n: [] for n in cands}
    rounds, r = repeats, 0
    while r <= rounds:  # round 0 warms up; rounds interleave candidates against drift
        t_round = time.perf_counter()
        for name, (fn, params) in cands.items():
            for p in params:
                p.grad = None
            dt = time_once(fn, x_BTD, backward)
            if r:
                times[name].append(dt)
        if r == 1:  # the first timed round sets the count
            rounds = max(repeats, min(1000, int(budget_s / (time.perf_counter() - t_round))))
        r += 1
    auto = choose_engine(x_BTD[0], torch.empty(T, moe.gate.top_k), moe.num_experts)
    nbytes = touched_bytes(moe, x_BTD, backward)
    return {n: statistics.median(t) for n, t in times.items()}, auto, rounds, nbytes


FLOP_FLOOR_FROM_T = 512  # the issue: the equal-FLOP floor "for large T"


def target_floor(med: dict[str, float], T: int) -> tuple[str, float]:
    """The lowest timed floor that does the layer's work: (its name without "floor ", seconds);
    ("-", nan) if none ran. Below FLOP_FLOOR_FROM_T only the touched floors count (the issue:
    "reading only the touched experts' weights for small T"); the flop floor reads one expert's
    weights where T tokens touch several, so it is no floor there."""
    floors = [
        (t, n)
        for n, t in med.items()
        if n.startswith("floor ") and (T >= FLOP_FLOOR_FROM_T or n.startswith("floor touched"))
    ]
    if not floors:
        return "-", float("nan")
    t, n = min(floors)
    return n.removeprefix("floor "), t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes")
    ap.add_argument("--tokens", type=int, nargs="*", help="token counts T")
    ap.add_argument("--repeats", type=int, default=5, help="at least this many timed rounds")
    ap.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="seconds of timed rounds per (mode, T) when rounds are short",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--only", nargs="*", help="candidate names to run (default all)")
    ap.add_argument("--bw-mb", type=int, default=512, help="MB copied to measure memory bandwidth")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for every candidate (smoe.malloc; what the smoe command does)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = args.keep_freed_memory and keep_freed_memory()
    if args.keep_freed_memory and not kept:
        raise SystemExit("--keep-freed-memory: this C library does not take glibc's malloc settings")
    D, F, E, K = (64, 224, 8, 2) if args.quick else (1024, 3584, 8, 2)
    tokens = args.tokens or ([1, 16, 128] if args.quick else [1, 16, 512, 4096])
    moe = build(D, F, E, K)
    load_start = os.getloadavg()
    bw_start = bandwidth(args.bw_mb)
    rows, rounds_used = [], {}
    for mode in args.modes:
        for T in tokens:
            med, auto_choice, n_rounds, nbytes = bench(
                moe, T, args.repeats, mode == "fwd+bwd", args.only, args.budget
            )
            rows.append((mode, T, auto_choice, med, nbytes))
            rounds_used[(mode, T)] = n_rounds
            print(f"{mode} T={T}: " + ", ".join(f"{n} {1e3 * t:.2f} ms" for n, t in med.items()), flush=True)
    bw_end = bandwidth(args.bw_mb)
    bw = max(bw_start, bw_end)
    load = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(load_start, os.getloadavg()))
    counts = ", ".join(f"{m} T={t}: {n}" for (m, t), n in rounds_used.items())
    allocator = "glibc keeps freed memory (--keep-freed-memory)" if kept else "default allocator settings"
    print(
        f"\nD={D} F={F} E={E} K={K}, float32, {args.threads} threads, {allocator}, medians of rounds ({counts})"
    )
    print(f"load average 1/5/15 min at start/end: {load}")
    print(
        f"copy bandwidth ({args.bw_mb} MB, read + write) at start/end: {bw_start / 1e9:.2f}/"
        f"{bw_end / 1e9:.2f} GB/s; bw est uses {bw / 1e9:.2f} GB/s (an estimate, not timed)"
    )
    names = list(rows[0][3])
    table, warnings = [], []
    for mode, T, choice, med, nbytes in rows:
        hf_best = min((t for n, t in med.items() if n.startswith("hf ")), default=float("nan"))
        floor_name, floor = target_floor(med, T)
        bw_est = nbytes / bw
        auto = med.get("smoe auto", float("nan"))
        cells = " | ".join(f"{1e3 * med[n]:.2f}" if n in med else "-" for n in names)
        table.append(
            f"| {mode} | {T} | {choice} | {cells} | {1e3 * bw_est:.2f} | {floor_name} | {1e3 * floor:.2f} "
            f"| {auto / hf_best:.2f} | {auto / floor:.2f} | {auto / bw_est:.2f} |"
        )
        for n, t in med.items():
            if not n.startswith("floor ") and t < floor:
                warnings.append(
                    f"WARNING {mode} T={T}: {n} {1e3 * t:.2f} ms is faster than the target floor "
                    f"({floor_name}, {1e3 * floor:.2f} ms): a floor that is beaten is not a floor"
                )
    print("\n".join([""] + warnings + ([""] if warnings else [])))  # the table comes last
    print(
        "| mode | T | auto runs | "
        + " | ".join(f"{n} ms" for n in names)
        + " | floor bw est ms | target floor | target floor ms | auto / hf best | auto / target floor"
        + " | auto / bw est |"
    )
    print("|" + "---|" * (len(names) + 9))
    print("\n".join(table))


if __name__ == "__main__":
    main()
