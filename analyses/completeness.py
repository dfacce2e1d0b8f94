"""Completeness of the exact decomposition across model families, at full resolution.

    python analyses/completeness.py [--device cuda] [--out figures/]

For each model of the list (random init, except pretrained tf_efficientnet_lite0 on real photos) and
for translate_x, rotate and scale, decomposes the Lie derivative of the predicted class's
probability (two images at 224 x 224) in float32 and float64, and reports the completeness error
(|total - sum of all op contributions| / |total|, the total computed from input and output alone),
the unattributed share, the number of ops and the share of the largest op kinds. Writes
``completeness.csv``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import timm
import torch
from torch import nn

from aliasscope import decompose, load_images, load_model
from aliasscope.results import rows_to_csv

MODELS = [
    "resnet50",
    "convnext_tiny",
    "vit_small_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "mixer_b16_224",
    "swin_tiny_patch4_window7_224",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "regnety_008",
    "tf_efficientnet_lite0",
]


def _build(name: str, device: str, images: str | None) -> tuple[nn.Module, torch.Tensor]:
    if name == "tf_efficientnet_lite0":
        model, preprocess = load_model(name, device=device)
        return model, load_images(images, preprocess, limit=2).images.to(device)
    torch.manual_seed(0)
    model = timm.create_model(name).eval().to(device)
    head = model.get_classifier()
    if isinstance(head, nn.Linear) and head.weight.abs().max() == 0:
        nn.init.normal_(head.weight, std=0.02)  # timm zero-initialises some heads: no signal at all
    return model, torch.randn(2, 3, 224, 224, device=device, generator=torch.Generator(device).manual_seed(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--out", default="figures")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--images", default=None, help="real photos for lite0 (default: the bundled scikit-image photos)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    print(
        f"{'model':<34} {'dtype':<8} {'transform':<12} {'ops':>5} {'completeness':>12} {'unattr':>8} "
        f"{'seconds':>8}  top kinds"
    )
    for name in args.models:
        model, x = _build(name, args.device, args.images)
        for dtype in (torch.float32, torch.float64):
            m, xx = model.to(dtype), x.to(dtype)
            for transform in ("translate_x", "rotate", "scale"):
                t0 = time.perf_counter()
                d = decompose(m, xx, transform, target="pred", output="softmax")
                secs = time.perf_counter() - t0
                unattr = (d.unattributed.abs().sum() / d.total.abs().sum()).item()
                kinds = list(d.by_kind().items())[:3]
                top = ", ".join(f"{k} {100 * r['share']:.0f}%" for k, r in kinds)
                rows.append(
                    {
                        "model": name,
                        "dtype": str(dtype).replace("torch.", ""),
                        "transform": transform,
                        "ops": d.num_ops,
                        "completeness_error": d.completeness_error,
                        "unattributed_share": unattr,
                        "seconds": secs,
                        "top_kinds": top,
                    }
                )
                print(
                    f"{name:<34} {rows[-1]['dtype']:<8} {transform:<12} {d.num_ops:>5} "
                    f"{d.completeness_error:>12.2e} {unattr:>8.1e} {secs:>8.2f}  {top}",
                    flush=True,
                )
        model.float()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_to_csv(rows, out / "completeness.csv")
    print(f"wrote {out / 'completeness.csv'}")


if __name__ == "__main__":
    main()
