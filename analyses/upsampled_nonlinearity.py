"""The paper's experiment: evaluate every nonlinearity of pretrained tf_efficientnet_lite0 at 1x, 2x,
4x and 8x resolution (band-limited upsampling, activation, ideal low-pass, downsampling) and watch the
nonlinearities' Lie-derivative contribution, their alias energy and the accuracy.

    python analyses/upsampled_nonlinearity.py --out figures/upsampled_nonlinearity [--device cuda]

For each factor: top-1 on ``--num-images`` ImageNet sample images; the end-to-end Lie derivative
(mean |L_X softmax|) for translate_x, rotate and scale; the exact layer attribution under translate_x on
``--layer-images`` images, reported as the summed mean |contribution| of the nonlinearity ops and of
the other kinds (absolute, so that the factors compare); and the alias ratio of the nonlinearities
(aliasscope.spectrum, the energy their outputs put above the native band: for the wrapped ones,
measured on the grid they run on). Writes upsampled_nonlinearity.csv/json and a figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from common import analysis_parser, attribute, begin, model_and_images

from aliasscope import equivariance_metrics, filtered_activation, spectral
from aliasscope._plots import KIND_COLOURS, save_figure
from aliasscope.comparison import predict, top1
from aliasscope.data import ImageBatch
from aliasscope.results import rows_to_csv

FACTORS = [1, 2, 4, 8]
TRANSFORMS = ["translate_x", "rotate", "scale"]


def main() -> None:
    parser = analysis_parser(__doc__, "figures/upsampled_nonlinearity")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--layer-images", type=int, default=16)
    parser.add_argument("--spectral-images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--factors", type=int, nargs="+", default=FACTORS)
    args = parser.parse_args()
    clock, out = begin(args)
    model, x, labels, _ = model_and_images(args.model, args.images, args.num_images, device=args.device)
    rows = []
    for s in args.factors:
        net = model if s == 1 else filtered_activation(model, up=s, filter="ideal", example=x[:1])
        # spectral first, on an empty device: a wrapped activation is measured on its s-times finer grid,
        # upsampled again by ``measure`` (at 8x: 32x the native grid; spectral splits it over channels)
        measure = 4
        sp = spectral(net, x[: args.spectral_images], upsample=measure, batch_size=1, max_bytes=2**28)
        alias = sp.by_kind().get("nonlinearity", {}).get("alias_ratio", float("nan"))
        del sp
        _free(args.device)
        row = {
            "factor": s,
            "top1": top1(predict(net, x, args.batch_size), labels),
            "alias_nonlinearity": alias,
            "alias_measured_at": measure,
        }
        _free(args.device)
        metrics = equivariance_metrics(
            net,
            ImageBatch(x, labels, [str(i) for i in range(len(x))]),
            TRANSFORMS,
            batch_size=args.batch_size,
            progress=False,
        )
        for t, (mean, lo, hi) in metrics.interval().items():
            row[f"lie_{t}"], row[f"lie_{t}_low"], row[f"lie_{t}_high"] = mean, lo, hi
        # the decomposition keeps every activation, and a wrapped one holds its s-times finer grids
        dec = attribute(net, x[: args.layer_images], ["translate_x"], batch_size=max(1, 16 // s))[
            "translate_x"
        ]
        mag = dec.values.abs().mean(1)
        for kind in ("nonlinearity", "downsampling", "linear", "pooling"):
            row[f"abs_{kind}"] = float(sum(mag[i] for i, k in enumerate(dec.kinds) if k == kind))
        row["share_nonlinearity"] = dec.by_kind().get("nonlinearity", {}).get("share", 0.0)
        row["completeness_error"] = dec.completeness_error
        rows.append(row)
        clock(
            f"{s}x: top-1 {100 * row['top1']:.1f}%, L translate_x {row['lie_translate_x']:.4f}, "
            f"nonlinearity |c| {row['abs_nonlinearity']:.3g} ({100 * row['share_nonlinearity']:.0f}%), "
            f"alias {row['alias_nonlinearity']:.3g}"
        )
        del net, dec, metrics
        _free(args.device)
    rows_to_csv(rows, out / "upsampled_nonlinearity.csv")
    (out / "upsampled_nonlinearity.json").write_text(
        json.dumps(
            {"model": args.model, "images": len(x), "layer_images": args.layer_images, "rows": rows}, indent=2
        )
    )
    plot(rows, out / "upsampled_nonlinearity", len(x))
    clock(f"wrote {out}")


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def plot(rows: list[dict], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = [r["factor"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    ax = axes[0]
    for kind in ("nonlinearity", "downsampling", "linear"):
        ax.plot(f, [r[f"abs_{kind}"] for r in rows], "o-", color=KIND_COLOURS[kind], label=kind)
    ax.set_ylabel("summed mean |contribution| (translate x)")
    ax.set_title("(a) Contribution by kind")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(f, [r["alias_nonlinearity"] for r in rows], "o-", color=KIND_COLOURS["nonlinearity"])
    ax.set_yscale("log")
    ax.set_ylabel("alias ratio (mean over nonlinearities)")
    ax.set_title("(b) Alias energy of the nonlinearities")
    ax = axes[2]
    for t, c in zip(TRANSFORMS, ["#4c72b0", "#dd8452", "#55a868"], strict=True):
        ax.errorbar(
            f,
            [r[f"lie_{t}"] for r in rows],
            yerr=[
                [r[f"lie_{t}"] - r[f"lie_{t}_low"] for r in rows],
                [r[f"lie_{t}_high"] - r[f"lie_{t}"] for r in rows],
            ],
            fmt="o-",
            color=c,
            capsize=3,
            label=t.replace("_", " "),
        )
    ax.set_ylabel("mean |L_X softmax| (95% interval)")
    ax.set_title("(c) End-to-end Lie derivative")
    ax.legend(fontsize=8)
    ax = axes[3]
    ax.plot(f, [100 * r["top1"] for r in rows], "o-", color="black")
    ax.set_ylabel(f"top-1 (%), {n} images")
    ax.set_title("(d) Accuracy (no fine-tuning)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(f, [f"{v}x" for v in f])
        ax.set_xlabel("resolution of the nonlinearities")
        ax.grid(alpha=0.3)
    fig.suptitle("Nonlinearities evaluated at higher resolution (pretrained lite0)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
