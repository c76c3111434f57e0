"""PNG plots of routing statistics (matplotlib, Agg backend: no display needed).

Legend: L analysed layers, E experts. Each function writes one file and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from smoe.analysis.stats import DomainStats, chance_any, chance_first, merge  # noqa: E402

COLORS = plt.get_cmap("tab10").colors


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _label(name: str) -> str:
    """A domain name as a legend label drawn verbatim: matplotlib leaves labels starting with "_"
    out of legends (a leading space keeps it) and reads "$...$" as mathtext (which may not parse)."""
    name = name.replace("$", r"\$")
    return " " + name if name.startswith("_") else name


def _share_bars(ax, shares: dict[str, np.ndarray], E: int, title: str) -> None:
    """Grouped bars: one group per expert, one bar per domain; dashed line at uniform 1/E."""
    n = len(shares)
    width = 0.8 / n
    for i, (name, share_E) in enumerate(shares.items()):
        ax.bar(
            np.arange(E) + (i - (n - 1) / 2) * width, share_E, width, label=_label(name), color=COLORS[i % 10]
        )
    ax.axhline(1.0 / E, color="k", ls="--", lw=1)
    ax.set_xticks(range(E))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("expert")


def share_plot(
    stats: dict[str, DomainStats], layers: list[int], show: list[int], E: int, first: bool, path: Path
) -> Path:
    """Paper Figure 7: proportion of assignments to each expert per domain, for layers ``show``."""
    cols = min(len(show), 4 if len(show) > 3 else 3)
    rows = math.ceil(len(show) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, layer in zip(axes.flat, show):
        li = layers.index(layer)
        shares = {n: (s.first_choice_share() if first else s.expert_share())[li] for n, s in stats.items()}
        _share_bars(ax, shares, E, f"layer {layer}")
    for ax in list(axes.flat)[len(show) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("first-choice share" if first else "share of top-k assignments")
    axes.flat[0].legend(fontsize=8)
    what = "first choice only" if first else "all top-k choices"
    fig.suptitle(f"Expert share per domain ({what}); dashed: uniform 1/E", fontsize=11)
    return _save(fig, path)


def repeat_plot(stats: dict[str, DomainStats], layers: list[int], E: int, K: int, path: Path) -> Path:
    """Paper Table 5 as curves: repeat rates per layer and domain, with the chance baselines."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, what, chance in ((axes[0], "first", chance_first(E, K)), (axes[1], "any", chance_any(E, K))):
        for i, (name, s) in enumerate(stats.items()):
            y = s.repeat_first() if what == "first" else s.repeat_any()
            ax.plot(layers, y, "o-", label=_label(name), color=COLORS[i % 10])
        ax.axhline(chance, color="k", ls="--", lw=1, label=f"chance {chance:.1%}")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.set_title(f"repeat rate, {'first choice' if what == 'first' else 'any of top-k'}", fontsize=10)
    axes[0].set_ylabel("fraction of consecutive pairs")
    axes[1].legend(fontsize=8)
    return _save(fig, path)


def health_plot(stats: dict[str, DomainStats], layers: list[int], E: int, path: Path) -> Path:
    """Load per expert and layer (all domains), max/mean imbalance and mean router entropy."""
    all_ = merge(list(stats.values()))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    share_LE = all_.expert_share()
    im = axes[0].imshow(share_LE, aspect="auto", cmap="viridis")
    axes[0].set_yticks(range(len(layers)), [str(x) for x in layers])
    axes[0].set_xticks(range(E))
    axes[0].set(xlabel="expert", ylabel="layer", title=f"share of assignments (uniform {1 / E:.3f})")
    fig.colorbar(im, ax=axes[0])
    for i, (name, s) in enumerate(stats.items()):
        axes[1].plot(layers, s.imbalance(), "o-", label=_label(name), color=COLORS[i % 10])
        axes[2].plot(layers, s.mean_entropy(), "o-", label=_label(name), color=COLORS[i % 10])
    for ax in axes[1:]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].axhline(1.0, color="k", ls="--", lw=1)
    axes[1].set(xlabel="layer", ylabel="max / mean tokens per expert", title="load imbalance (1 = balanced)")
    axes[2].axhline(math.log(E), color="k", ls="--", lw=1, label="log E (uniform)")
    axes[2].set(xlabel="layer", ylabel="nats", title="mean router entropy (softmax over all E)")
    axes[2].set_ylim(0, math.log(E) * 1.05)
    axes[2].legend(fontsize=8)
    return _save(fig, path)


def coselection_plot(
    stats: dict[str, DomainStats], layers: list[int], show: list[int], E: int, path: Path
) -> Path:
    """How often experts i and j are chosen together for one token, as a fraction of tokens."""
    all_ = merge(list(stats.values()))
    fig, axes = plt.subplots(1, len(show), figsize=(4 * len(show), 4.0), squeeze=False)
    for ax, layer in zip(axes[0], show):
        m = all_.cosel_LEE[layers.index(layer)] / max(all_.tokens, 1)
        im = ax.imshow(m, cmap="magma")
        ax.set_xticks(range(E))
        ax.set_yticks(range(E))
        ax.set(title=f"layer {layer}", xlabel="expert j", ylabel="expert i")
        fig.colorbar(im, ax=ax)
    fig.suptitle("co-selection: fraction of tokens routed to both i and j", fontsize=11)
    return _save(fig, path)


def write_plots(
    stats: dict[str, DomainStats], layers: list[int], details: list[int], E: int, K: int, out: Path
) -> dict[str, Path]:
    return {
        "expert_share": share_plot(stats, layers, details, E, False, out / "expert_share.png"),
        "first_choice_share": share_plot(stats, layers, details, E, True, out / "first_choice_share.png"),
        "expert_share_all_layers": share_plot(
            stats, layers, layers, E, False, out / "expert_share_all_layers.png"
        ),
        "first_choice_share_all_layers": share_plot(
            stats, layers, layers, E, True, out / "first_choice_share_all_layers.png"
        ),
        "repeat_rates": repeat_plot(stats, layers, E, K, out / "repeat_rates.png"),
        "health": health_plot(stats, layers, E, out / "health.png"),
        "coselection": coselection_plot(stats, layers, details, E, out / "coselection.png"),
    }
