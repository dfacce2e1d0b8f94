"""Where in the image, at three depths, pretrained EfficientNet-Lite0 breaks translation equivariance.

    python analyses/captum_maps.py --out figures/captum_lite0 [--transform translate_x] [--device cpu]

Two real photos bundled with scikit-image (astronaut, chelsea), the model's own preprocessing, target
= each photo's predicted class (its logit). :class:`aliasscope.captum.LayerLieDerivative` gives, per
neuron of three stage outputs (early, middle, late), ``dT/dh * v``: the stage's local Lie derivative
``v`` weighted by how much the target logit depends on that neuron; a stage's map sums to its exact
contribution to ``L_X T``. Each map is summed over channels and upsampled to the input size with
``LayerAttribution.interpolate`` (bilinear, display only: shares are computed before). The last column
is :class:`aliasscope.captum.LieDerivativeAttribution`, ``dT/dx * D x`` per pixel, which sums to the
whole ``L_X T``. Colours: diverging, centred at 0, each panel clipped at the 99.5th percentile of
its ``|map|``. Also printed: every top-level stage's contribution (stem, ``blocks.0`` ... ``blocks.6``,
head), which add up to ``L_X T``. Writes ``captum_maps.png/.svg`` and ``captum_maps.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from captum.attr import LayerAttribution  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from aliasscope import load_images, load_model  # noqa: E402
from aliasscope._plots import save_figure  # noqa: E402
from aliasscope.captum import LayerLieDerivative, LieDerivativeAttribution  # noqa: E402

LAYERS = ("blocks.1", "blocks.3", "blocks.5")


def _class_name(index: int) -> str:
    try:
        from timm.data import ImageNetInfo

        return ImageNetInfo().index_to_description(index).split(",")[0]
    except Exception:  # names are decoration only
        return f"class {index}"


def _stages(model: torch.nn.Module) -> list[str]:
    """Every top-level piece of the model, with ``blocks`` split into its stages: together they hold
    every op, so their contributions add up to the whole Lie derivative."""
    names = []
    for name, child in model.named_children():
        if name == "blocks":
            names += [f"blocks.{k}" for k in range(len(child))]
        else:
            names.append(name)
    return names


def _show_map(ax, fig, m: np.ndarray, title: str, gray: np.ndarray) -> None:
    lim = float(np.quantile(np.abs(m), 0.995)) or 1e-12
    ax.imshow(gray, cmap="gray", vmin=-0.6, vmax=1.6)  # a faint copy of the photo, for orientation
    im = ax.imshow(m, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim), interpolation="nearest", alpha=0.85)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.ax.tick_params(labelsize=7)
    cb.formatter.set_powerlimits((-2, 2))
    cb.update_ticks()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="figures/captum_lite0")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--transform", default="translate_x")
    p.add_argument("--generator", default="central")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, preprocess = load_model(args.model)
    model = model.to(args.device)
    batch = load_images(None, preprocess, limit=2)  # astronaut, chelsea
    x = batch.images.to(args.device)
    with torch.no_grad():
        pred = model(x).argmax(1)

    modules = dict(model.named_modules())
    layers = [modules[name] for name in LAYERS]
    t0 = time.perf_counter()
    attr = LayerLieDerivative(model, layers, args.transform, args.generator)
    maps, delta = attr.attribute(x, target=pred, return_convergence_delta=True)
    t_layer = time.perf_counter() - t0
    d = attr.last_decomposition
    total = d.total  # L_X T per photo, from the input and output alone (float64)
    t0 = time.perf_counter()
    pix, pix_delta = LieDerivativeAttribution(model, args.transform, args.generator).attribute(
        x, target=pred, return_convergence_delta=True
    )
    t_pix = time.perf_counter() - t0
    stages = _stages(model)
    every, every_delta = LayerLieDerivative(
        model, [modules[n] for n in stages], args.transform, args.generator
    ).attribute(x, target=pred, return_convergence_delta=True)

    size = tuple(x.shape[-2:])
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    photos = (batch.images * std + mean).clamp(0, 1)

    report: dict = {
        "model": args.model,
        "transform": args.transform,
        "generator": args.generator,
        "target": "predicted class logit",
        "layers": list(LAYERS),
        "seconds": {"layer_maps": round(t_layer, 2), "pixel_map": round(t_pix, 2)},
        "photos": [],
    }
    ncol = 2 + len(LAYERS)
    fig, axes = plt.subplots(len(x), ncol, figsize=(3.3 * ncol, 3.2 * len(x)), squeeze=False)
    for i in range(len(x)):
        file = Path(batch.files[i]).name
        cls = int(pred[i])
        tot = float(total[i])
        row = {
            "file": file,
            "pred": cls,
            "class": _class_name(cls),
            "total": tot,
            "layers": {},
            "delta_layers": float(delta[i]),
            "pixel_sum": float(pix[i].double().sum()),
            "pixel_delta": float(pix_delta[i]),
            "completeness_error": d.completeness_error,
            "stages": {n: float(m[i].double().sum()) for n, m in zip(stages, every, strict=True)},
            "delta_stages": float(every_delta[i]),
        }
        gray = photos[i].mean(0).numpy()
        ax = axes[i, 0]
        ax.imshow(photos[i].permute(1, 2, 0).numpy())
        ax.set_title(f"{file}\npredicted: {row['class']} ({cls})\nL = L_X logit = {tot:+.3g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for j, (name, m) in enumerate(zip(LAYERS, maps, strict=True)):
            contrib = float(m[i].double().sum())
            row["layers"][name] = {
                "shape": list(m.shape[1:]),
                "sum": contrib,
                "share": contrib / tot,
                "abs_mass_share": float(m[i].abs().sum() / sum(mm[i].abs().sum() for mm in maps)),
            }
            up = LayerAttribution.interpolate(m[i : i + 1].sum(1, keepdim=True), size, "bilinear")
            _show_map(
                axes[i, 1 + j],
                fig,
                up[0, 0].cpu().numpy(),
                f"{name} output, {m.shape[1]}x{m.shape[2]}x{m.shape[3]}\n(dT/dh * v summed over channels)\n"
                f"contribution {contrib:+.3g} = {100 * contrib / tot:+.0f}% of L",
                gray,
            )
        _show_map(
            axes[i, -1],
            fig,
            pix[i].sum(0).cpu().numpy(),
            f"input image, 3x{size[0]}x{size[1]}\n(dT/dx * Dx summed over RGB)\n"
            f"sum {row['pixel_sum']:+.3g} = {100 * row['pixel_sum'] / tot:.0f}% of L",
            gray,
        )
        report["photos"].append(row)
    fig.suptitle(
        f"{args.model}: where the {args.transform} Lie derivative of the predicted logit comes from "
        f"(red +, blue -, each panel its own scale; {args.generator} generator; shares signed, they cancel)",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, out / "captum_maps.png")
    plt.close(fig)
    (out / "captum_maps.json").write_text(json.dumps(report, indent=2))

    print(f"{args.model}, {args.transform}, {args.generator}; target = predicted logit")
    print(
        f"layer maps {t_layer:.1f} s, pixel map {t_pix:.1f} s; completeness error {d.completeness_error:.1e}"
    )
    for row in report["photos"]:
        print(f"{row['file']}: pred {row['pred']} ({row['class']}), L_X logit = {row['total']:+.4e}")
        for name, r in row["layers"].items():
            print(f"  {name:<9} {tuple(r['shape'])}  sum {r['sum']:+.4e}  share {100 * r['share']:+6.1f}%")
        print(
            f"  delta (total - 3 stages) {row['delta_layers']:+.4e}; pixels sum {row['pixel_sum']:+.4e}, "
            f"delta {row['pixel_delta']:+.1e}"
        )
        mass = sum(abs(v) for v in row["stages"].values())
        print("  every stage (contribution, signed % of L, % of summed |contributions|):")
        for name, v in row["stages"].items():
            print(f"    {name:<12} {v:+.4e} {100 * v / row['total']:+7.1f}% {100 * abs(v) / mass:6.1f}%")
        print(f"    delta (total - all stages) {row['delta_stages']:+.1e}")
    print(f"wrote {out / 'captum_maps.png'} (.svg, .json)")
    return report


if __name__ == "__main__":
    main()
