"""The layer attribution under the paper's generator, the central difference and the band-limited
(Fourier) derivative, and where each op's share sits in its feature map: border columns (padding) and
the columns where the paper's stencil flips between forward and backward differences.

    python analyses/generators.py --out figures/generators [--device cuda] [--num-images 16]

For pretrained tf_efficientnet_lite0 and mobilenetv2_100, translate_x, target = predicted class's
probability: each op's share under ``paper``, ``central`` and ``fourier``, and from its contribution map
(dT/dh * v summed over channels and rows, absolute value per column) the fraction of the op's
attribution mass in the 2 outermost columns on each side (``border``) and in the columns next to a flip of
the paper's stencil at that op's width (``flip``: a column whose one-sided difference points the other
way from a neighbour's, and the columns beside it; computed from the reference code's float32 grid).
Writes generators.csv (per model, generator, op), generators.json and a figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from common import analysis_parser, attribute, begin, each_model
from scipy import stats

from aliasscope._plots import KIND_COLOURS, save_figure
from aliasscope._resampling import paper_coordinates
from aliasscope.results import rows_to_csv
from aliasscope.transforms import get_transform

GENERATORS = ["paper", "central", "fourier"]
MODELS = ["tf_efficientnet_lite0", "mobilenetv2_100"]


def flip_columns(width: int, height: int) -> np.ndarray:
    """Boolean mask of columns next to a flip of the paper's one-sided difference at this grid size:
    the reference code samples at floor(u) of its float32 coordinate u; a column j whose u(0) lands
    just below j gets a backward difference, the others a forward one."""
    u, _ = paper_coordinates(get_transform("translate_x"), torch.zeros(()), height, width, "cpu")
    backward = (u[0].floor() < torch.arange(width, dtype=u.dtype)).numpy()
    flips = np.zeros(width, dtype=bool)
    change = np.flatnonzero(backward[1:] != backward[:-1])  # between column c and c + 1
    for c in change:
        flips[max(c - 1, 0) : min(c + 3, width)] = True
    return flips


def column_profile(dec, name: str) -> np.ndarray | None:
    """|contribution| per column of one op's map (summed over images, channels and rows)."""
    try:
        m = dec.spatial_map(name)
    except (KeyError, ValueError):
        return None
    return m.abs().sum((0, 1)).double().cpu().numpy()


def _weighted(ops: list[dict], key: str) -> float:
    """Sum over the ops with a map of share x ``key`` (a border/flip fraction, or its uniform level)."""
    return float(sum(r["share"] * r[key] for r in ops if r["border"] == r["border"]))


