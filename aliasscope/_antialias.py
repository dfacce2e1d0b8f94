"""Anti-aliasing layers that :mod:`aliasscope.fixes` puts into a model.

* :class:`FilteredActivation`: upsample -> nonlinearity -> low-pass -> downsample around a pointwise
  nonlinearity (StyleGAN3's filtered nonlinearities, Karras et al. 2021), with an ideal (FFT) or a
  Kaiser-windowed sinc filter.
* :class:`PolyphaseDown`: adaptive polyphase sampling (APS, Chaman & Dokmanic 2021): of the ``s * s``
  polyphase components keep the one of largest L2 norm.
* :class:`CircularConv2d`, :class:`CircularMaxPool2d`, :class:`CircularAvgPool2d`: pad circularly, by
  a fixed amount or by timm's TF "same" rule (recomputed from the stride, so they can run at stride 1).

Blurring uses timm's ``BlurPool2d`` (binomial filters, Zhang 2019) directly. Every layer here acts on
(B, C, H, W) grids; :class:`FilteredActivation` takes any single-grid :class:`~aliasscope.layouts.Layout`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_int
from .layouts import BCHW, Layout
from .spectrum import downsample, upsample

__all__ = [
    "FilteredActivation",
    "PolyphaseDown",
    "PhaseBook",
    "CircularConv2d",
    "CircularMaxPool2d",
    "CircularAvgPool2d",
    "kaiser_lowpass",
    "same_padding",
    "shallow_copy",
]


def kaiser_lowpass(up: int, half_width: int = 6, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Odd-length, symmetric Kaiser-windowed sinc low-pass on a grid ``up`` times finer than the
    coarse one, cut off at the coarse grid's Nyquist frequency, unit DC gain; ``2 * half_width * up + 1``
    taps (``half_width`` coarse samples each side)."""
    from scipy import signal

    numtaps = 2 * half_width * up + 1
    width = 0.5 / up  # transition band, as a fraction of the fine grid's Nyquist frequency
    beta = signal.kaiser_beta(signal.kaiser_atten(numtaps, width))
    taps = signal.firwin(numtaps, cutoff=1.0 / up, window=("kaiser", beta), scale=True)
    return torch.tensor(taps, dtype=dtype)


def _fir_axis(x: torch.Tensor, taps: torch.Tensor, axis: int, transpose: bool, stride: int) -> torch.Tensor:
    """Depthwise 1-D filtering of (B, C, H, W) along H (axis 2) or W (axis 3), valid positions only;
    ``transpose`` zero-inserts ``stride - 1`` samples between inputs first (conv_transpose)."""
    c = x.shape[1]
    shape = (c, 1, taps.numel(), 1) if axis == 2 else (c, 1, 1, taps.numel())
    weight = taps.to(x.dtype).reshape(1, 1, -1).expand(c, 1, -1).reshape(shape)
    step = (stride, 1) if axis == 2 else (1, stride)
    if transpose:
        return F.conv_transpose2d(x, weight, stride=step, groups=c)
    return F.conv2d(x, weight, stride=step, groups=c)


