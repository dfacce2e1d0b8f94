"""Spectra and aliasing energy of activations and ops, by FFT.

Primitives (all batched ``torch.fft``, no loops over channels):

* :func:`power_spectrum`: mean 2-D power spectrum over batch and channels of an image-like tensor;
  :func:`radial_profile` and :func:`hf_fraction` summarise it.
* :func:`upsample` / :func:`downsample`: band-limited resampling by FFT zero-padding / truncation
  (the ideal low-pass), the Nyquist term split symmetrically.
* :func:`alias_ratio` and :func:`aliasing_error`: how much a pointwise op (nonlinearity, channel norm,
  gating) aliases. The op's input is upsampled band-limitedly by ``s``, the op applied at the fine
  resolution, and ``alias_ratio`` is the fraction of the output's energy outside the band the native
  grid can represent; ``aliasing_error`` is ``||op(h) - down(op(up(h)))||^2 / ||op(h)||^2`` at the native
  resolution. Both converge as ``s`` grows (:func:`convergence`).
* :func:`stride_alias`: for a downsampling op evaluated at stride 1, the fraction of energy above the
  output's Nyquist frequency (the part that folds back when subsampled by the stride).

Frequencies are in cycles per image side. "Outside the band of an n-point grid" is measured as the
energy removed by the ideal band-limited projection onto that grid, which keeps ``|k| < n / 2`` and the
cosine part of the Nyquist frequency ``|k| = n / 2`` (its sine part vanishes on the grid's samples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .layouts import BCHW, Layout
from .results import rows_to_csv, save_text, to_json_text

if TYPE_CHECKING:
    from .capture import OpRecord

__all__ = [
    "power_spectrum",
    "radial_profile",
    "hf_fraction",
    "upsample",
    "downsample",
    "alias_ratio",
    "aliasing_error",
    "pointwise_aliasing",
    "convergence",
    "stride_alias",
    "spectral",
    "Spectrum",
]


def _grid(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The tensor as a (M, 1, H, W) stack of grids (prefix tokens dropped)."""
    img, _ = layout.to_bchw(x)
    return img.reshape(-1, 1, *img.shape[-2:])


def power_spectrum(x: torch.Tensor, layout: Layout = BCHW, window: str | None = None) -> torch.Tensor:
    """Mean over batch and channels of ``|FFT2|^2 / (H W)`` (unshifted, ``fftfreq`` order), shape (H, W).

    ``window="hann"`` tapers each grid first (less leakage from the image borders).
    """
    g = _grid(x, layout).double()
    h, w = g.shape[-2:]
    if window == "hann":
        g = g * (
            torch.hann_window(h, periodic=False, dtype=g.dtype, device=g.device)[:, None]
            * torch.hann_window(w, periodic=False, dtype=g.dtype, device=g.device)[None, :]
        )
    elif window is not None:
        raise ValueError(f"unknown window {window!r}; valid: None, 'hann'")
    return (torch.fft.fft2(g).abs() ** 2).mean(dim=(0, 1)) / (h * w)


def _radius(h: int, w: int, device=None) -> torch.Tensor:
    """|k| / Nyquist per FFT bin (1 at the Nyquist frequency of each axis)."""
    ky = torch.fft.fftfreq(h, device=device, dtype=torch.float64) * 2
    kx = torch.fft.fftfreq(w, device=device, dtype=torch.float64) * 2
    return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)


