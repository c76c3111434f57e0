"""What routing recording costs: a plain forward, a forward with ``return_router=True``, and the
full recording pass of ``smoe analyze`` (forward + statistics + per-token records, no plots).

    python benchmarks/analysis_recording.py [--preset tiny] [--batch 4] [--seq 256] [--repeats 7]

The three are timed interleaved, in a rotating order, and the table (last) gives medians and ratios
to the plain forward, so machine noise hits all three alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import smoe
from smoe.analysis.record import RecordWriter, route_documents
from smoe.analysis.stats import DomainStats, router_entropy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = smoe.build_model(smoe.ModelConfig.preset(args.preset)).eval()
    cfg = model.config
    tokens_BT = torch.randint(3, cfg.vocab_size, (args.batch, args.seq))
    docs = [row.numpy() for row in tokens_BT]
    layers = list(range(cfg.n_layers))
    tmp = tempfile.mkdtemp()

    def plain():
        model(tokens_BT)

    def with_router():
        model(tokens_BT, return_router=True)

    def record():
        stats = DomainStats(len(layers), cfg.num_experts, cfg.top_k)
        writer = RecordWriter(tmp, layers, cfg.top_k, cfg.num_experts)
        for ch in route_documents(model, docs, layers, args.seq, batch_size=args.batch):
            N, L, E = ch.logits_NLE.shape
            stats.update(
                ch.doc_ids_N, ch.expert_ids_NLK, router_entropy(ch.logits_NLE.reshape(N * L, E)).reshape(N, L)
            )
            writer.append(ch)
        writer.close()

    cases = {
        "forward": plain,
        "forward, return_router=True": with_router,
        "recording pass (smoe analyze)": record,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for f in cases.values():
            f()  # warm-up
        names = list(cases)
        for r in range(args.repeats):
            for name in names[r % 3 :] + names[: r % 3]:  # rotate the order: no position bias
                f = cases[name]
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["forward"])
    n_tok = args.batch * args.seq
    print(
        f"\n{args.preset}, {args.batch} x {args.seq} tokens, torch {torch.__version__}, {args.repeats} repeats"
    )
    print("\n| path | median ms | tokens/s | ratio to forward |\n|---|---:|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {1e3 * m:.1f} | {n_tok / m:,.0f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
