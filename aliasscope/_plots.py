"""Figures (matplotlib, Agg backend): one palette of op kinds shared by every figure.

Every function takes result objects (views of data computed elsewhere), returns the matplotlib Figure
and, given ``path``, writes ``path.png`` and ``path.svg``:

- :func:`plot_layer_attribution`: per-op shares along depth (one row per transform), cumulative share,
  shares by kind;
- :func:`plot_transforms`: end-to-end Lie derivative per transform with 95% intervals;
- :func:`plot_lie_distribution`: the same per image (points over quartile boxes);
- :func:`plot_spectral`: alias energy along depth and radial spectra (depth x frequency);
- :func:`plot_convergence`: the alias ratio at every upsampling factor measured, with a verdict;
- :func:`plot_alias_vs_attribution`: alias energy vs Lie-derivative share, one point per op;
- :func:`plot_where`: where in the image the top ops' contributions sit, over the photos;
- :func:`plot_comparison`: before/after of :func:`aliasscope.comparison.compare`.

Ops are coloured by kind (:data:`KIND_COLOURS`, from :mod:`aliasscope.kinds`); a by-kind panel shows
every kind its results hold, registered ones in registry order.

The report figures are at most :data:`FIGURE_WIDTH` inches wide with no text below
:data:`MIN_FONT_PT` points, so that, shown at the width of a page, no label is tiny. "Share" is
:data:`aliasscope._report.SHARE_DEFINITION` everywhere, shown in %.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._report import CONVERGENCE_TOLERANCE, convergence_verdict
from .kinds import KIND_COLOURS, kind_colour, kind_order

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from .comparison import Comparison
    from .decomposition import Decomposition
    from .lie import EquivarianceMetrics
    from .spectrum import Spectrum

__all__ = [
    "FIGURE_WIDTH",
    "KIND_COLOURS",
    "MIN_FONT_PT",
    "plot_alias_vs_attribution",
    "plot_comparison",
    "plot_convergence",
    "plot_layer_attribution",
    "plot_lie_distribution",
    "plot_spectral",
    "plot_transforms",
    "plot_where",
    "save_figure",
    "stage_of",
]


FIGURE_WIDTH = 12.0
"""Width (inches) of the report's figures: shown at a page's width (about 1150 px) they keep their size."""

MIN_FONT_PT = 8.0
"""No text of a report figure is smaller (points)."""

_STYLE = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "figure.titlesize": 12,
}
_SHARE_NOTE = (
    "share = sum over images of |c_op| / sum over ops and images of |c|, in %; the sign is lost: "
    "contributions that cancel in the total both count"
)


def save_figure(fig: Figure, path: str | Path | None, *, dpi: int = 150) -> None:
    """Save as PNG (``dpi``, default 150) and, next to it, SVG; nothing when ``path`` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"), dpi=dpi, bbox_inches="tight")
    fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")


class _Figures:
    """The few pyplot calls the figures make, on bare :class:`matplotlib.figure.Figure` objects:
    no backend is chosen or switched and nothing joins pyplot's list of open figures, so a notebook's
    backend and figures stay as they were (a returned figure still displays inline in Jupyter)."""

    @staticmethod
    def figure(**kwargs: Any) -> Figure:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)  # its own raster canvas: text extents for label placement, PNG output
        return fig

    @classmethod
    def subplots(cls, nrows: int = 1, ncols: int = 1, *, figsize=None, layout=None, **kwargs: Any):
        fig = cls.figure(figsize=figsize, layout=layout)
        return fig, fig.subplots(nrows, ncols, **kwargs)

    @staticmethod
    def rc_context(rc: dict[str, Any]):
        import matplotlib

        return matplotlib.rc_context(rc)

    @staticmethod
    def get_cmap(name: str):
        import matplotlib

        return matplotlib.colormaps[name]


def _pyplot() -> _Figures:
    return _Figures()


