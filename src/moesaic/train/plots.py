"""PNG plots of a run: training and validation loss, and the expert load of each MoE layer over steps.

matplotlib runs with the headless Agg backend, so plots are written on machines without a screen.
Without matplotlib (``pip install moesaic`` with no extras) no plots are written, with one warning;
``history.json`` holds the same figures.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List


def write_plots(history: Dict, folder: Path) -> List[Path]:
    """Write ``loss.png`` and one ``load_<layer>.png`` heatmap per MoE layer; returns their paths.

    The load heatmaps have one row per expert of the layer (global expert numbers) and show each
    expert's share of the layer's kept routes over all ranks (the trainer records the engine's
    figures, summed over every rank's tokens). Returns ``[]`` (with a warning) without matplotlib.
    """
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots (pip install 'moesaic[train]'); history.json holds "
                      "the figures", RuntimeWarning, stacklevel=2)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if history["train"]:
        steps = [r[0] for r in history["train"]]
        ax.plot(steps, [r[1] for r in history["train"]], label="train loss", lw=1, alpha=0.8)
    if history["val"]:
        ax.plot([r[0] for r in history["val"]], [r[1] for r in history["val"]], "o-", label="validation loss")
    if history.get("unigram_baseline") is not None:
        ax.axhline(history["unigram_baseline"], color="gray", ls="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title("MoE byte-level LM")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = folder / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    for name, rows in sorted(history.get("load", {}).items()):
        if not rows:
            continue
        steps = [r[0] for r in rows]
        counts = [r[1:] for r in rows]
        fractions = [[c / max(sum(row), 1) for c in row] for row in counts]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        image = ax.imshow(list(map(list, zip(*fractions))), aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, len(counts[0]) - 0.5, -0.5))
        ax.set_xlabel("step")
        ax.set_ylabel("expert number")
        ax.set_yticks(range(len(counts[0])))
        ax.set_title(f"tokens per expert: {name} (fraction of the layer's kept routes)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = folder / f"load_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
