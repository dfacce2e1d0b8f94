"""Generators: how the derivative at t = 0 of a transformation is discretised on a pixel grid.

``D x = d/dt rho(t) x |_{t=0}``. For spatial transforms ``D x = V . grad x``, with ``V`` the
transform's vector field (:meth:`aliasscope.transforms.Transform.vector_field`); the generators
differ in how they take the spatial gradient of sampled data and in their coordinate units.

``"central"`` (default)
    The symmetric derivative of the bilinear interpolant at the sample points, i.e. the average of
    its left and right derivatives = central differences ``(x[i+1] - x[i-1]) / 2``, borders
    reflected (so the derivative across the edge pixel is 0). Resolution-consistent coordinates
    (pixel centres at ``(i + 0.5) / W``, as ``align_corners=False``): ``t = 1`` moves every grid by
    ``W / 2`` pixels of that grid, i.e. by the same physical amount at every resolution, so a
    stride-s layer sees the same transformation on its input and its output. Well defined and
    independent of float precision.

``"paper"``
    Bit-compatible with the paper's reference code (Gruver et al. 2023): the t-derivative at 0, by
    forward-mode AD, of its resampler (``affine_grid(A(t), align_corners=True)`` in float32, then
    bilinear sampling from ``floor`` of the continuous pixel coordinates ``(g + 1) / 2 * (W - 1)``,
    borders reflected). At a sample point that is a *one-sided* difference, and which side depends
    on float rounding of the grid: at W = 224 in float32, 36 of the 224 columns land just below
    their integer and get a backward difference while the others get a forward one; computing the
    grid in float64 flips a different set, and per-image values move by tens of percent. Its units
    (``align_corners=True``) are also not the same group element at different resolutions:
    ``t = 1`` moves a 224 px image by 111.5 px but a 14x14 token grid by 6.5 tokens = 104 px, a 7%
    mismatch that shows up as spurious error in every downsampling layer. Use it to compare with
    published numbers, not to diagnose.

``"fourier"``
    Band-limited: the exact derivative of the image's trigonometric interpolant (FFT gradient,
    Nyquist term zeroed, as the derivative of its symmetric cosine vanishes on the grid), along the
    same vector field and in the same resolution-consistent units as ``"central"``. With it a
    circularly padded convolution has a translation Lie derivative of exactly 0 (float precision).

Brightness (``x -> (1 + t) x``) has ``D x = x`` under every generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._forward_mode import jvp
from ._resampling import bilinear_reflect, paper_coordinates, pixel_centres
from .layouts import BCHW, Layout, map_spatial
from .transforms import Transform, get_transform

__all__ = ["GENERATORS", "apply_generator", "get_generator", "generator_names"]


def _central_diff(x: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """``scale * (x[i+1] - x[i-1]) / 2`` along ``dim`` (-1 or -2), whole-sample reflection at the borders.

    Reflection makes x[-1] = x[1] and x[n] = x[n-2], so the difference is exactly 0 on the two
    border lines; the interior is a plain central difference.
    """
    if torch.is_grad_enabled() and x.requires_grad:  # differentiable path (no out= writes)
        pad = (1, 1, 0, 0) if dim == -1 else (0, 0, 1, 1)
        ahead = x[..., 2:] if dim == -1 else x[..., 2:, :]
        behind = x[..., :-2] if dim == -1 else x[..., :-2, :]
        return torch.nn.functional.pad((ahead - behind) * (0.5 * scale), pad)
    out = torch.empty_like(x)
    if dim == -1:
        inner, ahead, behind, edges = out[..., 1:-1], x[..., 2:], x[..., :-2], (out[..., :1], out[..., -1:])
    else:
        inner, ahead, behind = out[..., 1:-1, :], x[..., 2:, :], x[..., :-2, :]
        edges = (out[..., :1, :], out[..., -1:, :])
    for edge in edges:
        edge.zero_()
    if x.shape[dim] > 2:
        torch.sub(ahead, behind, out=inner)
        inner.mul_(0.5 * scale)
    return out


def _fourier_diff(x: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """``scale`` times the derivative (per pixel) of the trigonometric interpolant along ``dim``;
    the Nyquist term is zeroed."""
    n = x.shape[dim]
    k = torch.arange(n // 2 + 1, device=x.device, dtype=x.dtype)
    mult = (2j * math.pi * scale / n) * k
    if n % 2 == 0:
        mult[-1] = 0
    shape = [1] * x.dim()
    shape[dim] = n // 2 + 1
    return torch.fft.irfft(torch.fft.rfft(x, dim=dim) * mult.reshape(shape), n=n, dim=dim)


def _along_field(x: torch.Tensor, tr: Transform, diff: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``V . grad x`` in resolution-consistent units: d/dg = (n / 2) d/d(pixel)."""
    h, w = x.shape[-2:]
    (a, b, c), (d, e, f) = tr.generator_matrix
    out: torch.Tensor | None = None
    for (p, q, r), dim, n in (((a, b, c), -1, w), ((d, e, f), -2, h)):
        if not (p or q or r):
            continue
        if p or q:  # a vector field that varies over the image
            gx = pixel_centres(w, x.dtype, x.device)[None, :]
            gy = pixel_centres(h, x.dtype, x.device)[:, None]
            term = diff(x, dim, n / 2) * (p * gx + q * gy + r)
        else:  # constant (translation): a scalar factor, folded into the difference
            term = diff(x, dim, r * n / 2)
        out = term if out is None else out + term
    return torch.zeros_like(x) if out is None else out