def _extend(x: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    """Pad H and W by ``pad`` on each side; "circular" wraps as often as needed (maps smaller than
    the filter), "reflect" falls back to "replicate" where the map is too small to mirror."""
    h, w = x.shape[-2:]
    if mode == "circular" and (pad > h or pad > w):
        reps = (pad // h + 2, pad // w + 2)
        tiled = x.repeat(1, 1, 2 * reps[0] + 1, 2 * reps[1] + 1)
        return tiled[
            ..., reps[0] * h - pad : (reps[0] + 1) * h + pad, reps[1] * w - pad : (reps[1] + 1) * w + pad
        ]
    if mode == "reflect" and (pad >= h or pad >= w):
        mode = "replicate"
    return F.pad(x, (pad, pad, pad, pad), mode=mode)


class FilteredActivation(nn.Module):
    """``down(act(up(x)))`` with band-limited resampling by ``up`` around a pointwise ``act``.

    ``filter="ideal"``: FFT zero-padding and truncation (:func:`aliasscope.spectrum.upsample` /
    :func:`~aliasscope.spectrum.downsample`), which treat the grid as periodic. ``filter="kaiser"``:
    separable Kaiser-windowed sinc filters (:func:`kaiser_lowpass`) with the borders extended by
    ``pad_mode`` ("replicate", "reflect" or "circular"; :func:`~aliasscope.fixes.circular_padding`
    switches it to "circular"). Prefix tokens of a token layout go through
    ``act`` unfiltered (they have no grid).
    """

    aliasscope_unit = True
    aliasscope_kind = "nonlinearity"
    aliasscope_filtered = True

    def __init__(
        self,
        act: nn.Module,
        up: int = 2,
        filter: str = "ideal",
        layout: Layout = BCHW,
        pad_mode: str = "replicate",
        half_width: int = 6,
    ) -> None:
        super().__init__()
        if filter not in ("ideal", "kaiser"):
            raise ValueError(f"filter must be 'ideal' or 'kaiser', got {filter!r}")
        check_int("up", up, minimum=2)  # up=1 would filter nothing (and has no low-pass filter)
        self.act, self.up, self.filter, self.layout, self.pad_mode = act, up, filter, layout, pad_mode
        self.register_buffer("taps", kaiser_lowpass(up, half_width), persistent=False)

    def extra_repr(self) -> str:
        pad = f", pad_mode={self.pad_mode!r}" if self.filter == "kaiser" else ""
        return f"up={self.up}, filter={self.filter!r}, layout={self.layout}{pad}"

    def resample_up(self, grid: torch.Tensor) -> torch.Tensor:
        """Band-limited upsampling of a (B, C, H, W) grid by ``up``."""
        if self.up == 1:
            return grid
        if self.filter == "ideal":
            return upsample(grid, self.up)
        u, taps = self.up, self.taps * self.up
        pad = math.ceil((taps.numel() - 1) / 2 / u) + 1
        x = _extend(grid, pad, self.pad_mode)
        c = (taps.numel() - 1) // 2
        start, n_h, n_w = pad * u + c, grid.shape[-2] * u, grid.shape[-1] * u
        x = _fir_axis(x, taps, 2, True, u)[..., start : start + n_h, :]
        return _fir_axis(x, taps, 3, True, u)[..., start : start + n_w]

    def resample_down(self, fine: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Low-pass to the band of an (H, W) grid and sample there."""
        if self.up == 1:
            return fine
        if self.filter == "ideal":
            return downsample(fine, hw)
        c = (self.taps.numel() - 1) // 2
        x = _extend(fine, c, self.pad_mode)
        x = _fir_axis(x, self.taps, 2, False, self.up)
        return _fir_axis(x, self.taps, 3, False, self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, prefix = self.layout.to_bchw(x)
        y = self.resample_down(self.act(self.resample_up(grid)), tuple(grid.shape[-2:])).to(x.dtype)
        return self.layout.from_bchw(y, None if prefix is None else self.act(prefix))


class PhaseBook:
    """The polyphase index chosen per image and grid size during one forward pass, shared by every
    :class:`PolyphaseDown` of a model: branches that meet again (a residual block's main path and its
    strided shortcut) must keep the same component, or a shift would move them by different amounts.
    Cleared at the start of each forward of the model (a forward pre-hook)."""

    def __init__(self) -> None:
        self.phase: dict[tuple[int, ...], torch.Tensor] = {}

    def reset(self, *_args) -> None:
        self.phase.clear()


class PolyphaseDown(nn.Module):
    """Adaptive polyphase sampling by ``stride``: keep, per image, the polyphase component of largest
    L2 norm (over channels and positions). With a :class:`PhaseBook`, the first APS layer to see a grid
    of a given size in a forward pass chooses, and later ones on that size reuse its choice."""

    aliasscope_unit = True
    aliasscope_kind = "downsampling"

    def __init__(self, stride: int = 2, book: PhaseBook | None = None) -> None:
        super().__init__()
        self.stride = stride
        self.book = book

    def extra_repr(self) -> str:
        return f"stride={self.stride}, shared_phase={self.book is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"polyphase sampling needs a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        s = self.stride
        if h % s or w % s:
            raise ValueError(f"polyphase sampling by {s} needs grid sizes divisible by {s}, got {h}x{w}")
        comps = (
            x.reshape(b, c, h // s, s, w // s, s)
            .permute(0, 3, 5, 1, 2, 4)
            .reshape(b, s * s, c, h // s, w // s)
        )
        key = (b, h, w)
        idx = self.book.phase.get(key) if self.book is not None else None
        if idx is None:
            idx = comps.detach().flatten(2).norm(dim=2).argmax(dim=1)
            if self.book is not None:
                self.book.phase[key] = idx
        index = idx.to(x.device).view(b, 1, 1, 1, 1).expand(b, 1, c, h // s, w // s)
        return comps.gather(1, index).squeeze(1)


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "same" padding (before, after) of one axis: the output has ``ceil(size / stride)`` samples."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def shallow_copy(module: nn.Module, cls: type[nn.Module] | None = None, **attrs) -> nn.Module:
    """A copy of ``module`` that shares its parameters, buffers and children but has its own tables of
    them and its own attributes, optionally as class ``cls`` (a subclass with the same state), with
    ``attrs`` set: what a fix changes on it leaves ``module`` as it was."""
    cls = cls or type(module)
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    for name, value in attrs.items():
        setattr(new, name, value)
    return new


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _CircularPadding:
    """Circular padding of a conv or pool: timm's TF "same" rule (recomputed from the current stride,
    so the op may be switched to stride 1) or a fixed symmetric amount (``circular_pad``)."""

    same: bool = False
    circular_pad: tuple[int, int] = (0, 0)

    def circular(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            k, s, d = _pair(self.kernel_size), _pair(self.stride), _pair(getattr(self, "dilation", 1))
            top, bottom = same_padding(x.shape[-2], k[0], s[0], d[0])
            left, right = same_padding(x.shape[-1], k[1], s[1], d[1])
        else:
            (top, left), (bottom, right) = self.circular_pad, self.circular_pad
        return F.pad(x, (left, right, top, bottom), mode="circular") if top or bottom or left or right else x

    def extra_repr(self) -> str:
        pad = "same" if self.same else self.circular_pad
        return f"{super().extra_repr()}, circular padding {pad}"

    @classmethod
    def like(cls, module: nn.Module, same: bool) -> nn.Module:
        """This class with ``module``'s state (parameters shared), padding nothing itself."""
        new = shallow_copy(module, cls, same=same)
        if not same:
            new.circular_pad = _pair(module.padding)
        new.padding = (0, 0) if isinstance(module, nn.Conv2d) else 0
        return new


class CircularConv2d(_CircularPadding, nn.Conv2d):
    """A Conv2d padding circularly by timm's dynamic TF "same" rule (what ``Conv2dSame`` pads with zeros)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.circular(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class CircularMaxPool2d(_CircularPadding, nn.MaxPool2d):
    """A MaxPool2d padding circularly (fixed or TF "same")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.circular(x), self.kernel_size, self.stride, 0, self.dilation, self.ceil_mode)


class CircularAvgPool2d(_CircularPadding, nn.AvgPool2d):
    """An AvgPool2d padding circularly (fixed or TF "same")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(
            self.circular(x), self.kernel_size, self.stride, 0, self.ceil_mode, self.count_include_pad
        )
