"""Bar charts of quantization sensitivity (KL added by quantizing one group alone), for `llmc analyze`
and the accuracy card of a `--max-ppl-delta` build. One chart module so both read the same way."""

from __future__ import annotations

import re
from pathlib import Path

_LAYER = re.compile(r"layers\.(\d+)\.(?:\w+\.)*?(\w+)$")


def plot_sensitivity(rows: list[dict], path: Path, title: str) -> bool:
    """rows: {group, kl_mean, ppl_delta}. Per-matmul rows are grouped by layer, coloured by projection.
    Returns False (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [_short(r["group"]) for r in rows]
    projections = sorted({_projection(r["group"]) for r in rows})
    palette = plt.get_cmap("tab10")
    colors = [palette(projections.index(_projection(r["group"])) % 10) for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.32 * len(rows) + 2), 5.6), sharex=True)
    for ax, key, label in ((axes[0], "kl_mean", "KL vs PyTorch (nats/token)"),
                           (axes[1], "ppl_delta", "perplexity delta (%)")):
        scale = 100 if key == "ppl_delta" else 1
        ax.bar(range(len(rows)), [r[key] * scale for r in rows], color=colors)
        ax.set_ylabel(label, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[1].set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette(i % 10)) for i in range(len(projections))]
    if len(projections) > 1:
        axes[0].legend(handles, projections, fontsize=7, ncol=min(4, len(projections)))
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _short(group: str) -> str:
    m = _LAYER.search(group)
    return f"L{m.group(1)}.{m.group(2)}" if m else group


def _projection(group: str) -> str:
    m = _LAYER.search(group)
    return m.group(2) if m else group
