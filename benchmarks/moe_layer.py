"""CPU benchmark of one MoE layer: smoe's dispatch engines vs transformers' MixtralSparseMoeBlock
(its default "grouped_mm" experts and "eager"; "batched_mm" at small T) vs an equal-work floor,
all in one process on the same weights, interleaved, medians of repeats.

    python benchmarks/moe_layer.py            # dim 1024, hidden 3584, E 8, k 2, T in 1 16 512 4096
    python benchmarks/moe_layer.py --quick    # tiny shapes, seconds

Floors (no router, no permutation, inputs pre-sliced, plain autograd, same threads, timed
interleaved with the candidates):
    flop          a dense SwiGLU: T*k rows through ONE expert's weights (same FLOPs, one weight
                  read). The issue's floor for large T.
    touched       each touched expert's SwiGLU on exactly its rows, one product per weight (same
                  work, only the touched experts' weights read).
    touched rows  the same, one matrix-vector product per row (cheaper than a product of few rows
                  on this CPU build, and always under load; see src/smoe/dispatch/loop_experts.py).
With backward both touched floors also zero-fill the three dense (E, F, D) weight gradients every
engine returns for stacked weights. The target floor is the faster touched floor for T < 512
(reading weights dominates: the issue's "reading only the touched experts' weights") and flop
from 512 up. Times are whole blocks (router + experts) for smoe's MoE and transformers' block.
Legend: T tokens, D dim, F hidden, E experts, K chosen experts per token.
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
from smoe.dispatch.reference import swiglu
from smoe.model.moe import MoE


def swiglu_mv(x_D: torch.Tensor, w1_FD, w2_DF, w3_FD) -> torch.Tensor:
    """One row through one expert with matrix-vector products (the cheapest single-row read)."""
    return torch.mv(w2_DF, torch.nn.functional.silu(torch.mv(w1_FD, x_D)) * torch.mv(w3_FD, x_D))


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
    """name -> (module or function of x, parameters whose gradients the backward computes)."""
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
    out["floor flop"] = (lambda x: swiglu(x_rows.requires_grad_(x.requires_grad), *dense), dense)
    groups, ws = [], []
    for e in range(E):
        token_N = (ids_TK == e).nonzero()[:, 0]
        if token_N.numel():
            we = [w[e].clone().requires_grad_() for w in (w1, w2, w3)]
            groups.append((we, x_BTD[0, token_N].detach().contiguous()))
            ws += we

    def touched(x, by_row: bool):
        """Each expert on its rows. With gradients, also the three zeroed (E, F, D) gradient
        tensors that any engine must produce for stacked weights (the per-expert leaves here
        would not)."""
        if x.requires_grad:
            [torch.zeros(w.shape) for w in (w1, w2, w3)]
        outs = []
        for we, xe in groups:
            xe.requires_grad_(x.requires_grad)
            if by_row:
                outs += [swiglu_mv(xe[i], *we) for i in range(xe.shape[0])]
            else:
                outs.append(swiglu(xe, *we))
        return outs

    out["floor touched"] = (lambda x: touched(x, by_row=False), ws)
    if T < 512:  # row by row only where it is the target floor (thousands of rows otherwise)
        out["floor touched rows"] = (lambda x: touched(x, by_row=True), ws)
    return {n: c for n, c in out.items() if quick_names is None or n in quick_names}


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
    return {n: statistics.median(t) for n, t in times.items()}, auto, rounds


def target_floor(T: int, med: dict[str, float]) -> float:
    """The issue's floor: reading only the touched weights for small T, equal FLOPs from 512."""
    if T >= 512:
        return med.get("floor flop", float("nan"))
    return min((med[n] for n in ("floor touched", "floor touched rows") if n in med), default=float("nan"))


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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    D, F, E, K = (64, 224, 8, 2) if args.quick else (1024, 3584, 8, 2)
    tokens = args.tokens or ([1, 16, 128] if args.quick else [1, 16, 512, 4096])
    moe = build(D, F, E, K)
    load_start = os.getloadavg()
    rows, rounds_used = [], {}
    for mode in args.modes:
        for T in tokens:
            med, auto_choice, n_rounds = bench(
                moe, T, args.repeats, mode == "fwd+bwd", args.only, args.budget
            )
            rows.append((mode, T, auto_choice, med))
            rounds_used[(mode, T)] = n_rounds
            print(f"{mode} T={T}: " + ", ".join(f"{n} {1e3 * t:.2f} ms" for n, t in med.items()), flush=True)
    load = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(load_start, os.getloadavg()))
    counts = ", ".join(f"{m} T={t}: {n}" for (m, t), n in rounds_used.items())
    print(f"\nD={D} F={F} E={E} K={K}, float32, {args.threads} threads, medians of rounds ({counts})")
    print(f"load average 1/5/15 min at start/end: {load}\n")
    names = list(rows[0][3])
    print(
        "| mode | T | auto runs | "
        + " | ".join(f"{n} ms" for n in names)
        + " | auto / hf best | auto / floor |"
    )
    print("|" + "---|" * (len(names) + 5))
    for mode, T, choice, med in rows:
        hf_best = min((t for n, t in med.items() if n.startswith("hf ")), default=float("nan"))
        floor = target_floor(T, med)
        auto = med.get("smoe auto", float("nan"))
        cells = " | ".join(f"{1e3 * med[n]:.2f}" if n in med else "-" for n in names)
        print(f"| {mode} | {T} | {choice} | {cells} | {auto / hf_best:.2f} | {auto / floor:.2f} |")


if __name__ == "__main__":
    main()
