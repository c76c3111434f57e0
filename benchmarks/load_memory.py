"""Peak resident memory while loading a ≈1 GB checkpoint: smoe vs transformers.

Each loader runs in its own fresh process; we report its peak RSS (ru_maxrss) minus the RSS
just before loading (after `import torch`), as a multiple of the checkpoint's size on disk.

    python benchmarks/load_memory.py [--dir /tmp/smoe-1gb] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import resource, sys, time, json, torch
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
if sys.argv[1] == "smoe":
    import smoe
else:
    import transformers
before = rss_mb()
t = time.perf_counter()
if sys.argv[1] == "smoe":
    m = smoe.load_model(sys.argv[2], dtype=sys.argv[3])
else:
    m = transformers.MixtralForCausalLM.from_pretrained(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"before_mb": before, "peak_mb": peak, "after_mb": rss_mb(), "seconds": dt}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/smoe-1gb")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    import torch

    import smoe

    directory = Path(args.dir)
    if not (directory / "config.json").exists():
        cfg = smoe.ModelConfig(dim=1024, n_layers=2, head_dim=64, hidden_dim=3584, n_heads=16, n_kv_heads=4,
                               vocab_size=32000, num_experts=8, top_k=2, max_seq_len=4096)  # fmt: skip
        smoe.save_model(smoe.build_model(cfg, dtype=torch.float32), directory)
    size_mb = sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 2**20
    rows = []
    for loader in ("smoe", "transformers"):
        subprocess.run(["sync"], check=False)
        time.sleep(1)
        out = subprocess.run([sys.executable, "-c", CHILD, loader, str(directory), args.dtype],
                             capture_output=True, text=True, check=True)  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((loader, r["peak_mb"] - r["before_mb"], r["after_mb"] - r["before_mb"], r["seconds"]))
    print(f"\ncheckpoint: {directory} ({size_mb:.0f} MiB on disk, {args.dtype})\n")
    print("| loader | peak RSS growth (MiB) | × checkpoint | RSS after load (MiB) | load time (s) |")
    print("|---|---|---|---|---|")
    for name, peak, after, secs in rows:
        print(f"| {name} | {peak:.0f} | {peak / size_mb:.2f} | {after:.0f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
