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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_finite_output, check_int, check_model, names_nonfinite_images, selected_ops
from .kinds import is_pointwise_kind
from .layouts import BCHW, Layout, _map_windows, window_grid
from .results import Result

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
    "alias_of",
    "spectral",
    "Spectrum",
]


RADIAL_BINS = 32
"""Rings of the radial spectra kept by :func:`spectral` (``Spectrum.radial_spectra``)."""


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


def _hf_parts(power: torch.Tensor, cutoff: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy at ``|k| / Nyquist > cutoff`` and total energy of a power spectrum."""
    r = _radius(*power.shape, device=power.device)
    return power[r > cutoff].sum(), power.sum()


def hf_fraction(power: torch.Tensor, cutoff: float = 0.5) -> float:
    """Fraction of the energy at ``|k| / Nyquist > cutoff``."""
    high, total = _hf_parts(power, cutoff)
    return (high / total.clamp_min(1e-300)).item()


def _outside(y: torch.Tensor, hw: tuple[int, int]) -> float:
    """Fraction of the energy of ``y`` (..., H', W') that an (h, w) grid cannot represent:
    ``||y - up(down(y))||^2 / ||y||^2`` with the ideal band-limited projection, which keeps the cosine
    (and drops the sine) part of a Nyquist frequency, as sampling on the coarse grid does."""
    y = y.double()
    return _relative_sq(y, _project(y, hw))


def _project(y: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The ideal band-limited projection ``up(down(y))`` of (..., H', W') onto the band of an (h, w)
    grid, which divides (H', W') by one integer factor."""
    fh, fw = y.shape[-2] // hw[0], y.shape[-1] // hw[1]
    if fh * hw[0] != y.shape[-2] or fw * hw[1] != y.shape[-1] or fh != fw:
        raise ValueError(f"cannot project a {tuple(y.shape[-2:])} grid onto {hw}: not an integer factor")
    return upsample(downsample(y, hw), fh)


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


def _batches(n: int, per_item: int, max_bytes: float) -> list[slice]:
    """Batch slices of at most ``max_bytes / per_item`` items (at least one item each)."""
    step = n if max_bytes == float("inf") else max(1, int(max_bytes // max(per_item, 1)))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class _Sums:
    """Numerators and denominators of energy ratios, summed in float64 over batch chunks: a ratio of
    sums, so chunking does not change the result."""

    def __init__(self) -> None:
        self.num: dict[str, float] = {}
        self.den: dict[str, float] = {}
        self.radial: torch.Tensor | None = None  # summed ring-mean power of the output, RADIAL_BINS rings

    def add(self, key: str, num: float, den: float) -> None:
        self.num[key] = self.num.get(key, 0.0) + num
        self.den[key] = self.den.get(key, 0.0) + den

    def add_sq(self, key: str, diff: torch.Tensor, ref: torch.Tensor) -> None:
        """Add ``||diff||^2`` and ``||ref||^2``."""
        self.add(key, (diff.double().norm() ** 2).item(), (ref.double().norm() ** 2).item())

    def ratio(self, key: str) -> float:
        if key not in self.num:
            return float("nan")
        return self.num[key] / max(self.den[key], 1e-300)


def _pointwise_sums(
    op: Callable[[torch.Tensor, slice], torch.Tensor],
    h: torch.Tensor,
    s: int,
    sums: _Sums,
    max_bytes: float = float("inf"),
    suffix: str = "",
    elementwise: bool = False,
) -> None:
    """Add the ``alias`` and ``error`` energies of a pointwise op on (B, C, H, W) ``h`` at factor ``s``;
    ``op(x, rows)`` gets the batch rows it works on. An ``elementwise`` op (the same function on every
    entry, no per-channel parameters) is also split over channels when one image exceeds ``max_bytes``."""
    hw = tuple(h.shape[-2:])
    per_image = h[:1].numel() * s * s * 64
    channels = [slice(None)]
    if elementwise and per_image > max_bytes and h.shape[1] > 1:
        channels = _batches(h.shape[1], per_image // h.shape[1], max_bytes)
    for rows in _batches(h.shape[0], per_image, max_bytes):
        for chans in channels:
            part = h[rows, chans]
            y = op(upsample(part, s), rows).double()
            low = downsample(y, hw)
            sums.add_sq("alias" + suffix, y - upsample(low, s), y)
            native = op(part.clone(), rows).double()  # clone: an in-place op must not edit the recording
            sums.add_sq("error" + suffix, native - low, native)
            del y, low, native


def pointwise_aliasing(
    op: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, s: int = 4, max_bytes: float = float("inf")
) -> tuple[float, float]:
    """``(alias_ratio, aliasing_error)`` of a pointwise op from one fine-resolution evaluation, in batch
    chunks of about ``max_bytes`` of working memory each."""
    sums = _Sums()
    _pointwise_sums(lambda x, rows: op(x), h, s, sums, max_bytes)
    return sums.ratio("alias"), sums.ratio("error")


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


def alias_of(row: Any) -> Any:
    """An op's alias energy from a row of :attr:`Spectrum.table` (or :meth:`Spectrum.by_kind`): its
    ``alias_ratio`` where measured (pointwise ops), else its ``stride_alias`` (grid-shrinking ops);
    NaN where neither is. With tensors for the two entries, elementwise."""
    a, s = row["alias_ratio"], row["stride_alias"]
    if isinstance(a, torch.Tensor):
        return torch.where(a.isnan(), s, a)
    return a if a == a else s


def stride_one(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, stride: int) -> torch.Tensor:
    """A stride-``s`` op on (B, C, H, W) grids evaluated at stride 1: for each of the ``s * s`` phases
    (dy, dx), the op applied to the input shifted by (dy, dx) (zeros shifted in at the far border)
    gives the output samples (s i + dy, s j + dx).

    For a strided convolution or pooling this is the same kernel slid with stride 1 (except next to the
    start of each axis, where the op's own padding stands in for pixels the shift moved out); it works as well
    for ops with no stride argument (patch embeddings, Swin's patch merging, functional strided ops) and
    keeps the op's own sampling phase (TF "same" padding included).
    """
    out = None
    for dy in range(stride):
        for dx in range(stride):
            y = op(F.pad(x[..., dy:, dx:], (0, dx, 0, dy)))
            if out is None:
                out = y.new_zeros((*y.shape[:-2], y.shape[-2] * stride, y.shape[-1] * stride))
            out[..., dy::stride, dx::stride] = y
    return out


# -- per-op analysis of a whole model ------------------------------------------------------------

_POINTWISE_NORMS = {"layer_norm", "LayerNorm", "LayerNorm2d", "batch_norm", "BatchNorm2d", "BatchNormAct2d"}
_SINGLE_GRID = ("bchw", "bhwc", "tokens")


@dataclass
class Spectrum(Result):
    """Per-op spectral measures, in the op order of :func:`aliasscope.capture.record`.

    ``alias_ratio`` and ``aliasing_error`` are measured for pointwise ops (nonlinearities, channel
    norms) at the upsampling factor ``upsample`` (for a
    :class:`~aliasscope._antialias.FilteredActivation`, of its nonlinearity on the finer grid it runs
    on: the energy the wrapper's low-pass cannot remove);
    ``stride_alias`` for every op that shrinks its grid by
    an integer factor ``strides[i]`` (strided convolutions and pooling, patch embeddings, patch merging),
    evaluated at stride 1 (:func:`stride_one`); ``hf_fraction`` (energy above half the Nyquist frequency
    of the op's output) for every image-like op; NaN where not defined. Every measure is a ratio of
    energies pooled over all images. ``convergence`` maps further factors ``s`` to
    ``(alias_ratio, aliasing_error)`` at that ``s``, to check that ``upsample`` is large enough.
    :meth:`alias` is each op's alias energy (:func:`alias_of`); :meth:`plot` draws
    :func:`aliasscope._plots.plot_spectral`.
    """

    default_figure = "plot_spectral"

    names: list[str]
    kinds: list[str]
    layouts: list[str]
    alias_ratio: torch.Tensor
    aliasing_error: torch.Tensor
    stride_alias: torch.Tensor
    hf_fraction: torch.Tensor
    upsample: int
    strides: list[int | None] = field(default_factory=list)
    convergence: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    radial: torch.Tensor | None = None

    def radial_spectra(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centres, profiles)``: ring centres in ``|k| / Nyquist`` (:data:`RADIAL_BINS` rings over
        [0, sqrt 2]) and, per op, the mean power of its output in each ring as a fraction of the op's
        summed ring powers (num_ops, RADIAL_BINS); NaN for ops that are not image-like and for rings
        a small grid has no frequencies in."""
        edges = torch.linspace(0, 2**0.5 + 1e-9, RADIAL_BINS + 1, dtype=torch.float64)
        centres = (edges[1:] + edges[:-1]) / 2
        if self.radial is None:
            return centres, torch.full((len(self.names), RADIAL_BINS), float("nan"), dtype=torch.float64)
        prof = self.radial.clone()
        prof[prof <= 0] = float("nan")
        return centres, prof / prof.nansum(1, keepdim=True)

    @property
    def table(self) -> list[dict[str, Any]]:
        """One row per op: order, name, kind, layout, stride, the four measures, and
        ``alias_ratio_s{k}`` / ``aliasing_error_s{k}`` for each convergence factor ``k``."""
        strides = self.strides or [None] * len(self.names)
        rows = []
        for i, (n, k, lay, st) in enumerate(zip(self.names, self.kinds, self.layouts, strides, strict=True)):
            row = {"order": i, "name": n, "kind": k, "layout": lay, "stride": st}
            for name in ("alias_ratio", "aliasing_error", "stride_alias", "hf_fraction"):
                row[name] = getattr(self, name)[i].item()
            for f, (a, e) in sorted(self.convergence.items()):
                row[f"alias_ratio_s{f}"], row[f"aliasing_error_s{f}"] = a[i].item(), e[i].item()
            rows.append(row)
        return rows

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

    def convergence_summary(self) -> dict[str, float]:
        """For each convergence factor ``s``: the largest relative change of any op's alias ratio between
        ``s`` and :attr:`upsample` (``max |a_s - a_u| / a_u`` over ops with ``a_u > 1e-9``)."""
        base = self.alias_ratio
        ok = base > 1e-9
        out = {}
        for f, (a, _) in sorted(self.convergence.items()):
            rel = ((a - base).abs() / base)[ok & ~a.isnan()]
            out[f"max_rel_change_s{f}_vs_s{self.upsample}"] = (
                rel.max().item() if rel.numel() else float("nan")
            )
        return out

    def alias(self) -> torch.Tensor:
        """Per op, its alias energy (:func:`alias_of`): the alias ratio, else the stride alias."""
        return alias_of({"alias_ratio": self.alias_ratio, "stride_alias": self.stride_alias})

    def to_dict(self) -> dict[str, Any]:
        """Settings, per-kind means, convergence and per-op rows."""
        return {
            "upsample": self.upsample,
            "by_kind": self.by_kind(),
            "convergence": self.convergence_summary(),
            "ops": self.table,
        }

    def summary(self, k: int = 5) -> str:
        """A text summary: ops measured, alias energy by kind, the ``k`` ops with the most alias
        energy, and the convergence verdict (:func:`aliasscope._report.convergence_verdict`)."""
        from ._report import convergence_verdict

        alias = self.alias()
        measured = int((~alias.isnan()).sum())
        lines = [
            f"Spectral aliasing (upsample {self.upsample}): {measured} of {len(self.names)} ops measured",
            "alias energy by kind (mean over ops):",
        ]
        for kind, row in self.by_kind().items():
            value = alias_of(row)
            if value == value:
                lines.append(f"  {kind:<15} {value:.3e}  ({row['ops']} ops)")
        rows = [r for r in self.table if alias_of(r) == alias_of(r)]
        lines.append(f"top {k} ops by alias energy:")
        for r in sorted(rows, key=lambda r: -alias_of(r))[:k]:
            lines.append(f"  {alias_of(r):.3e}  {r['kind']:<13} {r['name']}")
        lines.append(f"convergence: {convergence_verdict(self.convergence_summary())[1]}")
        return "\n".join(lines)


def _windowed_grid_op(op: OpRecord) -> Callable[[torch.Tensor, slice], torch.Tensor]:
    """A patchify of a window-partitioned input (Swin's patch merging) as a map of (B, C, H, W) grids of
    the recorded size: the grid partitioned into windows as recorded, then the op."""
    lay_in, lay_out, template = op.in_layouts[0], op.out_layouts[0], op.inputs[0]

    def fn(grid: torch.Tensor, rows: slice) -> torch.Tensor:
        x = _map_windows(template[rows], lay_in, lambda _: grid)
        return lay_out.to_bchw(op.replay(x))[0]

    return fn


def _grid_op(op: OpRecord) -> Callable[[torch.Tensor, slice], torch.Tensor]:
    """The op as a map of (B, C, H, W) grids at any resolution (a token grid is resized with it);
    ``rows`` picks the batch rows of the recorded prefix tokens that go with the grid."""
    lay_in, lay_out = op.in_layouts[0], op.out_layouts[0]
    if lay_in.windowed:
        return _windowed_grid_op(op)
    native, prefix = lay_in.to_bchw(op.inputs[0])
    nh, nw = native.shape[-2:]

    def relayout(layout: Layout, scale: tuple[int, int] | tuple[float, float]) -> Layout:
        if layout.kind != "tokens":
            return layout
        return Layout.tokens(
            (round(layout.grid[0] * scale[0]), round(layout.grid[1] * scale[1])), layout.num_prefix
        )

    def fn(grid: torch.Tensor, rows: slice) -> torch.Tensor:
        scale = (grid.shape[-2] / nh, grid.shape[-1] / nw)
        x = relayout(lay_in, scale).from_bchw(grid, None if prefix is None else prefix[rows])
        return relayout(lay_out, scale).to_bchw(op.replay(x))[0]

    return fn


_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.LeakyReLU,
    nn.Softplus,
    nn.Mish,
    nn.Identity,
)


def _elementwise(module: nn.Module | None) -> bool:
    """A parameter-free activation module of a known elementwise type (safe to split over channels)."""
    return isinstance(module, _ELEMENTWISE) and not any(True for _ in module.parameters())


def _shrink(op: OpRecord) -> int | None:
    """The integer factor by which an op shrinks its grid (None unless it does)."""
    h, w = op.in_layouts[0].grid_size(op.inputs[0])
    ho, wo = op.out_layouts[0].grid_size(op.outputs[0])
    s = h // ho if ho else 0
    return s if s > 1 and h == s * ho and w == s * wo else None


def _measure(op: OpRecord, sums: _Sums, factor: int, factors: list[int], max_bytes: float) -> int | None:
    """Add one op's energies on one batch into ``sums``; returns its stride (or None)."""
    out = op.out_layouts[0] if op.out_layouts else None
    if out is None or out.kind not in _SINGLE_GRID or not op.outputs:
        return None
    grid_out = out.to_bchw(op.outputs[0])[0]
    for rows in _batches(grid_out.shape[0], grid_out[:1].numel() * 32, max_bytes):
        chunk = grid_out[rows]
        power = power_spectrum(chunk) * chunk.shape[0] * chunk.shape[1]  # mean -> sum
        high, total = _hf_parts(power)
        sums.add("hf", high.item(), total.item())
        ring = radial_profile(power, RADIAL_BINS)[1].cpu()
        sums.radial = ring if sums.radial is None else sums.radial + ring
    lay_in = op.in_layouts[0] if len(op.inputs) == 1 and op.in_layouts else None
    if lay_in is not None and lay_in.windowed and lay_in.roles[0] == "b" and op.patchifies:
        stride = _shrink(op)  # a patchify of windows (Swin's patch merging): its stride alias
        if stride is None:
            return None
        return _stride_sums(op, window_grid(op.inputs[0], lay_in), grid_out, stride, sums, max_bytes)
    if lay_in is None or lay_in.kind not in _SINGLE_GRID:
        return None
    grid_in = lay_in.to_bchw(op.inputs[0])[0]
    fn = _grid_op(op)
    inner = getattr(op.unit, "act", None) if getattr(op.unit, "aliasscope_filtered", False) else None
    elementwise = _elementwise(op.unit) and op.layout.kind != "tokens"
    if inner is not None:  # a filtered nonlinearity: measure its activation on the grid it runs on
        grid_in = op.unit.resample_up(grid_in)
        fn = lambda x, rows: inner(x)  # noqa: E731 (pointwise: rows do not matter)
        elementwise = _elementwise(inner)
    pointwise = is_pointwise_kind(op.kind) or op.op in _POINTWISE_NORMS
    if pointwise and op.inputs[0].shape == op.outputs[0].shape:
        for s in [factor, *factors]:
            suffix = "" if s == factor else f"_s{s}"
            _pointwise_sums(fn, grid_in, s, sums, max_bytes, suffix=suffix, elementwise=elementwise)
        return None
    stride = _shrink(op)
    return None if stride is None else _stride_sums(op, grid_in, grid_out, stride, sums, max_bytes, fn)


def _stride_sums(
    op: OpRecord,
    grid_in: torch.Tensor,
    grid_out: torch.Tensor,
    stride: int,
    sums: _Sums,
    max_bytes: float,
    fn: Callable[[torch.Tensor, slice], torch.Tensor] | None = None,
) -> int:
    """Add the stride alias of a grid-shrinking op (evaluated at stride 1) into ``sums``."""
    fn = fn or _grid_op(op)
    coarse = tuple(grid_out.shape[-2:])
    for rows in _batches(grid_in.shape[0], grid_out[:1].numel() * stride * stride * 64, max_bytes):
        full = stride_one(lambda x, rows=rows: fn(x, rows), grid_in[rows], stride).double()
        sums.add_sq("stride", full - _project(full, coarse), full)
    return stride


@names_nonfinite_images
def spectral(
    model: nn.Module,
    images: torch.Tensor,
    upsample: int = 4,
    *,
    select: str | list[str] | Callable[[OpRecord], bool] | None = None,
    layouts: dict[str, Layout] | None = None,
    units: list[str] | str = (),
    batch_size: int = 8,
    max_bytes: float = 2**30,
    convergence: tuple[int, ...] = (),
    progress: bool = False,
) -> Spectrum:
    """Spectral aliasing measures for every recorded op of ``model`` on ``images`` (see :class:`Spectrum`).

    Images go through the model ``batch_size`` at a time and every FFT works on batch chunks of about
    ``max_bytes`` (default 1 GiB), so memory stays bounded whatever the number of images; the
    measures are energy ratios pooled over all images and do not depend on the chunking.
    ``convergence=(2, 8)`` also measures the pointwise ops at those factors.
    """
    from tqdm.auto import tqdm

    from ._borrow import borrowed, check_images
    from .capture import record

    model = check_model(model)
    images = check_images(images, model)
    upsample = check_int("upsample (the upsampling factor)", upsample, minimum=2)
    if isinstance(convergence, int | str):
        convergence = (convergence,)
    factors = sorted({check_int("each convergence factor", f, minimum=2) for f in convergence} - {upsample})
    batch_size = check_int("batch_size", batch_size)
    names: list[str] = []
    kinds: list[str] = []
    lays: list[str] = []
    sums: list[_Sums] = []
    strides: list[int | None] = []
    with borrowed(model), torch.no_grad():
        chunks = images.split(batch_size)
        for c, chunk in enumerate(
            tqdm(chunks, desc="spectra", unit="batch", disable=not progress or len(chunks) < 2)
        ):
            with record(model, layouts=layouts, units=units) as rec:
                out = model(chunk)
            check_finite_output(model, chunk, out)
            keep = selected_ops(rec.ops, select)
            ops = [rec.ops[i] for i in keep]
            if c == 0:
                names, kinds, lays = (
                    [o.name for o in ops],
                    [o.kind for o in ops],
                    [str(o.layout) for o in ops],
                )
                sums, strides = [_Sums() for _ in ops], [None] * len(ops)
            elif [o.name for o in ops] != names:
                raise RuntimeError(
                    "the model ran different ops on different batches; spectral needs a static graph"
                )
            for j, op in enumerate(tqdm(ops, desc="ops", leave=False, disable=not progress)):
                strides[j] = _measure(op, sums[j], upsample, factors, max_bytes)
            del rec, ops

    def col(key: str) -> torch.Tensor:
        return torch.tensor([s.ratio(key) for s in sums], dtype=torch.float64)

    _no_ring = torch.full((RADIAL_BINS,), float("nan"), dtype=torch.float64)

    return Spectrum(
        names=names,
        kinds=kinds,
        layouts=lays,
        alias_ratio=col("alias"),
        aliasing_error=col("error"),
        stride_alias=col("stride"),
        hf_fraction=col("hf"),
        upsample=upsample,
        strides=strides,
        convergence={f: (col(f"alias_s{f}"), col(f"error_s{f}")) for f in factors},
        radial=torch.stack([s.radial if s.radial is not None else _no_ring for s in sums]) if sums else None,
    )
