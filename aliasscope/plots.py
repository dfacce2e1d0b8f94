"""Figures (matplotlib, Agg backend): one palette of op kinds shared by every figure.

Every function takes result objects (views of data computed elsewhere), returns the matplotlib Figure
and, given ``path``, writes ``path.png`` and ``path.svg``:

- :func:`plot_layer_attribution`: per-op contributions along depth, cumulative share, shares by kind;
- :func:`plot_transforms`: end-to-end Lie derivative per transform with 95% intervals;
- :func:`plot_spectral`: alias energy along depth and radial spectra (depth x frequency);
- :func:`plot_alias_vs_attribution`: alias energy vs Lie-derivative share, one point per op;
- :func:`plot_where`: where in the image the top ops' contributions sit, over the photos;
- :func:`plot_comparison`: before/after of :func:`aliasscope.compare.compare`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from .compare import Comparison
    from .decompose import Decomposition
    from .lie import EquivarianceMetrics
    from .spectral import Spectrum

__all__ = [
    "KIND_COLOURS",
    "plot_alias_vs_attribution",
    "plot_comparison",
    "plot_layer_attribution",
    "plot_spectral",
    "plot_transforms",
    "plot_where",
    "save_figure",
    "stage_of",
]

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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


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

    ax.legend(
        handles=[Patch(color=KIND_COLOURS.get(k, "#333333"), label=k) for k in kinds] + list(extra),
        fontsize=8,
        **kwargs,
    )


def plot_layer_attribution(
    decomposition: Decomposition | dict[str, Decomposition],
    path: str | Path | None = None,
    *,
    log: bool = False,
    min_share: float = 1e-9,
) -> Figure:
    """Layer attribution of the Lie derivative (the paper's Fig. 1, for one model).

    (a) Each op's share of the attribution (``sum_images |c_i|`` over all ops and images) in call
    order, coloured by kind, with stage boundaries; ops whose share is below ``min_share`` (layout ops,
    eval BatchNorm, residual adds: zero by construction) are left out of the axis. The line (right
    axis) is the cumulative share along depth. ``log=True`` puts the bars on a log scale.
    (b) Shares by kind, one bar per transform when a dict ``{transform: Decomposition}`` is given (the
    first drives panel (a)).
    """
    import numpy as np

    plt = _pyplot()
    decs = decomposition if isinstance(decomposition, dict) else {decomposition.transform: decomposition}
    first_name, first = next(iter(decs.items()))
    shares = first.shares().numpy()
    keep = np.flatnonzero(shares >= min_share)
    fig, axes = plt.subplots(1, 2, figsize=(17, 5.6), gridspec_kw={"width_ratios": [3.2, 1.0]})
    ax = axes[0]
    x = np.arange(len(keep))
    kinds = [first.kinds[i] for i in keep]
    ax.bar(x, 100 * shares[keep], 0.85, color=[KIND_COLOURS.get(k, "#333333") for k in kinds])
    if log:
        ax.set_yscale("log")
    ax.set_xlim(-0.8, max(len(keep), 1) - 0.2)
    ax.set_ylabel("share of the Lie derivative (%)")
    ax.set_xlabel(
        f"ops in call order ({len(keep)} with a non-zero share of {first.num_ops} recorded; "
        "numbered: the 5 largest)"
    )
    stages = [stage_of(first.names[i]) for i in keep]
    starts = [j for j in range(len(stages)) if j == 0 or stages[j] != stages[j - 1]]
    for j in starts[1:]:
        ax.axvline(j - 0.5, color="#999999", lw=0.7, ls=":")
    top_axis = ax.secondary_xaxis("top")
    top_axis.set_xticks([j - 0.5 for j in starts], [stages[j] for j in starts], rotation=90, fontsize=7)
    top_axis.tick_params(length=3, colors="#555555")
    ranked = np.argsort(-shares[keep])[:5]
    for rank, j in enumerate(ranked, start=1):
        ax.annotate(
            str(rank),
            (j, 100 * shares[keep][j]),
            textcoords="offset points",
            xytext=(0, 2),
            ha="center",
            fontsize=8,
            fontweight="bold",
        )
    listing = "\n".join(
        f"{rank}  {first.names[keep[j]]}  {100 * shares[keep][j]:.1f}%"
        for rank, j in enumerate(ranked, start=1)
    )
    ax.text(
        0.74,
        0.55,
        "largest shares:\n" + listing,
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=8,
        family="monospace",
        bbox={"facecolor": "white", "edgecolor": "#cccccc", "alpha": 0.9},
    )
    twin = ax.twinx()
    line = twin.plot(x, 100 * np.cumsum(shares[keep]), color="black", lw=1.4, label="cumulative share")
    twin.set_ylim(0, 102)
    twin.set_ylabel("cumulative share (%)")
    _kind_legend(
        twin, list(dict.fromkeys(kinds)), extra=line, loc="center right", bbox_to_anchor=(0.985, 0.75), ncol=2
    )
    ax.set_title(
        f"(a) Where the Lie derivative of target '{first.target}' under {first_name.replace('_', ' ')} comes "
        f"from ({first.values.shape[1]} images; completeness error {first.completeness_error:.1e})",
        pad=58,
    )

    ax = axes[1]
    all_kinds = [k for k in KIND_COLOURS if any(k in d.kinds for d in decs.values())]
    all_kinds = [
        k for k in all_kinds if any(d.by_kind().get(k, {}).get("share", 0) > min_share for d in decs.values())
    ]
    width = 0.8 / len(decs)
    y = np.arange(len(all_kinds))
    hatches = ["", "//", "..", "xx", "\\\\", "oo"]
    for i, (name, d) in enumerate(decs.items()):
        by = d.by_kind()
        vals = [100 * by.get(k, {}).get("share", 0.0) for k in all_kinds]
        ax.barh(
            y + (i - (len(decs) - 1) / 2) * width,
            vals,
            width,
            color=[KIND_COLOURS.get(k, "#333333") for k in all_kinds],
            hatch=hatches[i % len(hatches)],
            edgecolor="white",
            label=name.replace("_", " "),
        )
    ax.set_yticks(y, all_kinds)
    ax.invert_yaxis()
    ax.set_xlabel("share of the Lie derivative (%)")
    ax.set_title("(b) Shares by op kind (kinds above 0.1%)", pad=58)
    if len(decs) > 1:
        leg = ax.legend(fontsize=8, title="transform (hatch)", title_fontsize=8)
        for h in leg.legend_handles:
            h.set_facecolor("#bbbbbb")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def plot_transforms(metrics: EquivarianceMetrics, path: str | Path | None = None) -> Figure:
    """End-to-end Lie derivative per transform: mean over images with its 95% interval (log scale)."""
    import numpy as np

    plt = _pyplot()
    iv = metrics.interval()
    names = list(iv)
    mean = np.array([iv[n][0] for n in names])
    err = np.nan_to_num(np.vstack([mean - [iv[n][1] for n in names], [iv[n][2] for n in names] - mean]))
    err = np.clip(err, 0, None)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(names) + 2), 4.4))
    ax.bar(np.arange(len(names)), mean, 0.7, yerr=err, capsize=3, color="#4c72b0")
    ax.set_xticks(np.arange(len(names)), [n.replace("_", " ") for n in names], rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("mean over classes of |L_X softmax|\n(mean over images, 95% interval)")
    ax.set_title(
        f"End-to-end equivariance error per transform ({metrics.num_images} images, "
        f"{metrics.generator} generator); lower = more equivariant"
    )
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def _alias_of(spectrum: Spectrum):
    import numpy as np

    a = spectrum.alias_ratio.numpy()
    st = spectrum.stride_alias.numpy()
    return np.where(np.isnan(a), st, a)


def plot_spectral(spectrum: Spectrum, path: str | Path | None = None, *, max_rows: int = 60) -> Figure:
    """(a) Alias energy along depth: for pointwise ops the alias ratio (energy their output puts above
    the native band when evaluated at ``upsample`` x the resolution), for grid-shrinking ops the stride
    alias (energy above the output Nyquist that folds back), coloured by kind, log scale.
    (b) Radial power spectra of the outputs of the measured ops (rows: depth; columns: |k| / Nyquist;
    colour: log10 fraction of the op's power per ring; at most ``max_rows`` rows, evenly spaced)."""
    import numpy as np

    plt = _pyplot()
    alias = _alias_of(spectrum)
    # eval BatchNorm and other per-pixel affine ops measure ~1e-14 (rounding): not aliasing
    idx = np.flatnonzero(~np.isnan(alias) & (alias > 1e-9))
    fig, axes = plt.subplots(1, 2, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1.6, 1.0]})
    ax = axes[0]
    kinds = [spectrum.kinds[i] for i in idx]
    pointwise = np.isnan(spectrum.stride_alias.numpy()[idx])
    for flag, marker in ((True, "o"), (False, "s")):
        sel = np.flatnonzero(pointwise == flag)
        if len(sel):
            ax.scatter(
                sel,
                alias[idx[sel]],
                c=[KIND_COLOURS.get(kinds[j], "#333333") for j in sel],
                marker=marker,
                s=34,
                edgecolors="black",
                linewidths=0.3,
            )
    for j in np.argsort(-alias[idx])[:5]:
        ax.annotate(
            spectrum.names[idx[j]],
            (j, alias[idx[j]]),
            textcoords="offset points",
            xytext=(4, 3),
            fontsize=7,
            rotation=20,
        )
    ax.set_yscale("log")
    ax.set_xlabel(
        f"measured ops in call order ({len(idx)} of {len(spectrum.names)}; labelled: the 5 largest)"
    )
    ax.set_ylabel("alias energy / total energy")
    ax.set_title(
        f"(a) Alias energy per op along depth (circles: pointwise ops at {spectrum.upsample}x; "
        "squares: stride alias)"
    )
    _kind_legend(ax, list(dict.fromkeys(kinds)), loc="lower right")
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1]
    centres, prof = spectrum.radial_spectra()
    rows = idx if len(idx) else np.flatnonzero(~np.isnan(prof.numpy()).all(1))
    if len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(int)]
    c = centres.numpy()
    data = np.full((max(len(rows), 1), len(c)), np.nan)
    for r, i in enumerate(rows):
        p = prof.numpy()[i]
        ok = np.flatnonzero(~np.isnan(p))
        if len(ok):  # a small grid has frequencies in few rings: interpolate between them for display
            span = slice(ok[0], ok[-1] + 1)
            data[r, span] = np.interp(c[span], c[ok], np.log10(p[ok]))
    im = ax.imshow(
        data,
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        extent=(0, c[-1] + (c[1] - c[0]) / 2, len(rows) - 0.5, -0.5),
    )
    ax.axvline(1.0, color="white", lw=0.8, ls="--")
    ax.text(1.01, 0, "Nyquist", color="white", fontsize=7, va="top")
    ax.set_yticks(np.arange(len(rows)), [spectrum.names[i] for i in rows], fontsize=6)
    ax.set_xlabel("spatial frequency |k| / Nyquist")
    ax.set_title("(b) Radial power spectra of the measured ops' outputs")
    fig.colorbar(im, ax=ax, label="log10 fraction of power per ring")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def plot_alias_vs_attribution(
    rows: list[dict],
    path: str | Path | None = None,
    *,
    rho: float | None = None,
    p_value: float | None = None,
) -> Figure:
    """One point per op: alias energy (``alias``) vs its share of the Lie derivative (``lie_share``),
    log-log, coloured by kind; rows as in ``spectral.csv`` of ``aliasscope diagnose``. The title gives
    the Spearman rank correlation."""
    import numpy as np

    plt = _pyplot()
    pts = [r for r in rows if r.get("alias") == r.get("alias") and r.get("lie_share") == r.get("lie_share")]
    pts = [r for r in pts if r["alias"] is not None and r["alias"] > 1e-9 and r["lie_share"] > 0]
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    kinds = list(dict.fromkeys(r["kind"] for r in pts))
    ax.scatter(
        [100 * r["lie_share"] for r in pts],
        [r["alias"] for r in pts],
        c=[KIND_COLOURS.get(r["kind"], "#333333") for r in pts],
        s=36,
        edgecolors="black",
        linewidths=0.3,
    )
    for r in sorted(pts, key=lambda r: -r["lie_share"])[:5]:
        ax.annotate(
            r["name"],
            (100 * r["lie_share"], r["alias"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    if pts:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("share of the Lie derivative (%)")
    ax.set_ylabel("alias energy / total energy")
    rho_text = "n/a" if rho is None or not np.isfinite(rho) else f"{rho:.2f}"
    p_text = "" if p_value is None or not np.isfinite(p_value) else f", p = {p_value:.2g}"
    ax.set_title(f"Alias energy vs attribution ({len(pts)} ops): Spearman rho = {rho_text}{p_text}")
    _kind_legend(ax, kinds, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def plot_where(
    images: torch.Tensor,
    decomposition: Decomposition,
    path: str | Path | None = None,
    *,
    ops: list[str] | None = None,
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
    top: int = 3,
    titles: list[str] | None = None,
) -> Figure:
    """Where in the image the Lie derivative comes from: for each image (row), the photo and the
    contribution maps (``keep_maps=True``) of the ``top`` ops with the largest share (or ``ops``),
    summed over channels, upsampled (bilinear) to the input and overlaid on the photo; red and blue are
    positive and negative contributions, each map on its own symmetric scale (clipped at the 99.5th
    percentile of its magnitude, so that a few extreme pixels do not hide the rest)."""
    import torch
    import torch.nn.functional as F

    plt = _pyplot()
    if ops is None:
        order = torch.argsort(decomposition.shares(), descending=True).tolist()
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
    shares = dict(zip(decomposition.names, decomposition.shares().tolist(), strict=True))
    fig, axes = plt.subplots(n, len(ops) + 1, figsize=(3.1 * (len(ops) + 1), 3.1 * n), squeeze=False)
    photos = (
        images.detach().cpu().double() * torch.tensor(std).view(1, -1, 1, 1).double()
        + torch.tensor(mean).view(1, -1, 1, 1).double()
    ).clamp(0, 1)
    h, w = images.shape[-2:]
    maps = {name: decomposition.spatial_map(name).detach().cpu().double() for name in ops}
    for r in range(n):
        photo = photos[r].permute(1, 2, 0).numpy()
        grey = photo.mean(-1)
        axes[r, 0].imshow(photo)
        axes[r, 0].set_title(titles[r] if titles else f"image {r}", fontsize=9)
        for c, name in enumerate(ops, start=1):
            m = F.interpolate(maps[name][r][None, None], size=(h, w), mode="bilinear", align_corners=False)[
                0, 0
            ]
            lim = float(torch.quantile(m.abs().flatten(), 0.995)) or float(m.abs().max()) or 1.0
            ax = axes[r, c]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.75)
            ax.set_title(f"{name}\n{100 * shares[name]:.1f}% of the attribution", fontsize=8)
            if r == n - 1:
                fig.colorbar(
                    im,
                    ax=ax,
                    orientation="horizontal",
                    fraction=0.05,
                    pad=0.04,
                    label="contribution per pixel",
                )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"Where in the image the Lie derivative ({decomposition.transform.replace('_', ' ')}, "
        f"{decomposition.target}) comes from: top ops' contribution maps",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path)
    return fig


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
