"""CPU: what the matrix products alone cost when the rows are split over experts, against the
same FLOPs through one weight (the moe_layer benchmark's "flop" floor). No routing, no SwiGLU,
exactly equal rows per expert (no padding): if the best per-expert form is already above
1.15x the dense product here, the whole layer cannot be within 1.15x of the flop floor with
torch's CPU products.

    python benchmarks/expert_products.py                 # T*k = 1024 and 8192 rows, E 8
    python benchmarks/expert_products.py --rows 32       # few rows: products vs row-by-row mv

Forms, all for x_AD @ w1[e]^T with A rows, A / E per expert (D 1024, F 3584):
    dense       one product of all A rows with ONE expert's weight (the flop floor's product)
    bmm         one batched product over E experts
    loop mm     one product per expert into slices of one output
    grouped_mm  torch._grouped_mm with per-expert offsets
    loop w@x^T  per expert, the transposed product w1[e] @ x_e^T
    rows mv     per expert, one matrix-vector product per row (only for few rows)
Legend: A rows (T * k), D model dim, F expert hidden dim, E experts, M = A / E rows per expert.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def forms(A: int, D: int, F: int, E: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    w1_EFD = torch.randn(E, F, D, generator=gen) / D**0.5
    x_AD = torch.randn(A, D, generator=gen)
    M = A // E
    offs_E = (torch.arange(1, E + 1) * M).to(torch.int32)
    x_EMD = x_AD.view(E, M, D)

    def loop_mm():
        out_AF = x_AD.new_empty(A, F)
        for e in range(E):
            torch.mm(x_EMD[e], w1_EFD[e].t(), out=out_AF[e * M : (e + 1) * M])

    def loop_transposed():
        return [torch.mm(w1_EFD[e], x_EMD[e].t()) for e in range(E)]

    def rows_mv():
        return [torch.mv(w1_EFD[e], x_EMD[e, i]) for e in range(E) for i in range(M)]

    out = {
        "dense": lambda: torch.mm(x_AD, w1_EFD[0].t()),
        "bmm": lambda: torch.bmm(x_EMD, w1_EFD.transpose(1, 2)),
        "loop mm": loop_mm,
        "grouped_mm": lambda: torch._grouped_mm(x_AD, w1_EFD.transpose(1, 2), offs=offs_E),
        "loop w@x^T": loop_transposed,
    }
    if M <= 16:
        out["rows mv"] = rows_mv
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[1024, 8192], help="A = T * k")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    D, F, E = 1024, 3584, args.experts
    load_start = os.getloadavg()
    table = []
    for A in args.rows:
        cands = forms(A, D, F, E)
        times = {n: [] for n in cands}
        for r in range(args.repeats + 1):  # round 0 warms up; candidates interleaved
            for name, fn in cands.items():
                t0 = time.perf_counter()
                fn()
                if r:
                    times[name].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) for n, t in times.items()}
        table += [(A, n, 1e3 * t, 1e3 * min(times[n]), t / med["dense"]) for n, t in med.items()]
    load = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(load_start, os.getloadavg()))
    print(f"\nD={D} F={F} E={E}, float32, {args.threads} threads, median of {args.repeats}")
    print(f"load average 1/5/15 min at start/end: {load}\n")
    print("| rows A | rows per expert | form | median ms | min ms | median / dense |")
    print("|---|---|---|---|---|---|")
    for A, name, med_ms, min_ms, ratio in table:
        print(f"| {A} | {A // E} | {name} | {med_ms:.2f} | {min_ms:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
