"""The sweep's figures, from the merged table (:func:`aliasscope.sweep.merge`).

- :func:`plot_lie_vs_accuracy`: the paper's main figure: one transform's Lie derivative (log scale)
  against ImageNet top-1, one marker per model coloured by architecture type, with the fit's R^2 and
  Spearman's rho and their bootstrap intervals over models;
- :func:`plot_transform_panels`: the same, one panel per transform;
- :func:`plot_shares`: shares by op kind across models, against accuracy and size.

Only pretrained models (``pretrained`` true, ``status`` ok) enter a statistic: the Lie derivative of a
randomly initialised network says nothing about a trained one. Random-init rows are drawn as grey
crosses, only for coverage, and say so in the legend. A model whose decomposition failed a self-check
is left out of :func:`plot_shares` (its shares are not a finding).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .._plots import FIGURE_WIDTH, _pyplot, _styled, save_figure
from ..kinds import kind_colour, kind_order
from .architecture import ARCHITECTURE_TYPES
from .measure import SHARE_PREFIX

__all__ = ["TYPE_COLOURS", "accuracy", "fit_statistics", "plot_lie_vs_accuracy", "plot_shares"]
__all__ += ["plot_transform_panels", "pretrained_rows"]

TYPE_COLOURS = {"CNN": "#4c72b0", "ViT": "#dd8452", "hybrid": "#55a868", "Mixer-MLP": "#8172b3"}


def pretrained_rows(frame: Any) -> Any:
    """The rows a finding may use: measured (status ok) with pretrained weights."""
    ok = frame["status"] == "ok"
    return frame[ok & frame["pretrained"].fillna(False).astype(bool)]


def accuracy(frame: Any) -> tuple[Any, str]:
    """Top-1 per row in [0, 1]: timm's published ImageNet top-1 (``timm_top1``, from
    ``results-imagenet.csv``) where joined, else the top-1 on the sweep's own images; and a label."""
    measured = frame["top1"].astype(float)
    if "timm_top1" in frame:
        published = frame["timm_top1"].astype(float) / 100.0
        if published.notna().any():
            return published.fillna(measured), "ImageNet top-1 (timm results-imagenet.csv; else measured)"
    n = int(frame["num_images"].max()) if "num_images" in frame and len(frame) else 0
    return measured, f"top-1 on the sweep's {n} labelled images"