def _styled(fn):
    """Run a figure function under the report's font sizes (:data:`_STYLE`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _pyplot().rc_context(_STYLE):
            return fn(*args, **kwargs)

    return wrapper


def stage_of(name: str) -> str:
    """The stage an op belongs to, from its module path: the first component, with the index after it
    when that is a number (``blocks.3.0.conv_pw`` -> ``blocks.3``, ``stages.1.blocks.0`` -> ``stages.1``,
    ``layer2.0.conv1`` -> ``layer2``, ``conv_stem`` -> ``conv_stem``)."""
    parts = name.split("#")[0].split(".")
    if parts[0][-1:].isdigit() or len(parts) == 1 or not parts[1].isdigit():
        return parts[0]
    return f"{parts[0]}.{parts[1]}"


def _kind_legend(ax, kinds: list[str], extra: Sequence = (), **kwargs) -> None:
    """A legend of op-kind colour patches (then any ``extra`` handles)."""
    from matplotlib.patches import Patch

    kwargs.setdefault("fontsize", 9)
    ax.legend(
        handles=[Patch(color=kind_colour(k), label=k) for k in kinds] + list(extra),
        **kwargs,
    )


def _short(name: str, width: int = 30) -> str:
    """``name`` cut in the middle to at most ``width`` characters."""
    if len(name) <= width:
        return name
    head = (width - 1) // 3
    return name[:head] + "…" + name[-(width - 1 - head) :]


def _target_text(target: str, output: str) -> str:
    if target == "pred":
        return f"the predicted class's {output}"
    if target.isdigit():
        return f"class {target}'s {output}"
    return f"target '{target}' of the {output}"


def _place_labels(ax, points, labels, *, fontsize: float = 9, obstacles=None, **text_kw) -> list:
    """Annotate each point (data coordinates) with its label, offset so that no two labels overlap,
    no label covers a point (``obstacles``, default ``points``) and every label stays inside the axes:
    positions on rings of growing radius are tried in turn, with a leader line from 14 pt on. The
    figure is drawn first, so that its layout is final; the labels take no part in the layout."""
    import numpy as np
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    engine = fig.get_layout_engine()
    if engine is not None:  # keep the layout just computed: the labels are placed for it
        fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    r = 4.5 * fig.dpi / 72
    obstacles = points if obstacles is None else obstacles
    taken = [
        Bbox.from_bounds(x - r, y - r, 2 * r, 2 * r)
        for x, y in ax.transData.transform(np.asarray(obstacles, float).reshape(-1, 2))
    ]
    frame = ax.get_window_extent(renderer)
    angles = np.deg2rad([45, 135, -45, -135, 0, 180, 90, -90, 25, 155, -25, -155, 65, 115, -65, -115])

    def make(text, xy, dx, dy, arrow):
        ha = "left" if dx > 0.5 else "right" if dx < -0.5 else "center"
        va = "bottom" if dy > 0.5 else "top" if dy < -0.5 else "center"
        props = (
            {"arrowstyle": "-", "color": "#666666", "lw": 0.6, "shrinkA": 1, "shrinkB": 3} if arrow else None
        )
        ann = ax.annotate(
            text,
            xy,
            xytext=(dx, dy),
            textcoords="offset points",
            ha=ha,
            va=va,
            fontsize=fontsize,
            arrowprops=props,
            **text_kw,
        )
        ann.set_in_layout(False)
        return ann

    out = []
    for xy, text in zip(points, labels, strict=True):
        chosen = None
        for radius in (5, 9, 14, 20, 27, 35, 45, 56):
            for a in angles:
                dx, dy = radius * np.cos(a), radius * np.sin(a)
                ann = make(text, xy, dx, dy, arrow=False)
                box = ann.get_window_extent(renderer).expanded(1.08, 1.12)
                ann.remove()
                inside = (
                    box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
                )
                if inside and not any(box.overlaps(t) for t in taken):
                    chosen = (box, radius, dx, dy)
                    break
            if chosen:
                break
        if chosen is None:  # crowded: up and to the right, with a leader line
            ann = make(text, xy, 12.0, 12.0, arrow=True)
            box = ann.get_window_extent(renderer)
        else:
            box, radius, dx, dy = chosen
            ann = make(text, xy, dx, dy, arrow=radius >= 14)
        taken.append(box)
        out.append(ann)
    return out


def _listing_box(ax, title: str, lines: list[str], *, x: float = 0.0, y: float = 1.0) -> None:
    """A monospace listing (numbered ops) in an axes of its own (axis off)."""
    ax.axis("off")
    ax.text(
        x,
        y,
        title + "\n" + "\n".join(lines),
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=9,
        family="monospace",
        bbox={"facecolor": "white", "edgecolor": "#cccccc"},
    )


@_styled
def plot_layer_attribution(
    decomposition: Decomposition | dict[str, Decomposition],
    path: str | Path | None = None,
    *,
    log: bool = False,
    min_share: float = 1e-9,
    top: int = 5,
) -> Figure:
    """Layer attribution of the Lie derivative (the paper's Fig. 1, for one model).

    One row per transform (a dict ``{transform: Decomposition}``, or one Decomposition): each op's
    share of the attribution (``sum_images |c_i| / sum_ops sum_images |c|``, in %) in call order,
    coloured by kind, stage boundaries dotted and named on top, the ``top`` largest numbered and listed
    next to the row ("top k of N ops"), the cumulative share as a line (right axis). The ops are the same
    in every row: those whose share reaches ``min_share`` in some transform (layout ops, eval
    BatchNorm, per-position linear maps are zero by construction and left out). ``log=True`` puts the
    bars on a log scale. Last panel: shares by op kind (kinds with 0.1% or more in some transform),
    one bar per transform.
    """
    import numpy as np
    from matplotlib.lines import Line2D

    plt = _pyplot()
    decs = decomposition if isinstance(decomposition, dict) else {decomposition.transform: decomposition}
    first = next(iter(decs.values()))
    n_ops = first.num_ops
    shares = {t: d.shares().numpy() for t, d in decs.items()}
    most = np.max(np.stack(list(shares.values())), 0)
    keep = np.flatnonzero(most >= min_share)
    kinds = [first.kinds[i] for i in keep]
    rows = len(decs)
    fig = plt.figure(figsize=(FIGURE_WIDTH, 2.3 * rows + 4.0), layout="constrained")
    outer = fig.add_gridspec(2, 1, height_ratios=[2.3 * rows + 0.9, 2.5])
    grid = outer[0].subgridspec(rows, 2, width_ratios=[3.1, 1.0])
    x = np.arange(len(keep))
    stages = [stage_of(first.names[i]) for i in keep]
    starts = [j for j in range(len(stages)) if j == 0 or stages[j] != stages[j - 1]]
    bar_axes = []
    for r, (name, d) in enumerate(decs.items()):
        ax = fig.add_subplot(grid[r, 0], sharex=bar_axes[0] if bar_axes else None)
        bar_axes.append(ax)
        sh = 100 * shares[name][keep]
        ax.bar(x, sh, 0.85, color=[kind_colour(k) for k in kinds])
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, max(sh.max(initial=0) * 1.18, 1e-9))
        ax.set_xlim(-0.8, max(len(keep), 1) - 0.2)
        ax.set_ylabel("share (%)")
        for j in starts[1:]:
            ax.axvline(j - 0.5, color="#999999", lw=0.7, ls=":")
        ranked = np.argsort(-sh, kind="stable")[:top]
        for rank, j in enumerate(ranked, start=1):
            ax.annotate(
                str(rank),
                (j, sh[j]),
                textcoords="offset points",
                xytext=(0, 1.5),
                ha="center",
                va="bottom",
                fontsize=9,
                fontweight="bold",
            )
        twin = ax.twinx()
        twin.plot(x, np.cumsum(sh), color="black", lw=1.3)
        twin.set_ylim(0, 104)
        twin.set_ylabel("cumulative (%)")
        ax.set_title(
            f"({chr(97 + r)}) {name.replace('_', ' ')}: completeness error {d.completeness_error:.1e}",
            loc="left",
        )
        if r < rows - 1:
            ax.tick_params(labelbottom=False)
        listing = [
            f"{rank:>2} {_short(first.names[keep[j]], 24):<24} {sh[j]:5.1f}%"
            for rank, j in enumerate(ranked, start=1)
        ]
        side = fig.add_subplot(grid[r, 1])
        _listing_box(side, f"top {len(ranked)} of {n_ops} ops:", listing, y=1.0)
    bar_axes[-1].set_xlabel(
        f"ops in call order: the {len(keep)} of {n_ops} ops with a non-zero share (those below "
        f"{min_share:g} in every transform are left out)"
    )
    # stage names on top of the first row, each dropped where it would touch the previous one
    ax = bar_axes[0]
    top_axis = ax.secondary_xaxis("top")
    width_pt = FIGURE_WIDTH * 72 * (3.1 / 4.1) * 0.85  # the bar axes, roughly (layout not run yet)
    gap = 10.0 * (len(keep) + 0.6) / max(width_pt, 1.0)  # 10 pt between labels, in data units
    shown, last = [], -np.inf
    for j in starts:
        if j - last >= gap:
            shown.append(j)
            last = j
    top_axis.set_xticks([j - 0.5 for j in shown], [stages[j] for j in shown], rotation=90, fontsize=8.5)
    top_axis.tick_params(length=3, colors="#555555")
    visible = list(dict.fromkeys(k for k, m in zip(kinds, most[keep], strict=True) if m >= 5e-4))
    line = Line2D([], [], color="black", lw=1.3, label="cumulative share\n(right axis)")
    _kind_legend(side, visible, extra=[line], loc="lower left", ncol=2, frameon=False, title="op kind")
    fig.suptitle(
        f"Where the Lie derivative of {_target_text(first.target, first.output)} comes from, op by op "
        f"({first.values.shape[1]} images)"
    )

    ax = fig.add_subplot(outer[1])
    present = kind_order(k for d in decs.values() for k in d.by_kind())
    all_kinds = [
        k for k in present if any(d.by_kind().get(k, {}).get("share", 0) >= 1e-3 for d in decs.values())
    ]
    width = 0.8 / len(decs)
    xk = np.arange(len(all_kinds))
    hatches = ["", "//", "..", "xx", "\\\\", "oo"]
    peak = 0.0
    for i, (name, d) in enumerate(decs.items()):
        by = d.by_kind()
        vals = [100 * by.get(k, {}).get("share", 0.0) for k in all_kinds]
        peak = max([peak, *vals])
        pos = xk + (i - (len(decs) - 1) / 2) * width
        ax.bar(
            pos,
            vals,
            width,
            color=[kind_colour(k) for k in all_kinds],
            hatch=hatches[i % len(hatches)],
            edgecolor="white",
            label=name.replace("_", " "),
        )
        for p, v in zip(pos, vals, strict=True):
            ax.text(p, v, f"{v:.0f}" if v >= 9.5 else f"{v:.1f}", ha="center", va="bottom", fontsize=8.5)
    ax.set_xticks(xk, all_kinds)
    ax.set_ylabel("share (%)")
    ax.set_ylim(0, max(peak, 1.0) * 1.18)
    ax.set_title(
        f"({chr(97 + rows)}) Shares by op kind, one bar per transform (kinds with 0.1% or more)", loc="left"
    )
    if len(decs) > 1:
        leg = ax.legend(title="transform (hatch)", loc="upper right")
        for h in leg.legend_handles:
            h.set_facecolor("#bbbbbb")
    fig.supxlabel(_SHARE_NOTE + ".", fontsize=9, color="#444444")
    save_figure(fig, path)
    return fig


@_styled
def plot_transforms(metrics: EquivarianceMetrics, path: str | Path | None = None) -> Figure:
    """End-to-end Lie derivative per transform: mean over images with its 95% interval (log scale)."""
    import numpy as np

    plt = _pyplot()
    iv = metrics.interval()
    names = list(iv)
    mean = np.array([iv[n][0] for n in names])
    lo = np.array([iv[n][1] for n in names])
    hi = np.array([iv[n][2] for n in names])
    positive = mean[mean > 0]
    bottom = positive.min() / 4 if len(positive) else 1e-12
    below = ~(lo > bottom)  # an interval reaching 0 or below (few images) ends at the axis: marked
    err = np.nan_to_num(np.vstack([mean - np.where(below, bottom, lo), hi - mean]))
    err = np.clip(err, 0, None)
    fig, ax = plt.subplots(
        figsize=(min(FIGURE_WIDTH, max(6.0, 0.75 * len(names) + 2)), 4.4), layout="constrained"
    )
    ax.bar(np.arange(len(names)), mean, 0.7, yerr=err, capsize=3, color="#4c72b0")
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom)
    if below.any():
        ax.plot(
            np.flatnonzero(below),
            np.full(below.sum(), bottom * 1.08),
            "v",
            color="black",
            ms=6,
            label="95% interval reaches below the axis (to 0 or less)",
        )
        ax.legend(loc="upper right")
    ax.set_xticks(np.arange(len(names)), [n.replace("_", " ") for n in names], rotation=30, ha="right")
    ax.set_ylabel("mean over classes of |L_X softmax|\n(mean over images, 95% interval)")
    ax.set_title(
        f"End-to-end equivariance error per transform ({metrics.num_images} images, "
        f"{metrics.generator} generator); lower = more equivariant"
    )
    save_figure(fig, path)
    return fig


@_styled
def plot_lie_distribution(metrics: EquivarianceMetrics, path: str | Path | None = None) -> Figure:
    """Per-image end-to-end Lie derivative per transform: one point per image (jittered) over a box
    of its quartiles and median, log scale; whether a mean is carried by all images or by a few."""
    import numpy as np

    plt = _pyplot()
    values = metrics.values.double().numpy()
    names = list(metrics.transforms)
    fig, ax = plt.subplots(
        figsize=(min(FIGURE_WIDTH, max(6.0, 0.75 * len(names) + 2)), 4.4), layout="constrained"
    )
    positive = values[np.isfinite(values) & (values > 0)]
    floor = positive.min() / 4 if positive.size else 1e-12
    shown = np.where(np.isfinite(values) & (values > 0), values, floor)
    ax.boxplot(
        [shown[:, j] for j in range(len(names))],
        positions=np.arange(len(names)),
        widths=0.6,
        showfliers=False,
        medianprops={"color": "#c44e52"},
    )
    rng = np.random.default_rng(0)
    for j in range(len(names)):
        jitter = rng.uniform(-0.18, 0.18, shown.shape[0])
        ax.plot(j + jitter, shown[:, j], "o", color="#4c72b0", ms=4, alpha=0.7)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)), [n.replace("_", " ") for n in names], rotation=30, ha="right")
    ax.set_ylabel("mean over classes of |L_X softmax|\n(one point per image)")
    ax.set_title(
        f"Per-image equivariance error per transform ({metrics.num_images} images, "
        f"{metrics.generator} generator)"
    )
    save_figure(fig, path)
    return fig


def _of_ops(count: int, num_ops: int | None, fallback: int) -> str:
    return f"{count} of {num_ops if num_ops is not None else fallback} ops"


@_styled
def plot_spectral(
    spectrum: Spectrum,
    path: str | Path | None = None,
    *,
    max_rows: int = 60,
    num_ops: int | None = None,
    top: int = 5,
) -> Figure:
    """(a) Alias energy along depth: for pointwise ops the alias ratio (energy their output puts above
    the native band when evaluated at ``upsample`` x the resolution), for grid-shrinking ops the stride
    alias (energy above the output Nyquist that folds back), coloured by kind, log scale; the ``top``
    largest numbered and listed.
    (b) Radial power spectra of the outputs of the measured ops (rows: depth; columns: |k| / Nyquist;
    colour: log10 fraction of the op's power per ring; at most ``max_rows`` rows, evenly spaced; white:
    rings the op's grid has no frequencies in). ``num_ops``: the op count to quote (that of the layer
    attribution, which also lists the output head; default the spectrum's)."""
    import numpy as np

    plt = _pyplot()
    alias = spectrum.alias().numpy()
    # eval BatchNorm and other per-pixel affine ops measure ~1e-14 (rounding): not aliasing
    idx = np.flatnonzero(~np.isnan(alias) & (alias > 1e-9))
    centres, prof = spectrum.radial_spectra()
    rows = idx if len(idx) else np.flatnonzero(~np.isnan(prof.numpy()).all(1))
    if len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(int)]
    h_spec = max(3.0, 0.165 * len(rows) + 1.2)
    fig = plt.figure(figsize=(FIGURE_WIDTH, 4.3 + h_spec + 0.4), layout="constrained")
    gs = fig.add_gridspec(2, 2, width_ratios=[3.1, 1.0], height_ratios=[4.3, h_spec])
    ax = fig.add_subplot(gs[0, 0])
    kinds = [spectrum.kinds[i] for i in idx]
    pointwise = np.isnan(spectrum.stride_alias.numpy()[idx])
    for flag, marker in ((True, "o"), (False, "s")):
        sel = np.flatnonzero(pointwise == flag)
        if len(sel):
            ax.scatter(
                sel,
                alias[idx[sel]],
                c=[kind_colour(kinds[j]) for j in sel],
                marker=marker,
                s=34,
                edgecolors="black",
                linewidths=0.3,
            )
    if len(idx):
        ax.set_yscale("log")
        ax.set_ylim(alias[idx].min() / 1.6, alias[idx].max() * 2.2)
        ax.set_xlim(-1, len(idx))
    ax.set_xlabel(
        f"ops in call order: the {_of_ops(len(idx), num_ops, len(spectrum.names))} that can alias (measured)"
    )
    ax.set_ylabel("alias energy / total energy")
    ax.set_title(
        f"(a) Alias energy per op along depth (circles: pointwise ops at {spectrum.upsample}x; "
        "squares: stride alias)",
        loc="left",
    )
    ax.grid(axis="y", alpha=0.3)
    side = fig.add_subplot(gs[0, 1])
    ranked = np.argsort(-alias[idx], kind="stable")[:top]
    listing = [
        f"{rank} {_short(spectrum.names[idx[j]], 22):<22} {alias[idx[j]]:.1e}"
        for rank, j in enumerate(ranked, start=1)
    ]
    _listing_box(side, f"most alias energy (top {len(ranked)}):", listing, y=1.0)
    _kind_legend(
        side,
        list(dict.fromkeys(kinds)),
        loc="upper left",
        bbox_to_anchor=(0.0, 0.5),
        title="op kind",
        frameon=False,
    )

    ax2 = fig.add_subplot(gs[1, :])
    c = centres.numpy()
    data = np.full((max(len(rows), 1), len(c)), np.nan)
    for r, i in enumerate(rows):
        p = prof.numpy()[i]
        ok = np.flatnonzero(~np.isnan(p))
        if len(ok):  # a small grid has frequencies in few rings: interpolate between them for display
            span = slice(ok[0], ok[-1] + 1)
            data[r, span] = np.interp(c[span], c[ok], np.log10(p[ok]))
    im = ax2.imshow(
        data,
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        extent=(0, c[-1] + (c[1] - c[0]) / 2, len(rows) - 0.5, -0.5),
    )
    ax2.axvline(1.0, color="white", lw=0.8, ls="--")
    ax2.text(1.01, -0.5, "Nyquist", color="white", fontsize=9, va="top")
    ax2.set_yticks(np.arange(len(rows)), [_short(spectrum.names[i], 28) for i in rows], fontsize=8.5)
    ax2.set_xlabel("spatial frequency |k| / Nyquist (white: no such frequency on the op's grid)")
    ax2.set_title("(b) Radial power spectra of the measured ops' outputs", loc="left")
    fig.colorbar(im, ax=ax2, label="log10 fraction of power per ring", fraction=0.03, pad=0.01)
    _place_labels(
        ax,
        [(j, alias[idx[j]]) for j in ranked],
        [str(k) for k in range(1, len(ranked) + 1)],
        obstacles=[(j, alias[i]) for j, i in enumerate(idx)],
        fontweight="bold",
    )
    save_figure(fig, path)
    return fig


@_styled
def plot_convergence(
    spectrum: Spectrum,
    path: str | Path | None = None,
    *,
    num_ops: int | None = None,
    tolerance: float = CONVERGENCE_TOLERANCE,
) -> Figure:
    """Convergence of the alias ratio in the upsampling factor: (a) each pointwise op's alias ratio
    at ``spectrum.upsample`` and at every convergence factor measured (log scale), (b) its relative
    change ``|a_s - a_u| / a_u`` against the factor used, with the tolerance as a dashed line; the
    title carries the verdict of :func:`aliasscope._report.convergence_verdict` (the same as the
    report's)."""
    import numpy as np

    plt = _pyplot()
    base = spectrum.alias_ratio.numpy()
    idx = np.flatnonzero(~np.isnan(base) & (base > 1e-9))
    factors = sorted(spectrum.convergence)
    fig, axes = plt.subplots(1, 2, figsize=(FIGURE_WIDTH, 5.0), layout="constrained")
    ax = axes[0]
    markers = ["^", "s", "D", "v", "P"]
    ax.plot(np.arange(len(idx)), base[idx], "o", color="black", ms=5, label=f"s = {spectrum.upsample} (used)")
    for m, f in zip(markers, factors, strict=False):
        a = spectrum.convergence[f][0].numpy()[idx]
        ax.plot(np.arange(len(idx)), a, m, mfc="none", ms=6, label=f"s = {f}")
    if len(idx):
        ax.set_yscale("log")
    ax.set_xlabel(f"pointwise ops in call order ({_of_ops(len(idx), num_ops, len(spectrum.names))})")
    ax.set_ylabel("alias ratio")
    ax.set_title("(a) Alias ratio at each upsampling factor s", loc="left")
    ax.legend(loc="best")
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1]
    width = 0.8 / max(len(factors), 1)
    worst = None
    for i, f in enumerate(factors):
        a = spectrum.convergence[f][0].numpy()[idx]
        rel = 100 * np.abs(a - base[idx]) / base[idx]
        pos = np.arange(len(idx)) + (i - (len(factors) - 1) / 2) * width
        ax.bar(pos, rel, width, label=f"s = {f} vs {spectrum.upsample}")
        if len(rel) and np.isfinite(rel).any():
            j = int(np.nanargmax(rel))
            if worst is None or rel[j] > worst[0]:
                worst = (rel[j], pos[j], spectrum.names[idx[j]])
    peak = max(100 * tolerance, worst[0] if worst else 0.0)
    ax.set_ylim(0, peak * 1.45)
    ax.axhline(100 * tolerance, color="#b22222", ls="--", lw=1)
    ax.text(
        0.99,
        100 * tolerance,
        f"{100 * tolerance:.0f}% tolerance ",
        color="#b22222",
        fontsize=9,
        ha="right",
        va="bottom",
        transform=ax.get_yaxis_transform(),
    )
    ax.set_xlabel("pointwise ops in call order")
    ax.set_ylabel("relative change of the alias ratio (%)")
    ax.set_title("(b) Relative change against the factor used", loc="left")
    if factors:
        ax.legend(loc="upper left")
    ok, verdict = convergence_verdict(spectrum.convergence_summary(), tolerance)
    fig.suptitle(
        "\n".join(
            textwrap.wrap(
                f"Spectral convergence: {verdict}".replace("= ", "=\u00a0").replace("< ", "<\u00a0"), 125
            )
        ),
        color={True: "#2a7d2a", False: "#b22222", None: "black"}[ok],
    )
    if worst is not None:  # above the tolerance line and the bars, with a leader to the bar
        ax.annotate(
            f"largest: {_short(worst[2], 26)} ({worst[0]:.2f}%)",
            (worst[1], worst[0]),
            xytext=(0.5, 0.93),
            textcoords="axes fraction",
            ha="center",
            va="top",
            fontsize=9,
            arrowprops={"arrowstyle": "-", "color": "#666666", "lw": 0.6, "shrinkB": 2},
        )
    save_figure(fig, path)
    return fig


