"""Does aliasing explain where the Lie derivative comes from? Per op, alias energy vs share of the
Lie derivative, pooled over pretrained models, as a rank correlation with a bootstrap interval.

    python analyses/alias_vs_lie.py --out figures/alias_vs_lie [--device cuda]

For each pretrained model (lite0/1/2, mobilenetv2_100 when installed): the exact layer attribution of
the predicted class's probability under translate_x (``--layer-images`` images) and, per op, its alias
energy (``aliasscope.spectrum`` at 4x: alias ratio of pointwise ops, stride alias of strided ops, on
``--spectral-images`` images), joined by ``aliasscope.diagnosis.alias_join`` (the join ``aliasscope
diagnose`` reports). Ops whose alias is rounding (< 1e-9: eval BatchNorm) are left out. The
Spearman correlation is reported per model and pooled (ranks within each model, so that models of
different depth are comparable), with a 95% bootstrap interval over ops. Writes alias_vs_lie.csv
(one row per op), alias_vs_lie.json and a scatter figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from common import PRETRAINED, analysis_parser, attribute, begin, each_model
from scipy import stats

from aliasscope import spectral
from aliasscope._plots import save_figure
from aliasscope.diagnosis import alias_join
from aliasscope.results import rows_to_csv


def bootstrap_spearman(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of Spearman's rho, resampling pairs."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(a), len(a))
        r = stats.spearmanr(a[idx], b[idx]).statistic
        if np.isfinite(r):
            vals.append(r)
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def main() -> None:
    parser = analysis_parser(__doc__, "figures/alias_vs_lie")
    parser.add_argument("--layer-images", type=int, default=32)
    parser.add_argument("--spectral-images", type=int, default=8)
    args = parser.parse_args()
    clock, out = begin(args)
    rows, per_model = [], {}
    for name, model, x, _, _ in each_model(PRETRAINED, args.images, args.layer_images, device=args.device):
        dec = attribute(model, x, ["translate_x"])["translate_x"]
        sp = spectral(model, x[: args.spectral_images], upsample=4)
        join = alias_join(sp, {"translate_x": dec})  # the join aliasscope diagnose reports
        mine = [
            {"model": name, **{k: r[k] for k in ("name", "kind", "alias")}, "share": r["lie_share"]}
            for r in join.ranked_rows()
        ]
        a_ = np.array([r["alias"] for r in mine])
        s_ = np.array([r["share"] for r in mine])
        lo, hi = bootstrap_spearman(a_, s_)
        per_model[name] = {
            "ops": len(mine),
            "spearman_rho": join.spearman_rho,
            "p_value": join.p_value,
            "ci95": [lo, hi],
            "completeness_error": dec.completeness_error,
        }
        for r, ra, rs in zip(mine, stats.rankdata(a_), stats.rankdata(s_), strict=True):
            r["alias_rank"], r["share_rank"] = float(ra / len(mine)), float(rs / len(mine))  # for pooling
        rows += mine
        clock(f"{name}: {len(mine)} ops, rho {join.spearman_rho:.2f} [{lo:.2f}, {hi:.2f}]")
        del model, x
    rows_to_csv(rows, out / "alias_vs_lie.csv")
    ar = np.array([r["alias_rank"] for r in rows])
    sr = np.array([r["share_rank"] for r in rows])
    pooled = stats.spearmanr(ar, sr)
    lo, hi = bootstrap_spearman(ar, sr)
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if r["kind"] == kind]
        if len(sel) >= 5:
            res = stats.spearmanr([r["alias"] for r in sel], [r["share"] for r in sel])
            by_kind[kind] = {"ops": len(sel), "spearman_rho_within_kind": float(res.statistic)}
    summary = {
        "pooled": {
            "ops": len(rows),
            "spearman_rho": float(pooled.statistic),
            "p_value": float(pooled.pvalue),
            "ci95": [lo, hi],
        },
        "per_model": per_model,
        "by_kind": by_kind,
    }
    (out / "alias_vs_lie.json").write_text(json.dumps(summary, indent=2))
    print(
        f"pooled over {len(rows)} ops: Spearman rho {pooled.statistic:.3f} "
        f"(95% bootstrap [{lo:.3f}, {hi:.3f}], "
        f"p {pooled.pvalue:.2g})"
    )
    plot(rows, summary, out / "alias_vs_lie")
    clock(f"wrote {out}")


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    markers = {"nonlinearity": "o", "downsampling": "s", "pooling": "^"}
    colours = plt.get_cmap("tab10")(np.arange(len(models)))
    fig, ax = plt.subplots(figsize=(8.5, 6))
    for c, m in zip(colours, models, strict=True):
        for kind, mk in markers.items():
            sel = [r for r in rows if r["model"] == m and r["kind"] == kind]
            if sel:
                ax.scatter(
                    [100 * r["share"] for r in sel],
                    [r["alias"] for r in sel],
                    color=c,
                    marker=mk,
                    s=28,
                    edgecolors="black",
                    linewidths=0.3,
                    label=f"{m} (rho {summary['per_model'][m]['spearman_rho']:.2f})"
                    if kind == "nonlinearity"
                    else None,
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("share of the Lie derivative, translate x (%)")
    ax.set_ylabel("alias energy / total energy (circles: pointwise at 4x; squares: stride alias)")
    p = summary["pooled"]
    ax.set_title(
        f"Alias energy vs attribution per op, {p['ops']} ops: pooled rank rho = {p['spearman_rho']:.2f} "
        f"[{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
