"""Figures (matplotlib, Agg backend): one palette of op kinds shared by every figure.

So far: :func:`plot_comparison`, the before/after figure of :func:`aliasscope.compare.compare`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .compare import Comparison

__all__ = ["KIND_COLOURS", "plot_comparison", "save_figure"]

KIND_COLOURS: dict[str, str] = {
    "nonlinearity": "#d62728",
    "downsampling": "#1f77b4",
    "upsampling": "#17becf",
    "normalisation": "#9467bd",
    "attention": "#ff7f0e",
    "patch_embed": "#8c564b",
    "position_embed": "#e377c2",
    "pooling": "#2ca02c",
    "linear": "#7f7f7f",
    "token_mixing": "#bcbd22",
    "residual": "#aec7e8",
    "layout": "#c7c7c7",
    "block": "#98df8a",
    "other": "#dbdb8d",
}
"""Colour of each op kind (:data:`aliasscope.KINDS`), the same in every figure."""


def save_figure(fig: Figure, path: str | Path | None) -> None:
    """Save as PNG (150 dpi) and, next to it, SVG; nothing when ``path`` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"), dpi=150, bbox_inches="tight")
    fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")


def plot_comparison(result: Comparison, path: str | Path | None = None) -> Figure:
    """Before/after figure: (a) end-to-end Lie derivative per transform with 95% intervals (log scale),
    (b) accuracy and consistency, (c) share of the Lie derivative by op kind, per model."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    rows, transforms = result.rows, result.settings.get("transforms", [])
    names = [r["model"] for r in rows]
    colours = plt.get_cmap("tab10")(np.arange(len(names)) % 10)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.3, 1.1, 1.0]})
    width = 0.8 / max(len(names), 1)

    ax = axes[0]
    x = np.arange(len(transforms))
    for i, r in enumerate(rows):
        mean = np.array([r[f"lie_{t}"] for t in transforms])
        lo = np.array([r[f"lie_{t}_ci95_low"] for t in transforms])
        hi = np.array([r[f"lie_{t}_ci95_high"] for t in transforms])
        err = np.nan_to_num(np.vstack([mean - lo, hi - mean]), nan=0.0)
        ax.bar(
            x + (i - (len(rows) - 1) / 2) * width,
            mean,
            width,
            yerr=err,
            capsize=2,
            color=colours[i],
            label=names[i],
        )
    ax.set_xticks(x, [t.replace("_", " ") for t in transforms], rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("mean |L_X softmax| over classes (per image mean)")
    ax.set_title("(a) End-to-end Lie derivative (95% interval); lower = more equivariant")
    ax.legend(fontsize=8)

    ax = axes[1]
    measures = [
        ("top1", "top-1"),
        ("agreement", "agrees w/ first"),
        ("shift_consistency", "shift consist."),
        ("fractional_shift_consistency", "sub-pixel consist."),
    ]
    x = np.arange(len(measures))
    for i, r in enumerate(rows):
        vals = [100 * r.get(k, float("nan")) for k, _ in measures]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, color=colours[i], label=names[i])
    finite = [100 * r.get(k, float("nan")) for r in rows for k, _ in measures]
    finite = [v for v in finite if v == v]
    ax.set_ylim(max(0.0, min(finite, default=0.0) - 5), 100.5)
    ax.set_xticks(x, [label for _, label in measures], rotation=20)
    ax.set_ylabel("% of images")
    ax.set_title("(b) Accuracy and consistency")

    ax = axes[2]
    kinds = [k for k in KIND_COLOURS if any(k in result.by_kind.get(n, {}) for n in names)]
    bottom = np.zeros(len(names))
    for kind in kinds:
        shares = np.array([100 * result.by_kind.get(n, {}).get(kind, {}).get("share", 0.0) for n in names])
        if not shares.any():
            continue
        ax.bar(np.arange(len(names)), shares, 0.6, bottom=bottom, color=KIND_COLOURS[kind], label=kind)
        bottom += shares
    ax.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(f"% of the Lie derivative ({result.settings.get('layer_transform')}, predicted class)")
    ax.set_title("(c) Layer attribution by op kind")
    if kinds:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(
        f"Before/after: {result.settings.get('images')} images, {result.settings.get('generator')} generator",
        fontsize=12,
    )
    fig.tight_layout()
    save_figure(fig, path)
    return fig
