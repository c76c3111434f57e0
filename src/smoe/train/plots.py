"""PNG plots of a run's metrics.jsonl: loss (train and per-domain validation), learning rate,
and load imbalance (max / mean tokens per expert) per MoE layer."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "val"]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``RUN_DIR/plots/{loss,lr,imbalance}.png``; returns the paths written."""
    train, val = read_metrics(run_dir)
    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    steps = [r["step"] for r in train]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train")
    for d in sorted(val[0]["val"]) if val else []:
        ax.plot([r["step"] for r in val], [r["val"][d] for r in val], marker="o", ms=3, label=f"val {d}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate (warmup + cosine)")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "lr.png"))

    if train and "imbalance" in train[0]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for layer in range(len(train[0]["imbalance"])):
            ax.plot(steps, [r["imbalance"][layer] for r in train], lw=0.8, label=f"layer {layer}")
        ax.axhline(1.0, color="k", lw=0.5, ls="--")
        ax.set(
            xlabel="step",
            ylabel="max / mean tokens per expert",
            title="load imbalance per layer (1 = balanced)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "imbalance.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
