"""Finite group elements ``rho(t)`` acting on (B, C, H, W) images, one resampler per generator.

Each generator in :mod:`aliasscope.generators` is the ``t``-derivative at 0 of one of these
resamplers, so :func:`aliasscope.lie.finite_difference` can check a generator by resampling at
``+-eps``:

=========  ======================================================================================
name       resampler
=========  ======================================================================================
central    bilinear interpolation at pixel centres (``align_corners=False`` units: pixel ``i``
           sits at ``g = (2 i + 1) / W - 1``), borders reflected about the edge pixels (index
           ``-1 -> 1``). Its symmetric derivative at t = 0 is the central difference.
paper      the paper's reference resampler: grid from ``affine_grid(A(t), align_corners=True)`` in
           float32, ``floor`` of the continuous pixel coordinate ``(g + 1) / 2 * (W - 1)``,
           bilinear weights, indices reflected the same way.
fourier    the image's trigonometric (periodic, band-limited) interpolant evaluated at the moved
           points; the Nyquist term is split symmetrically (a cosine). Costs O((HW)^2) per
           channel: meant for checks on small images.
=========  ======================================================================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .transforms import Transform, get_transform

__all__ = ["resample", "pixel_centres", "RESAMPLERS"]

FOURIER_MAX_PIXELS = 128 * 128


def pixel_centres(n: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """Normalised coordinates of ``n`` pixel centres: ``(2 i + 1) / n - 1`` (resolution-consistent)."""
    return (2 * torch.arange(n, dtype=dtype, device=device) + 1) / n - 1


def _reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Whole-sample reflection of integer indices about 0 and n - 1 (``-1 -> 1``, ``n -> n - 2``)."""
    if n == 1:
        return torch.zeros_like(i)
    return (n - 1) - ((n - 1) - i.abs()).abs()


def bilinear_reflect(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``x`` (B, C, H, W) at continuous pixel coordinates.

    ``u`` (along W) and ``v`` (along H) have shape (H', W') and are shared by the batch. Weights are
    computed in the coordinates' dtype from ``floor`` of the coordinates (the floor carries no
    derivative), then the four corner indices are reflected; the arithmetic follows the paper's
    reference resampler term by term so that ``generator="paper"`` reproduces it.
    """
    b, c, h, w = x.shape
    hh, ww = u.shape
    u0 = torch.floor(u).detach()
    v0 = torch.floor(v).detach()
    u1, v1 = u0 + 1, v0 + 1
    w_nw = (u1 - u) * (v1 - v)
    w_ne = (u - u0) * (v1 - v)
    w_sw = (u1 - u) * (v - v0)
    w_se = (u - u0) * (v - v0)
    iu0, iu1 = _reflect_index(u0, w).long(), _reflect_index(u1, w).long()
    iv0, iv1 = _reflect_index(v0, h).long(), _reflect_index(v1, h).long()
    flat = x.reshape(b, c, h * w)

    def corner(iv: torch.Tensor, iu: torch.Tensor) -> torch.Tensor:
        return flat[:, :, (iv * w + iu).reshape(-1)].reshape(b, c, hh, ww)

    return (
        corner(iv0, iu0) * w_nw + corner(iv0, iu1) * w_ne + corner(iv1, iu0) * w_sw + corner(iv1, iu1) * w_se
    )


def _moved_grid(tr: Transform, t: torch.Tensor, h: int, w: int, dtype: torch.dtype, device) -> tuple:
    """Normalised sample points ``A(t) [g; 1]`` for pixel-centre coordinates ``g``."""
    a = tr.matrix(t.to(dtype)).to(device)
    gx = pixel_centres(w, dtype, device)[None, :]
    gy = pixel_centres(h, dtype, device)[:, None]
    sx = a[0, 0] * gx + a[0, 1] * gy + a[0, 2]
    sy = a[1, 0] * gx + a[1, 1] * gy + a[1, 2]
    return sx, sy


def _resample_central(x: torch.Tensor, tr: Transform, t: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sx, sy = _moved_grid(tr, t, h, w, cdtype, x.device)
    u = ((sx + 1) * w - 1) / 2
    v = ((sy + 1) * h - 1) / 2
    return bilinear_reflect(x, u.to(x.dtype), v.to(x.dtype))


def paper_coordinates(tr: Transform, t: torch.Tensor, h: int, w: int, device) -> tuple:
    """The reference code's continuous pixel coordinates, in float32 as it computes them."""
    theta = tr.matrix(t.to(torch.float32)).to(device)[None]
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=True)[0]
    u = ((grid[..., 0] + 1) / 2) * (w - 1)
    v = ((grid[..., 1] + 1) / 2) * (h - 1)
    return u, v


def _resample_paper(x: torch.Tensor, tr: Transform, t: torch.Tensor) -> torch.Tensor:
    u, v = paper_coordinates(tr, t, x.shape[-2], x.shape[-1], x.device)
    return bilinear_reflect(x, u, v)


def _trig_basis(coord: torch.Tensor, n: int) -> torch.Tensor:
    """exp(2 pi i k coord / n) for the integer frequencies of an n-point DFT (Nyquist: cosine)."""
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=coord.dtype, device=coord.device)
    phase = 2 * math.pi * coord[..., None] * k / n
    basis = torch.polar(torch.ones_like(phase), phase)
    if n % 2 == 0:
        basis[..., n // 2] = torch.cos(math.pi * coord).to(basis.dtype)
    return basis


def _resample_fourier(x: torch.Tensor, tr: Transform, t: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    if h * w > FOURIER_MAX_PIXELS:
        raise ValueError(
            f"the fourier resampler costs O((HW)^2) and is meant for checks on small images; "
            f"got {h}x{w} (> {FOURIER_MAX_PIXELS} pixels)"
        )
    cdtype = torch.float64
    sx, sy = _moved_grid(tr, t, h, w, cdtype, x.device)
    u = (((sx + 1) * w - 1) / 2).reshape(-1)
    v = (((sy + 1) * h - 1) / 2).reshape(-1)
    spec = torch.fft.fft2(x.to(cdtype))
    ex = _trig_basis(u, w)  # (P, W)
    ey = _trig_basis(v, h)  # (P, H)
    partial = torch.einsum("bcyx,px->bcyp", spec, ex)
    out = torch.einsum("bcyp,py->bcp", partial, ey).real / (h * w)
    return out.reshape(b, c, h, w).to(x.dtype)


RESAMPLERS = {"central": _resample_central, "paper": _resample_paper, "fourier": _resample_fourier}


def resample(
    x: torch.Tensor, transform: str | Transform, t: float | torch.Tensor, generator: str = "central"
) -> torch.Tensor:
    """Apply the finite transformation ``rho(t)`` to (B, C, H, W) images.

    ``generator`` picks the resampler whose derivative at 0 that generator is (see module doc).
    """
    tr = get_transform(transform)
    t = torch.as_tensor(t, dtype=torch.float64)
    if not tr.is_spatial:
        return x * (1 + t.to(x.dtype))
    try:
        fn = RESAMPLERS[generator]
    except KeyError:
        raise ValueError(
            f"unknown generator {generator!r}; valid generators: {', '.join(RESAMPLERS)}"
        ) from None
    return fn(x, tr, t)