def central(x: torch.Tensor, tr: Transform) -> torch.Tensor:
    """Central-difference generator on (B, C, H, W) (see module doc)."""
    return _along_field(x, tr, _central_diff)


def fourier(x: torch.Tensor, tr: Transform) -> torch.Tensor:
    """Band-limited (FFT) generator on (B, C, H, W) (see module doc)."""
    return _along_field(x, tr, _fourier_diff)


def paper(x: torch.Tensor, tr: Transform) -> torch.Tensor:
    """The reference code's generator: d/dt at 0 of its float32 resampler, by forward-mode AD."""
    h, w = x.shape[-2:]

    def moved(t: torch.Tensor) -> torch.Tensor:
        u, v = paper_coordinates(tr, t, h, w, x.device)
        return bilinear_reflect(x, u, v)

    t0 = torch.zeros((), dtype=torch.float32)
    _, dx = jvp(moved, t0, torch.ones_like(t0))
    return dx


GENERATORS: dict[str, Callable[[torch.Tensor, Transform], torch.Tensor]] = {
    "central": central,
    "paper": paper,
    "fourier": fourier,
}
"""Registry of generators, by name."""


def generator_names() -> list[str]:
    """All registered generator names."""
    return list(GENERATORS)


def get_generator(name: str) -> Callable[[torch.Tensor, Transform], torch.Tensor]:
    """Look a generator up by name; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return GENERATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown generator {name!r}; valid generators: {', '.join(GENERATORS)}") from None


def apply_generator(
    x: torch.Tensor,
    transform: str | Transform,
    generator: str = "central",
    layout: Layout = BCHW,
) -> torch.Tensor:
    """``D x``: the derivative at t = 0 of ``transform`` acting on ``x``, discretised by ``generator``.

    Parameters
    ----------
    x:
        A tensor in ``layout`` (default (B, C, H, W)).
    transform:
        A name from :data:`aliasscope.transforms.TRANSFORMS` or a :class:`Transform`.
    generator:
        ``"central"`` (default), ``"paper"`` or ``"fourier"``.
    layout:
        How ``x`` maps to an image grid. Invariant tensors get ``D x = 0`` (rho acts on them as the
        identity). Prefix tokens (class, distillation, register) get 0 under spatial transforms;
        brightness scales every entry of an image-like tensor, prefix tokens included.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``.
    """
    tr = get_transform(transform)
    gen = get_generator(generator)
    if not layout.is_image_like:
        return torch.zeros_like(x)
    if not tr.is_spatial:
        return x.clone()
    return map_spatial(x, layout, lambda img: gen(img, tr))
