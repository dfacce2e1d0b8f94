"""Shared pieces of the analyses: the model lists, loading a model with its images, and the layer
attribution of a model over several transforms in batches.

Not part of the package: each analysis script imports it as ``from common import ...`` (it runs
from ``analyses/``'s folder: ``python analyses/NAME.py``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from aliasscope import Decomposition, decompose, load_images, load_model
from aliasscope.models import MissingWeightsError

PRETRAINED = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "mobilenetv2_100"]
RANDOM_INIT = [
    "resnet50",
    "convnext_tiny",
    "vit_small_patch16_224",
    "deit_tiny_patch16_224",
    "mixer_b16_224",
    "swin_tiny_patch4_window7_224",
    "efficientnet_b0",
]
IMAGES = "../shared/data/imagenet-sample/labels.csv"


def spread(images: str, num: int) -> int:
    """The ``every`` that spreads ``num`` images over a labels CSV (1 for anything else)."""
    path = Path(images)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return 1
    rows = sum(1 for _ in path.open()) - 1
    return max(1, rows // max(num, 1))


def model_and_images(
    name: str, images: str, num: int, pretrained: bool = True, device: str = "cpu"
) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None, object] | None:
    """The model (eval, on ``device``), ``num`` images spread over the source (one class in every
    ``rows / num`` of a labels CSV) in the model's own preprocessing, their labels and the
    preprocessing; None (with a message) when pretrained weights are asked for but not installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model, pre = load_model(name, pretrained=pretrained, device=device)
        except MissingWeightsError as err:
            print(f"skip {name}: {err}")
            return None
    if not pretrained:
        undo_zero_init(model)
    batch = load_images(images, pre, limit=num, every=spread(images, num))
    return model, batch.images.to(device), batch.labels, pre


def undo_zero_init(model: nn.Module) -> None:
    """Undo timm's zero inits at random init: a zero classifier head, and the zero last BatchNorm
    of each residual block (resnets' zero_init_last), which switches every residual branch off."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear) and head.weight.abs().max() == 0:
        torch.manual_seed(0)
        nn.init.normal_(head.weight, std=0.02)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.any():
                m.weight.fill_(1.0)


def each_model(
    names: Sequence[str], images: str, num: int, pretrained: bool = True, device: str = "cpu"
) -> Iterator[tuple[str, nn.Module, torch.Tensor, torch.Tensor | None, object]]:
    """``(name, model, images, labels, preprocessing)`` from :func:`model_and_images` for each of
    ``names`` whose weights are installed (the others are skipped with a message)."""
    for name in names:
        loaded = model_and_images(name, images, num, pretrained=pretrained, device=device)
        if loaded is not None:
            yield (name, *loaded)


def attribute(
    model: nn.Module,
    images: torch.Tensor,
    transforms: Sequence[str],
    *,
    generator: str = "central",
    batch_size: int = 8,
    keep_maps: bool = False,
) -> dict[str, Decomposition]:
    """Exact layer attribution of the predicted class's probability, per transform, over all images
    (in batches of ``batch_size``)."""
    return {
        t: decompose(
            model,
            images,
            t,
            target="pred",
            output="softmax",
            generator=generator,
            keep_maps=keep_maps,
            batch_size=batch_size,
        )
        for t in transforms
    }


def analysis_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """A script's parser with the options every analysis has: ``--out``, ``--images``, ``--device``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=out)
    parser.add_argument("--images", default=IMAGES)
    parser.add_argument("--device", default="cpu")
    return parser


def begin(args: argparse.Namespace) -> tuple[Clock, Path]:
    """Print the thread count and device, make ``--out``; returns a started clock and the folder."""
    print(f"torch threads {torch.get_num_threads()}, device {args.device}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return Clock(), out


class Clock:
    """Prints elapsed seconds with a label."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, label: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {label}", flush=True)