@_styled
def plot_alias_vs_attribution(
    rows: list[dict],
    path: str | Path | None = None,
    *,
    rho: float | None = None,
    p_value: float | None = None,
    num_ops: int | None = None,
    transforms: Sequence[str] | None = None,
    top_share: int = 6,
    top_alias: int = 3,
) -> Figure:
    """One point per op: alias energy (``alias``) vs its share of the Lie derivative (``lie_share``,
    in %), log-log, coloured by kind; rows as in ``spectral.csv`` of ``aliasscope diagnose``. The
    ``top_share`` ops with the largest share and the ``top_alias`` with the most alias energy are
    numbered (placed so that no two labels overlap) and listed at the side. The title gives the
    Spearman rank correlation and the op count (``num_ops``: that of the layer attribution)."""
    import numpy as np

    plt = _pyplot()
    pts = [r for r in rows if r.get("alias") == r.get("alias") and r.get("lie_share") == r.get("lie_share")]
    pts = [r for r in pts if r["alias"] is not None and r["alias"] > 1e-9 and r["lie_share"] > 0]
    fig, (ax, side) = plt.subplots(
        1, 2, figsize=(FIGURE_WIDTH, 5.8), gridspec_kw={"width_ratios": [2.1, 1.0]}, layout="constrained"
    )
    kinds = list(dict.fromkeys(r["kind"] for r in pts))
    xy = [(100 * r["lie_share"], r["alias"]) for r in pts]
    ax.scatter(
        [p[0] for p in xy],
        [p[1] for p in xy],
        c=[kind_colour(r["kind"]) for r in pts],
        s=36,
        edgecolors="black",
        linewidths=0.3,
    )
    if pts:
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs, ys = np.array([p[0] for p in xy]), np.array([p[1] for p in xy])
        ax.set_xlim(xs.min() / 1.8, xs.max() * 2.2)
        ax.set_ylim(ys.min() / 1.8, ys.max() * 2.2)
    over = ", ".join(t.replace("_", " ") for t in transforms) if transforms else "the layer transforms"
    ax.set_xlabel(f"share of the Lie derivative (%), mean over {over}")
    ax.set_ylabel("alias energy / total energy")
    rho_text = "n/a" if rho is None or not np.isfinite(rho) else f"{rho:.2f}"
    p_text = "" if p_value is None or not np.isfinite(p_value) else f", p = {p_value:.2g}"
    ax.set_title(
        f"Alias energy vs attribution ({_of_ops(len(pts), num_ops, len(rows))} can alias): "
        f"Spearman rho = {rho_text}{p_text}",
        loc="left",
    )
    ax.grid(alpha=0.3)
    by_share = sorted(range(len(pts)), key=lambda i: -pts[i]["lie_share"])[:top_share]
    by_alias = [i for i in sorted(range(len(pts)), key=lambda i: -pts[i]["alias"]) if i not in by_share]
    chosen = sorted(by_share + by_alias[:top_alias], key=lambda i: -pts[i]["lie_share"])
    listing = [
        f"{k:>2} {_short(pts[i]['name'], 22):<22} {100 * pts[i]['lie_share']:5.1f}% {pts[i]['alias']:.1e}"
        for k, i in enumerate(chosen, start=1)
    ]
    head = f"top {len(by_share)} by share, {min(top_alias, len(by_alias))} more by alias:"
    _listing_box(side, f"{head}\n{'':>2} {'op':<22} {'share':>6} alias", listing, y=1.0)
    _kind_legend(side, kinds, loc="upper left", bbox_to_anchor=(0.0, 0.45), title="op kind", frameon=False)
    _place_labels(
        ax,
        [xy[i] for i in chosen],
        [str(k) for k in range(1, len(chosen) + 1)],
        obstacles=xy,
        fontweight="bold",
    )
    save_figure(fig, path)
    return fig


