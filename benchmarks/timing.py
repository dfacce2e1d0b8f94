"""Helpers shared by the benchmarks (run them as ``python benchmarks/<name>.py``): the timing of
:mod:`aliasscope._timing`, the common command-line options, and the model and images they time."""

from __future__ import annotations

import argparse
import warnings

import timm
import torch
from torch import nn

from aliasscope._timing import best_time, sync

__all__ = ["best_time", "sync", "model_arguments", "model_and_images"]


def model_arguments(parser: argparse.ArgumentParser, model: str, batch: int) -> None:
    """``--model``, ``--batch``, ``--size``, ``--threads`` and ``--device``, with these defaults."""
    parser.add_argument("--model", default=model)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")


def model_and_images(args: argparse.Namespace, details: str = "") -> tuple[nn.Module, torch.Tensor]:
    """Fix the thread count, build the random-init timm model and a batch of random images, and print
    what is timed (model, batch, device, thread count and ``details``)."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"model {args.model}, batch {args.batch}x3x{args.size}x{args.size}, device {name}, "
        f"torch threads {torch.get_num_threads()}{details}"
    )
    return model, x
