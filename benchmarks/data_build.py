"""Time `build_corpus` with its defaults, and batched vs per-text SentencePiece encoding.

    python benchmarks/data_build.py [--repeats 3]

Builds (in a temporary directory) the default corpus -- every built-in domain plus the system
domains present -- and the fresh-machine subset (code, math, prose), ``--repeats`` times each,
and reports medians. The wall time excludes the ~5 s of Python/torch start-up that the
``smoe data build`` command adds. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from smoe.data.build import _encode_many, build_corpus
from smoe.data.sources import code_source
from smoe.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tok = load_tokenizer()
    rows = []
    for label, domains in (
        ("default (all available)", None),
        ("code, math, prose only", ["code", "math", "prose"]),
    ):
        times, manifest = [], None
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                manifest = build_corpus(
                    Path(tmp) / "c", seed=0, domains=domains, tokenizer=tok, progress=False
                )
                times.append(time.perf_counter() - t0)
        o = manifest["overall"]
        n_tok = o["train"]["tokens"] + o["val"]["tokens"]
        med = statistics.median(times)
        rows.append(
            [
                f"build: {label}",
                len(manifest["domains"]),
                f"{n_tok:,}",
                f"{med:.1f} s",
                f"{n_tok / med / 1e3:.0f}k tok/s",
            ]
        )

    # Encoding alone: the first ~1 MB of standard-library source, batched vs a Python loop.
    texts, size = [], 0
    for key in sorted(code_source().candidates()):
        t = Path(key).read_text(encoding="utf-8", errors="replace")
        texts.append(t)
        size += len(t)
        if size > 1_000_000:
            break
    loop, batch = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ids = [tok.encode(t, bos=False) for t in texts]
        loop.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ids_b = _encode_many(tok, texts)
        batch.append(time.perf_counter() - t0)
        assert ids == ids_b
    n = sum(map(len, ids))
    lo, ba = statistics.median(loop), statistics.median(batch)
    rows.append(["encode: per-text loop", "-", f"{n:,}", f"{lo:.2f} s", f"{n / lo / 1e3:.0f}k tok/s"])
    rows.append(
        [
            "encode: batched (used)",
            "-",
            f"{n:,}",
            f"{ba:.2f} s",
            f"{n / ba / 1e3:.0f}k tok/s ({lo / ba:.1f}x)",
        ]
    )

    print(f"\nmedian of {args.repeats} runs\n")
    print("| what | domains | tokens | wall | throughput |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