def fit_statistics(x: np.ndarray, y: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """R^2 of the least-squares line of ``y`` on ``x`` and Spearman's rho, each with a 95% percentile
    bootstrap interval over the points (``resamples`` resamples, seeded); NaN with fewer than 3."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = {"n": int(x.size)}
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out | {k: math.nan for k in ("r2", "r2_low", "r2_high", "rho", "rho_low", "rho_high")}

    def r2(a: np.ndarray, b: np.ndarray) -> float:
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return math.nan
        return float(np.corrcoef(a, b)[0, 1] ** 2)

    def rho(a: np.ndarray, b: np.ndarray) -> float:
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return math.nan
        return float(stats.spearmanr(a, b).statistic)

    rng = np.random.default_rng(seed)
    index = rng.integers(0, x.size, size=(resamples, x.size))
    boot_r2 = np.array([r2(x[i], y[i]) for i in index])
    boot_rho = np.array([rho(x[i], y[i]) for i in index])
    out.update(r2=r2(x, y), rho=rho(x, y))
    out.update(r2_low=float(np.nanpercentile(boot_r2, 2.5)), r2_high=float(np.nanpercentile(boot_r2, 97.5)))
    out.update(
        rho_low=float(np.nanpercentile(boot_rho, 2.5)), rho_high=float(np.nanpercentile(boot_rho, 97.5))
    )
    return out


def _statistics_text(s: dict[str, float]) -> str:
    if not s["n"] or math.isnan(s["r2"]):
        return f"{s['n']} pretrained models: too few for a statistic"
    return (
        f"{s['n']} pretrained models\nR² = {s['r2']:.2f} [{s['r2_low']:.2f}, {s['r2_high']:.2f}]\n"
        f"Spearman ρ = {s['rho']:.2f} [{s['rho_low']:.2f}, {s['rho_high']:.2f}]"
    )


def _scatter(ax: Any, frame: Any, transform: str, legend: bool) -> dict[str, float]:
    column = f"lie_{transform}"
    ok = frame[(frame["status"] == "ok") & frame[column].notna()] if column in frame else frame.iloc[:0]
    acc, label = accuracy(ok) if len(ok) else (None, "top-1")
    trained = ok["pretrained"].fillna(False).astype(bool) if len(ok) else ok
    if len(ok) and (~trained).any():
        ax.scatter(
            acc[~trained], ok.loc[~trained, column], marker="x", color="#aaaaaa", s=18, linewidths=0.8,
            label=f"random init ({int((~trained).sum())}, coverage only)",
        )  # fmt: skip
    for kind in ARCHITECTURE_TYPES:
        rows = trained & (ok["type"] == kind) if len(ok) else trained
        if len(ok) and rows.any():
            low = ok.loc[rows, column] - ok.loc[rows, f"{column}_low"]
            high = ok.loc[rows, f"{column}_high"] - ok.loc[rows, column]
            ax.errorbar(
                acc[rows], ok.loc[rows, column], yerr=[low.clip(lower=0), high.clip(lower=0)], fmt="o",
                ms=5, color=TYPE_COLOURS[kind], ecolor=TYPE_COLOURS[kind], elinewidth=0.6, alpha=0.85,
                label=f"{kind} ({int(rows.sum())})",
            )  # fmt: skip
    stats = fit_statistics(
        acc[trained].to_numpy() if len(ok) else [],
        np.log10(ok.loc[trained, column].to_numpy()) if len(ok) else [],
    )
    if len(ok) and (ok[column] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel(f"Lie derivative, {transform}")
    ax.text(0.02, 0.03, _statistics_text(stats), transform=ax.transAxes, fontsize=8.5, va="bottom",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "#cccccc"})  # fmt: skip
    ax.grid(alpha=0.3)
    if legend and len(ok):
        ax.legend(loc="upper right", fontsize=8.5)
    return stats


@_styled
def plot_lie_vs_accuracy(frame: Any, transform: str = "translate_x", path: str | Path | None = None) -> Any:
    """The paper's main figure for one transform (module docstring); R^2 and rho are of
    log10(Lie derivative) against top-1, over pretrained models only."""
    fig, ax = _pyplot().subplots(figsize=(FIGURE_WIDTH * 0.6, 5.0), layout="constrained")
    _scatter(ax, frame, transform, legend=True)
    ax.set_title(f"More accurate models are more equivariant? ({transform}; bars: 95% intervals over images)")
    save_figure(fig, path)
    return fig


@_styled
def plot_transform_panels(frame: Any, path: str | Path | None = None) -> Any:
    """:func:`plot_lie_vs_accuracy` for every transform in the table, one panel each."""
    transforms = [c[4:] for c in frame.columns if c.startswith("lie_") and not c.endswith(("_low", "_high"))]
    cols = min(5, max(1, len(transforms)))
    rows = math.ceil(len(transforms) / cols) or 1
    fig, axes = _pyplot().subplots(
        rows, cols, figsize=(FIGURE_WIDTH, 2.9 * rows + 0.4), layout="constrained", squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        if i >= len(transforms):
            ax.set_visible(False)
            continue
        _scatter(ax, frame, transforms[i], legend=i == 0)
        ax.set_title(transforms[i])
        if i % cols:
            ax.set_ylabel("")
    fig.suptitle("Lie derivative against top-1, per transform (statistics over pretrained models)")
    save_figure(fig, path)
    return fig


@_styled
def plot_shares(frame: Any, path: str | Path | None = None) -> Any:
    """Shares by op kind across models: per model a stacked bar (models sorted by top-1), and each
    kind's share against top-1 and against parameters. Models whose decomposition passed its
    self-checks only; pretrained ones where there are any, else (coverage only) all."""
    ok = frame[(frame["status"] == "ok")]
    if "checks_passed" in ok:
        ok = ok[ok["checks_passed"].fillna(False).astype(bool)]
    trained = pretrained_rows(ok) if len(ok) else ok
    rows, note = (
        (trained, "pretrained models") if len(trained) else (ok, "random init only: coverage, no finding")
    )
    kinds = kind_order([c[len(SHARE_PREFIX) :] for c in frame.columns if c.startswith(SHARE_PREFIX)])
    kinds = [k for k in kinds if len(rows) and rows[f"{SHARE_PREFIX}{k}"].fillna(0).max() > 0.005]
    fig, axes = _pyplot().subplots(1, 3, figsize=(FIGURE_WIDTH, 4.4), layout="constrained")
    if not len(rows) or not kinds:
        for ax in axes:
            ax.set_axis_off()
        axes[1].text(0.5, 0.5, "no model with a decomposition that passed its checks", ha="center")
        save_figure(fig, path)
        return fig
    acc, label = accuracy(rows)
    order = np.argsort(acc.to_numpy(), kind="stable")
    bottom = np.zeros(len(rows))
    for kind in kinds:
        share = rows[f"{SHARE_PREFIX}{kind}"].fillna(0).to_numpy()[order] * 100
        axes[0].bar(
            np.arange(len(rows)), share, bottom=bottom, color=kind_colour(kind), width=0.9, label=kind
        )
        bottom += share
    axes[0].set_xlabel(f"models, by {label.split(' (')[0]}")
    axes[0].set_ylabel("share of the Lie derivative, %")
    axes[0].set_xticks([])
    axes[0].set_title(f"shares by op kind ({len(rows)} {note})")
    size = rows["params"].astype(float) / 1e6
    for kind in kinds:
        share = rows[f"{SHARE_PREFIX}{kind}"].fillna(0) * 100
        axes[1].scatter(acc, share, s=14, color=kind_colour(kind), label=kind, alpha=0.85)
        axes[2].scatter(size, share, s=14, color=kind_colour(kind), label=kind, alpha=0.85)
    axes[1].set_xlabel(label)
    axes[2].set_xlabel("parameters, millions")
    if size.max() > 10 * size.min():
        axes[2].set_xscale("log")
    for ax in axes[1:]:
        ax.set_ylabel("share, %")
        ax.grid(alpha=0.3)
    axes[1].set_title("each kind's share against top-1")
    axes[2].set_title("... and against size")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=min(6, len(kinds)))
    save_figure(fig, path)
    return fig