@_styled
def plot_where(
    images: torch.Tensor,
    decomposition: Decomposition,
    path: str | Path | None = None,
    *,
    ops: list[str] | None = None,
    reference: Decomposition | None = None,
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
    top: int = 3,
    titles: list[str] | None = None,
) -> Figure:
    """Where in the image the Lie derivative comes from: for each image (row), the photo and the
    contribution maps (``decomposition`` with ``keep_maps=True``, of these images) of the ``top`` ops
    with the largest share (or ``ops``), summed over channels, upsampled (bilinear) to the input and
    overlaid on the photo. Red and blue are positive and negative contributions; each map has its own
    symmetric colour scale (clipped at the 99.5th percentile of its magnitude, so that a few extreme
    pixels do not hide the rest) and its own colour bar; each panel gives the op's exact contribution
    ``c`` on that image.

    ``reference``: the decomposition the ranking comes from (the layer attribution over all images;
    same ops): ops are ranked, and shares quoted, from it, so that the figure agrees with the
    attribution figure; without it, from ``decomposition`` (over these images only). Ops with no single
    image grid (pooled vectors) are skipped."""
    import torch
    import torch.nn.functional as F

    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    ranking = reference if reference is not None else decomposition
    if reference is not None and reference.names != decomposition.names:
        raise ValueError("reference must decompose the same model (the same ops) as decomposition")
    shares = ranking.shares()
    order = torch.argsort(shares, descending=True, stable=True).tolist()
    rank_of = {ranking.names[i]: r for r, i in enumerate(order, start=1)}
    if ops is None:
        ops = []
        for i in order:
            name = decomposition.names[i]
            try:
                decomposition.spatial_map(name)
            except (KeyError, ValueError):
                continue
            ops.append(name)
            if len(ops) == top:
                break
    n = images.shape[0]
    share_of = dict(zip(ranking.names, shares.tolist(), strict=True))
    fig, axes = plt.subplots(
        n, len(ops) + 1, figsize=(FIGURE_WIDTH, 2.9 * n + 1.3), squeeze=False, layout="constrained"
    )
    photos = (
        images.detach().cpu().double() * torch.tensor(std).view(1, -1, 1, 1).double()
        + torch.tensor(mean).view(1, -1, 1, 1).double()
    ).clamp(0, 1)
    h, w = images.shape[-2:]
    maps = {name: decomposition.spatial_map(name).detach().cpu().double() for name in ops}
    compact = FuncFormatter(lambda v, _: f"{v:.2g}")
    for r in range(n):
        photo = photos[r].permute(1, 2, 0).numpy()
        axes[r, 0].imshow(photo)
        axes[r, 0].set_title(_short(titles[r], 28) if titles else f"image {r}", fontsize=9.5)
        for c, name in enumerate(ops, start=1):
            m = F.interpolate(maps[name][r][None, None], size=(h, w), mode="bilinear", align_corners=False)[
                0, 0
            ]
            lim = float(torch.quantile(m.abs().flatten(), 0.995)) or float(m.abs().max()) or 1.0
            ax = axes[r, c]
            ax.imshow(photo.mean(-1), cmap="gray", vmin=0, vmax=1)
            im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.75)
            value = decomposition.values[decomposition.names.index(name), r].item()
            head = (
                f"rank {rank_of[name]}: {_short(name, 24)}\n{100 * share_of[name]:.1f}% share\n"
                if r == 0
                else ""
            )
            ax.set_title(f"{head}c = {value:+.2e} here", fontsize=9)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, format=compact)
            cb.ax.tick_params(labelsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    total = ranking.values.shape[1]
    where = (
        f"ranked by share over all {total} images, as in the layer attribution"
        if reference is not None
        else f"ranked, and shares, over these {n} images only"
    )
    shown = f"the {n} images shown"
    if reference is not None and total >= n:
        ref = reference.values[:, :n].double()
        tol = 1e-4 * float(ref.abs().max()) + 1e-12
        if torch.allclose(decomposition.values.double(), ref, rtol=1e-3, atol=tol):
            shown = f"the first {n} of the {total} images"
    fig.suptitle(
        f"Where in the image: {decomposition.transform.replace('_', ' ')}, "
        f"{_target_text(decomposition.target, decomposition.output)}\n"
        f"maps for {shown}; top {len(ops)} of {ranking.num_ops} ops ({where}); each map on its own "
        "scale (its colour bar)",
        fontsize=11,
    )
    save_figure(fig, path, dpi=100)  # photo panels near their native 224 px: more dpi adds only bytes
    return fig


def plot_comparison(result: Comparison, path: str | Path | None = None) -> Figure:
    """Before/after figure: (a) end-to-end Lie derivative per transform with 95% intervals (log scale),
    (b) accuracy and consistency, (c) share of the Lie derivative by op kind, per model."""
    import numpy as np

    plt = _pyplot()
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
    kinds = kind_order(k for n in names for k in result.by_kind.get(n, {}))
    bottom = np.zeros(len(names))
    for kind in kinds:
        shares = np.array([100 * result.by_kind.get(n, {}).get(kind, {}).get("share", 0.0) for n in names])
        if not shares.any():
            continue
        ax.bar(np.arange(len(names)), shares, 0.6, bottom=bottom, color=kind_colour(kind), label=kind)
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