def radial_profile(power: torch.Tensor, bins: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean power in ``bins`` rings of ``|k| / Nyquist`` over [0, sqrt 2]; returns (centres, profile)."""
    r = _radius(*power.shape, device=power.device)
    edges = torch.linspace(0, 2**0.5 + 1e-9, bins + 1, dtype=torch.float64, device=power.device)
    idx = torch.bucketize(r.flatten(), edges, right=True) - 1
    total = torch.zeros(bins, dtype=torch.float64, device=power.device).index_add_(
        0, idx, power.flatten().double()
    )
    count = torch.zeros(bins, dtype=torch.float64, device=power.device).index_add_(
        0, idx, torch.ones_like(r.flatten())
    )
    return (edges[1:] + edges[:-1]) / 2, total / count.clamp_min(1)


def hf_fraction(power: torch.Tensor, cutoff: float = 0.5) -> float:
    """Fraction of the energy at ``|k| / Nyquist > cutoff``."""
    r = _radius(*power.shape, device=power.device)
    return (power[r > cutoff].sum() / power.sum().clamp_min(1e-300)).item()


def _outside(y: torch.Tensor, hw: tuple[int, int]) -> float:
    """Fraction of the energy of ``y`` (..., H', W') that an (h, w) grid cannot represent:
    ``||y - up(down(y))||^2 / ||y||^2`` with the ideal band-limited projection, which keeps the cosine
    (and drops the sine) part of a Nyquist frequency, as sampling on the coarse grid does."""
    y = y.double()
    fh, fw = y.shape[-2] // hw[0], y.shape[-1] // hw[1]
    if fh * hw[0] != y.shape[-2] or fw * hw[1] != y.shape[-1] or fh != fw:
        raise ValueError(f"cannot project a {tuple(y.shape[-2:])} grid onto {hw}: not an integer factor")
    return _relative_sq(y, upsample(downsample(y, hw), fh))


def _relative_sq(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b||^2 / ||a||^2``."""
    return ((a - b).norm() ** 2 / a.norm().clamp_min(1e-300) ** 2).item()


def upsample(x: torch.Tensor, s: int) -> torch.Tensor:
    """Band-limited (trigonometric) interpolation of (..., H, W) to (..., sH, sW) by FFT zero-padding."""
    if s == 1:
        return x
    h, w = x.shape[-2:]
    spec = torch.fft.fft2(x.double() if x.dtype == torch.float64 else x.float())
    out = spec.new_zeros((*spec.shape[:-2], s * h, s * w))
    ky = torch.fft.fftfreq(h, d=1.0 / h).long()
    kx = torch.fft.fftfreq(w, d=1.0 / w).long()
    fy, fx = ky % (s * h), kx % (s * w)
    out[..., fy[:, None], fx[None, :]] = spec
    # split the Nyquist bins of even axes between +n/2 and -n/2 (a cosine, not a one-sided wave)
    if h % 2 == 0:
        src = out[..., (-(h // 2)) % (s * h), :] / 2
        out[..., (-(h // 2)) % (s * h), :] = src
        out[..., (h // 2) % (s * h), :] = src
    if w % 2 == 0:
        src = out[..., :, (-(w // 2)) % (s * w)] / 2
        out[..., :, (-(w // 2)) % (s * w)] = src
        out[..., :, (w // 2) % (s * w)] = src
    return torch.fft.ifft2(out).real.to(x.dtype) * (s * s)


def downsample(y: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Ideal low-pass to the band of an (H, W) grid, then sample it there (FFT truncation)."""
    hf, wf = y.shape[-2:]
    h, w = hw
    spec = torch.fft.fft2(y)
    ky = torch.fft.fftfreq(h, d=1.0 / h).long() % hf
    kx = torch.fft.fftfreq(w, d=1.0 / w).long() % wf
    low = spec[..., ky[:, None], kx[None, :]]
    if h % 2 == 0:  # fold the +n/2 bin onto -n/2 (both are one frequency on the coarse grid)
        low[..., h // 2, :] += spec[..., (h // 2) % hf, :][..., kx]
    if w % 2 == 0:
        low[..., :, w // 2] += spec[..., ky, (w // 2) % wf]
    if h % 2 == 0 and w % 2 == 0:
        low[..., h // 2, w // 2] += spec[..., (h // 2) % hf, (w // 2) % wf]
    return torch.fft.ifft2(low).real / ((hf // h) * (wf // w))


def pointwise_aliasing(
    op: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, s: int = 4
) -> tuple[float, float]:
    """``(alias_ratio, aliasing_error)`` of a pointwise op from one fine-resolution evaluation."""
    hw = tuple(h.shape[-2:])
    y = op(upsample(h, s)).double()
    low = downsample(y, hw)
    return _relative_sq(y, upsample(low, s)), _relative_sq(op(h).double(), low)


def alias_ratio(op: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, s: int = 4) -> float:
    """Fraction of the energy of ``op(upsample(h, s))`` outside the band of ``h``'s grid (B, C, H, W)."""
    return _outside(op(upsample(h, s)), tuple(h.shape[-2:]))


def aliasing_error(op: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, s: int = 4) -> float:
    """``||op(h) - down(op(up(h)))||^2 / ||op(h)||^2``: the op's aliasing at the native resolution."""
    return pointwise_aliasing(op, h, s)[1]


def convergence(
    op: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, factors: tuple[int, ...] = (2, 4, 8)
) -> dict[int, tuple[float, float]]:
    """``{s: (alias_ratio, aliasing_error)}`` for several upsampling factors, to trust the chosen s."""
    return {s: pointwise_aliasing(op, h, s) for s in factors}


def stride_alias(full: torch.Tensor, stride: int, layout: Layout = BCHW) -> float:
    """Fraction of the energy of a stride-1 output above the Nyquist frequency of the strided output
    (what folds back when it is subsampled by ``stride``)."""
    g = _grid(full, layout)
    h, w = g.shape[-2:]
    return _outside(g, (h // stride, w // stride))


# -- per-op analysis of a whole model ------------------------------------------------------------

_POINTWISE_NORMS = {"layer_norm", "LayerNorm", "LayerNorm2d", "batch_norm", "BatchNorm2d", "BatchNormAct2d"}
_SINGLE_GRID = ("bchw", "bhwc", "tokens")


@dataclass
class Spectrum:
    """Per-op spectral measures, in the op order of :func:`aliasscope.capture.record`.

    ``alias_ratio`` and ``aliasing_error`` are measured for pointwise ops (nonlinearities, channel
    norms), ``stride_alias`` for strided convolutions and pooling modules, ``hf_fraction`` (energy above
    half the Nyquist frequency of the op's output) for every image-like op; NaN where not defined.
    """

    names: list[str]
    kinds: list[str]
    layouts: list[str]
    alias_ratio: torch.Tensor
    aliasing_error: torch.Tensor
    stride_alias: torch.Tensor
    hf_fraction: torch.Tensor
    upsample: int

    @property
    def table(self) -> list[dict[str, Any]]:
        """One row per op: order, name, kind, layout and the four measures."""
        return [
            {
                "order": i,
                "name": n,
                "kind": k,
                "layout": lay,
                "alias_ratio": a,
                "aliasing_error": e,
                "stride_alias": sa,
                "hf_fraction": hf,
            }
            for i, (n, k, lay, a, e, sa, hf) in enumerate(
                zip(
                    self.names,
                    self.kinds,
                    self.layouts,
                    self.alias_ratio.tolist(),
                    self.aliasing_error.tolist(),
                    self.stride_alias.tolist(),
                    self.hf_fraction.tolist(),
                    strict=True,
                )
            )
        ]

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Mean of each measure per op kind (NaN-aware)."""
        out: dict[str, dict[str, float]] = {}
        for kind in dict.fromkeys(self.kinds):
            idx = [i for i, k in enumerate(self.kinds) if k == kind]
            out[kind] = {
                name: torch.nanmean(getattr(self, name)[idx]).item()
                for name in ("alias_ratio", "aliasing_error", "stride_alias", "hf_fraction")
            } | {"ops": len(idx)}
        return out

    def to_csv(self, path: str | None = None) -> str:
        """:attr:`table` as CSV (written to ``path`` if given)."""
        return rows_to_csv(self.table, path)

    def to_json(self, path: str | None = None) -> str:
        """Settings, per-kind means and per-op rows as JSON (NaN as null)."""
        return save_text(
            to_json_text({"upsample": self.upsample, "by_kind": self.by_kind(), "ops": self.table}), path
        )


def _grid_op(op: OpRecord) -> Callable[[torch.Tensor], torch.Tensor]:
    """The op as a map of (B, C, H, W) grids at any resolution (prefix tokens kept as recorded)."""
    lay_in, lay_out = op.in_layouts[0], op.out_layouts[0]
    _, prefix = lay_in.to_bchw(op.inputs[0])

    def relayout(layout: Layout, hw: tuple[int, int]) -> Layout:
        return Layout.tokens(hw, layout.num_prefix) if layout.kind == "tokens" else layout

    def fn(grid: torch.Tensor) -> torch.Tensor:
        hw = tuple(grid.shape[-2:])
        x = relayout(lay_in, hw).from_bchw(grid, prefix)
        y = op.replay(x)
        return relayout(lay_out, hw).to_bchw(y)[0]

    return fn


def _stride_one(op: OpRecord) -> tuple[Callable[[torch.Tensor], torch.Tensor], int] | None:
    """A strided conv/pool module evaluated at stride 1 (same weights, 'same' padding), and its stride."""
    m = op.unit
    if isinstance(m, nn.Conv2d) and m.stride[0] == m.stride[1] and m.stride[0] > 1 and m.groups >= 1:
        pad = tuple((k - 1) // 2 * d for k, d in zip(m.kernel_size, m.dilation, strict=True))
        return (lambda x: F.conv2d(x, m.weight, m.bias, 1, pad, m.dilation, m.groups)), m.stride[0]
    if isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s = m.stride if isinstance(m.stride, int) else m.stride[0]
        if s > 1:
            pool = F.max_pool2d if isinstance(m, nn.MaxPool2d) else F.avg_pool2d
            return (
                lambda x: pool(F.pad(x, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2), mode="replicate"), k, 1)
            ), s
    return None


def spectral(
    model: nn.Module,
    images: torch.Tensor,
    upsample: int = 4,
    *,
    select: str | list[str] | Callable[[OpRecord], bool] | None = None,
    layouts: dict[str, Layout] | None = None,
    units: list[str] | str = (),
    progress: bool = False,
) -> Spectrum:
    """Spectral aliasing measures for every recorded op of ``model`` on ``images`` (see :class:`Spectrum`)."""
    from tqdm.auto import tqdm

    from .borrow import borrowed, check_images
    from .capture import record

    images = check_images(images, model)
    with borrowed(model), torch.no_grad():
        with record(model, layouts=layouts, units=units) as rec:
            model(images)
        keep = rec.select(select)
        nan = float("nan")
        ar, ae, sa, hf = ([nan] * len(keep) for _ in range(4))
        for j, i in enumerate(tqdm(keep, desc="spectra", disable=not progress)):
            op = rec.ops[i]
            lay = op.layout
            if lay is None or lay.kind not in _SINGLE_GRID or not op.outputs:
                continue
            hf[j] = hf_fraction(power_spectrum(op.outputs[0], lay))
            single = (
                len(op.inputs) == 1 and op.in_layouts[0] is not None and op.in_layouts[0].kind in _SINGLE_GRID
            )
            pointwise = op.kind == "nonlinearity" or op.op in _POINTWISE_NORMS
            if single and pointwise and op.inputs[0].shape == op.outputs[0].shape:
                fn = _grid_op(op)
                grid = op.in_layouts[0].to_bchw(op.inputs[0])[0]
                ar[j], ae[j] = pointwise_aliasing(fn, grid, upsample)
            strided = _stride_one(op) if single and op.kind == "downsampling" else None
            if strided is not None:
                fn, stride = strided
                full = fn(op.inputs[0])
                if full.shape[-1] % stride == 0 and full.shape[-2] % stride == 0:
                    sa[j] = stride_alias(full, stride)
    return Spectrum(
        names=[rec.ops[i].name for i in keep],
        kinds=[rec.ops[i].kind for i in keep],
        layouts=[str(rec.ops[i].layout) for i in keep],
        alias_ratio=torch.tensor(ar, dtype=torch.float64),
        aliasing_error=torch.tensor(ae, dtype=torch.float64),
        stride_alias=torch.tensor(sa, dtype=torch.float64),
        hf_fraction=torch.tensor(hf, dtype=torch.float64),
        upsample=upsample,
    )
