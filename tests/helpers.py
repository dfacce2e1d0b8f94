"""Test helpers shared by several test files: small smooth CNNs and images for exact checks (float64),
relative errors, the real-data path. (Fixtures stay in conftest.py; helpers are imported from here.)"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

IMAGENET_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"


def smooth_cnn(num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A random CNN with smooth nonlinearities, a strided conv and a linear head (float64)."""
    torch.manual_seed(seed)
    net = (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.GELU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, num_classes),
        )
        .double()
        .eval()
    )
    bn = net[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
    return net


def random_images(b: int = 2, c: int = 3, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, dtype=torch.float64, generator=g)


def border_flat_images(b: int = 2, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images times a Gaussian window, so they are flat (~0) at the border."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, h, dtype=torch.float64)[:, None]
    xs = torch.linspace(-1, 1, w, dtype=torch.float64)[None, :]
    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    for _ in range(4):
        fx, fy, ph = torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 3.0, 2 * math.pi])
        amp = torch.randn(b, c, 1, 1, generator=g, dtype=torch.float64)
        out += amp * torch.cos(fx * xs * math.pi / 2 + fy * ys * math.pi / 2 + ph)
    return out * torch.exp(-(xs**2 + ys**2) / 0.18)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