def main() -> None:
    parser = analysis_parser(__doc__, "figures/generators")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--border", type=int, default=2, help="columns on each side counted as border (2)")
    args = parser.parse_args()
    clock, out = begin(args)
    rows, summary = [], {}
    for name, model, x, _, _ in each_model(MODELS, args.images, args.num_images, device=args.device):
        per_gen = {}
        for g in GENERATORS:
            dec = attribute(model, x, ["translate_x"], generator=g, keep_maps=True)["translate_x"]
            shares = dec.shares().numpy()
            for i, op in enumerate(dec.names):
                prof = column_profile(dec, op)
                row = {
                    "model": name,
                    "generator": g,
                    "order": i,
                    "name": op,
                    "kind": dec.kinds[i],
                    "share": float(shares[i]),
                    "border": float("nan"),
                    "flip": float("nan"),
                    "width": None,
                }
                if prof is not None and prof.sum() > 0:
                    w = len(prof)
                    h = dec.spatial_map(op).shape[1]
                    border = np.zeros(w, dtype=bool)
                    border[: args.border] = border[-args.border :] = True
                    flips = flip_columns(w, h) & ~border
                    row.update(
                        border=float(prof[border].sum() / prof.sum()),
                        flip=float(prof[flips].sum() / prof.sum()),
                        width=w,
                        flip_columns=int(flips.sum()),
                        # what a map spread evenly over the columns would put there
                        border_uniform=float(border.mean()),
                        flip_uniform=float(flips.mean()),
                    )
                rows.append(row)
            per_gen[g] = {
                "shares": shares,
                "by_kind": dec.by_kind(),
                "total": float(dec.total.abs().mean()),
                "completeness_error": dec.completeness_error,
            }
            top = int(np.argmax(shares))
            r = next(r for r in rows if r["model"] == name and r["generator"] == g and r["order"] == top)
            clock(
                f"{name} {g}: top op {r['name']} ({r['kind']}) {100 * r['share']:.1f}%, "
                f"border {100 * r['border']:.0f}%, flip {100 * r['flip']:.0f}%"
            )
            del dec
        mine = {g: [r for r in rows if r["model"] == name and r["generator"] == g] for g in per_gen}

        summary[name] = {
            g: {
                "mean_abs_total": v["total"],
                "completeness_error": v["completeness_error"],
                "by_kind": {k: r["share"] for k, r in v["by_kind"].items()},
                "top": [
                    {k: r[k] for k in ("name", "kind", "share", "border", "flip")}
                    for r in sorted(mine[g], key=lambda r: -r["share"])[:5]
                ],
                **{
                    f"share_weighted_{key}": _weighted(mine[g], key)
                    for key in ("border", "border_uniform", "flip", "flip_uniform")
                },
            }
            for g, v in per_gen.items()
        }
        for a, b in (("paper", "central"), ("central", "fourier"), ("paper", "fourier")):
            summary[name][f"spearman_{a}~{b}"] = float(
                stats.spearmanr(per_gen[a]["shares"], per_gen[b]["shares"]).statistic
            )
        del model, x
    rows_to_csv(rows, out / "generators.csv")
    (out / "generators.json").write_text(json.dumps(summary, indent=2))
    for name, s in summary.items():
        for g in GENERATORS:
            print(
                f"{name} {g:8s} |L| {s[g]['mean_abs_total']:.4f}  "
                f"border-weighted {100 * s[g]['share_weighted_border']:.1f}% "
                f"(uniform {100 * s[g]['share_weighted_border_uniform']:.1f}%)  "
                f"flip-weighted {100 * s[g]['share_weighted_flip']:.1f}% "
                f"(uniform {100 * s[g]['share_weighted_flip_uniform']:.1f}%)  kinds "
                + ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(s[g]["by_kind"].items())[:3])
            )
    plot(rows, out / "generators")
    clock(f"wrote {out}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(
        len(models), 2, figsize=(16, 4.6 * len(models)), squeeze=False, gridspec_kw={"width_ratios": [2.2, 1]}
    )
    for m_i, model in enumerate(models):
        ax = axes[m_i, 0]
        sub = {g: [r for r in rows if r["model"] == model and r["generator"] == g] for g in GENERATORS}
        keep = [i for i in range(len(sub["central"])) if max(sub[g][i]["share"] for g in GENERATORS) > 2e-3]
        x = np.arange(len(keep))
        width = 0.28
        for g_i, g in enumerate(GENERATORS):
            vals = [100 * sub[g][i]["share"] for i in keep]
            ax.bar(x + (g_i - 1) * width, vals, width, label=g, color=["#444444", "#4c72b0", "#dd8452"][g_i])
        ax.set_xticks(x, [sub["central"][i]["name"] for i in keep], rotation=90, fontsize=6)
        ax.set_ylabel("share of the Lie derivative (%)")
        ax.set_title(f"{model}: per-op share under each generator (ops above 0.2%)")
        ax.legend(fontsize=8)
        ax = axes[m_i, 1]
        for g_i, g in enumerate(GENERATORS):
            top = sorted(sub[g], key=lambda r: -r["share"])[:8]
            ax.scatter(
                [100 * r["border"] for r in top],
                [100 * r["flip"] for r in top],
                s=[3000 * r["share"] for r in top],
                marker=["o", "s", "^"][g_i],
                alpha=0.6,
                c=[KIND_COLOURS.get(r["kind"], "#333") for r in top],
                edgecolors="black",
                label=g,
            )
        ax.set_xlabel("% of the op's |map| in the border columns")
        ax.set_ylabel("% in columns next to a paper-stencil flip")
        ax.set_title("top 8 ops per generator (size: share; o paper, s central, ^ fourier)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
