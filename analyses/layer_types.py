"""Share of the Lie derivative by op kind, across model families and transforms.

    python analyses/layer_types.py --out figures/layer_types [--device cuda] [--num-images 16]

For pretrained tf_efficientnet_lite0/1/2 and mobilenetv2_100 (when their weights are installed) and
random-init resnet50, convnext_tiny, vit_small, deit_tiny, mixer_b16, swin_tiny and efficientnet_b0
(224 px), decomposes the Lie derivative of the predicted class's probability exactly for translate_x,
rotate and scale on ImageNet sample images, and reports the share of each op kind. The paper's claim
that the shares are nearly the same across transforms (aliasing as a common cause) is measured per
model as the Spearman rank correlation of the per-op shares between each pair of transforms.
Writes layer_types.csv (model, transform, kind, share), correlations.csv and layer_types.png/svg.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from common import PRETRAINED, RANDOM_INIT, analysis_parser, attribute, begin, model_and_images
from scipy import stats

from aliasscope._plots import save_figure
from aliasscope.kinds import kind_colour, kind_order
from aliasscope.results import rows_to_csv

TRANSFORMS = ["translate_x", "rotate", "scale"]


def main() -> None:
    parser = analysis_parser(__doc__, "figures/layer_types")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--models", nargs="*", default=None, help="subset of the model list")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of models not run now from an earlier layer_types.csv/correlations.csv in --out",
    )
    args = parser.parse_args()
    clock, out = begin(args)
    plan = [(m, True) for m in PRETRAINED] + [(m, False) for m in RANDOM_INIT]
    if args.models:
        plan = [(m, p) for m, p in plan if m in args.models]
    rows, corr_rows, completeness = [], [], {}
    for name, pretrained in plan:
        loaded = model_and_images(
            name,
            args.images,
            args.num_images,
            pretrained=pretrained,
            device=args.device,
        )
        if loaded is None:
            continue
        model, x, _, _ = loaded
        label = name if pretrained else f"{name} (random init)"
        decs = attribute(model, x, TRANSFORMS)
        for t, d in decs.items():
            completeness[f"{label}/{t}"] = d.completeness_error
            for kind, r in d.by_kind().items():
                rows.append(
                    {"model": label, "transform": t, "kind": kind, "share": r["share"], "ops": r["ops"]}
                )
        for a, b in itertools.combinations(TRANSFORMS, 2):
            sa, sb = decs[a].shares().numpy(), decs[b].shares().numpy()
            keep = (sa > 1e-9) | (sb > 1e-9)  # ops that are zero by construction would inflate rho
            rho = stats.spearmanr(sa[keep], sb[keep]).statistic
            ka = np.array([r["share"] for r in rows if r["model"] == label and r["transform"] == a])
            kb = np.array([r["share"] for r in rows if r["model"] == label and r["transform"] == b])
            corr_rows.append(
                {
                    "model": label,
                    "pair": f"{a}~{b}",
                    "ops": int(keep.sum()),
                    "spearman_ops": float(rho),
                    "max_kind_share_difference": float(np.abs(ka - kb).max()),
                }
            )
        clock(
            f"{label}: "
            + ", ".join(
                f"{t} "
                + " ".join(f"{k[:6]} {100 * r['share']:.0f}%" for k, r in list(decs[t].by_kind().items())[:3])
                for t in TRANSFORMS
            )
        )
        del model, x, decs
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.merge:
        ran = {r["model"] for r in rows}
        for file, mine in (("layer_types.csv", rows), ("correlations.csv", corr_rows)):
            if (out / file).is_file():
                old = [_numbers(r) for r in csv.DictReader((out / file).open()) if r["model"] not in ran]
                mine[:0] = old
    rows_to_csv(rows, out / "layer_types.csv")
    rows_to_csv(corr_rows, out / "correlations.csv")
    rhos = [r["spearman_ops"] for r in corr_rows]
    summary = {
        "images": args.num_images,
        "transforms": TRANSFORMS,
        "median_spearman_ops": float(np.median(rhos)) if rhos else None,
        "min_spearman_ops": float(np.min(rhos)) if rhos else None,
        "max_completeness_error": max(completeness.values()) if completeness else None,
        "correlations": corr_rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"per-op Spearman between transforms: median {summary['median_spearman_ops']:.3f}, "
        f"min {summary['min_spearman_ops']:.3f}; "
        f"max completeness error {summary['max_completeness_error']:.2e}"
    )
    plot(rows, out / "layer_types")
    clock(f"wrote {out}")


def _numbers(row: dict) -> dict:
    """A CSV row with its numeric fields as numbers."""
    out = {}
    for k, v in row.items():
        try:
            out[k] = int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            out[k] = v
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    models = list(dict.fromkeys(r["model"] for r in rows))
    kinds = [
        k
        for k in kind_order(r["kind"] for r in rows)
        if any(r["kind"] == k and r["share"] > 1e-3 for r in rows)
    ]
    fig, ax = plt.subplots(figsize=(max(10, 1.5 * len(models) + 3), 6))
    width = 0.27
    for m_i, model in enumerate(models):
        for t_i, t in enumerate(TRANSFORMS):
            bottom = 0.0
            xpos = m_i + (t_i - 1) * (width + 0.02)
            for kind in kinds:
                share = sum(
                    r["share"]
                    for r in rows
                    if r["model"] == model and r["transform"] == t and r["kind"] == kind
                )
                ax.bar(
                    xpos,
                    100 * share,
                    width,
                    bottom=bottom,
                    color=kind_colour(kind),
                    hatch=["", "//", ".."][t_i],
                    edgecolor="white",
                    linewidth=0.3,
                )
                bottom += 100 * share
    ax.set_xticks(
        range(len(models)),
        [m.replace(" (random init)", "\n(random init)") for m in models],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("share of the Lie derivative (%)")
    ax.set_ylim(0, 100)
    handles = [Patch(color=kind_colour(k), label=k) for k in kinds]
    handles += [
        Patch(facecolor="#bbbbbb", hatch=h, label=t.replace("_", " "), edgecolor="white")
        for h, t in zip(["", "//", ".."], TRANSFORMS, strict=True)
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(
        "Layer attribution by op kind: translate x | rotate | scale per model "
        "(predicted class's probability, exact decomposition)"
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
