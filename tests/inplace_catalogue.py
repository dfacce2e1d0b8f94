"""A catalogue of in-place patterns found in real model code, each inside a small float64 CNN.

Every pattern mutates an activation: in-place ops whose result is not reassigned, aliases that see
the mutation, mutated views and bases, slice assignment, ``out=`` calls, in-place modules. Each
model's ``forward`` is plain PyTorch; the ground truth is running it natively.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _bare_relu_(z, _):
    torch.relu_(z)  # return value unused
    return z


def _bare_mul_gate(z, _):
    g = torch.sigmoid(z)
    z.mul_(g)  # SiLU written in place, return unused
    return z


def _inplace_module_unused(z, m):
    m.act(z)  # nn.ReLU(inplace=True), return unused
    return z


def _functional_inplace_unused(z, _):
    F.silu(z, inplace=True)
    return z


def _aliased_name_sees_iadd(z, m):
    skip = z
    z += m.conv2(z)  # `skip` is the same tensor: it sees the sum
    return skip * 1.5


def _slice_assignment(z, _):
    z[:, :2] = torch.tanh(z[:, 2:4])
    return z


def _view_mutation_reaches_base(z, _):
    v = z[:, 1:3]
    v.mul_(2.0).sin_()  # writes through the view into z
    return z


def _base_mutation_reaches_old_view(z, _):
    v = z.view(z.shape[0], z.shape[1], -1)  # a view taken before the mutation
    z.tanh_()
    return v.view_as(z) + 0.1 * z


def _out_argument(z, _):
    buf = torch.empty_like(z)
    torch.sigmoid(z, out=buf)
    torch.mul(buf, z, out=buf)
    return buf


def _chained_methods(z, _):
    mean = z.mean(dim=(2, 3), keepdim=True)
    z.sub_(mean).div_(z.std(dim=(2, 3), keepdim=True) + 1.0).clamp_(-2.0, 2.0)
    return z


def _canvas_from_zeros(z, _):
    canvas = torch.zeros_like(z)
    canvas.copy_(z)
    canvas.add_(torch.cos(z))
    return canvas


def _canvas_filled_by_channel_slices(z, _):
    canvas = torch.zeros(z.shape[0], 6, *z.shape[2:], dtype=z.dtype)  # a constant, then written
    canvas[:, :3] = F.gelu(z[:, :3])
    canvas[:, 3:] = torch.tanh(z[:, 3:])
    return canvas


def _masked_fill_(z, _):
    z.masked_fill_(z > 1.0, 1.0)
    return torch.sin(z)


def _addcmul_(z, _):
    w = torch.tanh(z)
    z.addcmul_(w, w, value=0.5)
    return z


def _inplace_on_channel_slice_of_copy(z, _):
    y = z.clone()
    y[:, ::2].mul_(torch.sigmoid(z[:, 1::2]))
    return y


def _mutation_inside_a_block(z, m):
    return m.block(z)


def _transpose_view_mutated(z, _):
    t = z.transpose(2, 3)
    t.add_(0.25 * torch.tanh(t))
    return z


def _setitem_through_chunk(z, _):
    a, b = z.chunk(2, dim=1)
    a.mul_(torch.sigmoid(b))
    return z


class _GateBlock(nn.Module):
    """A block whose forward scales its input in place and returns it (timm-style ``x.mul_``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True))))
        return x


PATTERNS: dict[str, Callable] = {
    "bare relu_": _bare_relu_,
    "bare mul_ gate": _bare_mul_gate,
    "nn.ReLU(inplace=True) unused": _inplace_module_unused,
    "F.silu(inplace=True) unused": _functional_inplace_unused,
    "alias sees +=": _aliased_name_sees_iadd,
    "slice assignment": _slice_assignment,
    "view mutation reaches base": _view_mutation_reaches_base,
    "base mutation reaches old view": _base_mutation_reaches_old_view,
    "out= argument": _out_argument,
    "chained sub_/div_/clamp_": _chained_methods,
    "canvas from zeros": _canvas_from_zeros,
    "canvas filled by channel slices": _canvas_filled_by_channel_slices,
    "masked_fill_": _masked_fill_,
    "addcmul_": _addcmul_,
    "in-place on strided channel slice": _inplace_on_channel_slice_of_copy,
    "x.mul_ inside a block": _mutation_inside_a_block,
    "transposed view mutated": _transpose_view_mutated,
    "chunk view mutated": _setitem_through_chunk,
}


class PatternNet(nn.Module):
    """conv -> pattern -> strided conv -> GELU -> pool -> linear, in float64."""

    def __init__(self, pattern: Callable, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.pattern = pattern
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.block = _GateBlock(6)
        self.conv3 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, classes)
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv1(x)
        z = self.pattern(z, self)
        z = F.gelu(self.conv3(z))
        return self.head(z.mean((2, 3)))
