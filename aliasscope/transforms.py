"""One-parameter groups of image transformations and their generators as vector fields.

Every spatial transform is an affine map ``A(t)`` (2x3) acting on *normalised* coordinates
``(gx, gy)`` in ``[-1, 1]`` (``gx`` along the width, ``gy`` along the height), the convention of
:func:`torch.nn.functional.affine_grid`: the transformed image samples the original at ``A(t) [g; 1]``::

    (rho(t) x)(g) = x(A(t) [g; 1])

so its derivative at ``t = 0`` is the directional derivative of ``x`` along the vector field
``V(g) = A'(0) [g; 1]``. The matrices follow the paper's reference code exactly (Gruver et al., ICLR
2023), with one deliberate correction: the reference code's ``stretch`` set ``A = [[1 + t, 0], [0, 0]]``,
which collapses the image onto a line; here ``stretch_x`` is ``diag(1 + t, 1)`` and ``stretch_y``
``diag(1, 1 + t)``. ``brightness`` (``saturate`` in the reference code) is ``x -> (1 + t) x`` on the
tensor as it is fed to the model (after normalisation).

Add a transform by writing one :class:`Transform` and one line in :data:`TRANSFORMS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Transform",
    "TRANSFORMS",
    "SPATIAL_TRANSFORMS",
    "get_transform",
    "transform_names",
]

Matrix = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Transform:
    """A one-parameter group acting on images.

    Attributes
    ----------
    name:
        Registry name, e.g. ``"rotate"``.
    matrix:
        ``t -> A(t)``: a (2, 3) affine matrix on normalised coordinates, built from torch ops so it
        can be differentiated in ``t``; ``None`` for non-spatial transforms (brightness).
    generator_matrix:
        ``A'(0)`` as nested tuples (2x3): the vector field is ``V(g) = A'(0) [g; 1]``.
    description:
        One line for help texts.
    """

    name: str
    matrix: Matrix | None
    generator_matrix: tuple[tuple[float, float, float], tuple[float, float, float]] | None
    description: str

    @property
    def is_spatial(self) -> bool:
        """True for transforms that move pixels (all but brightness)."""
        return self.matrix is not None

    def vector_field(self, gx: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator ``V(g) = A'(0) [gx, gy, 1]`` at normalised coordinates ``(gx, gy)``.

        Returns the x (width) and y (height) components, in normalised units per unit ``t``.
        """
        if self.generator_matrix is None:
            raise ValueError(f"transform {self.name!r} is not spatial and has no vector field")
        (a, b, c), (d, e, f) = self.generator_matrix
        vx = a * gx + b * gy + c
        vy = d * gx + e * gy + f
        return vx, vy

    def affine(self, t: float | torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``A(t)`` as a (2, 3) tensor."""
        if self.matrix is None:
            raise ValueError(f"transform {self.name!r} is not spatial and has no affine matrix")
        t = torch.as_tensor(t, dtype=dtype)
        return self.matrix(t)


def _affine(rows: list[list[torch.Tensor | float]], t: torch.Tensor) -> torch.Tensor:
    """Stack scalar entries (floats or 0-d tensors depending on ``t``) into a (2, 3) matrix."""
    entries = [torch.as_tensor(v, dtype=t.dtype, device=t.device).reshape(()) for row in rows for v in row]
    return torch.stack(entries).reshape(2, 3)


def _translate_x(t: torch.Tensor) -> torch.Tensor:
    return _affine([[1.0, 0.0, t], [0.0, 1.0, 0.0]], t)


def _translate_y(t: torch.Tensor) -> torch.Tensor:
    return _affine([[1.0, 0.0, 0.0], [0.0, 1.0, t]], t)


def _rotate(t: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(t), torch.sin(t)
    return _affine([[c, s, 0.0], [-s, c, 0.0]], t)


def _scale(t: torch.Tensor) -> torch.Tensor:
    return _affine([[1 - t, 0.0, 0.0], [0.0, 1 - t, 0.0]], t)


def _shear_x(t: torch.Tensor) -> torch.Tensor:
    return _affine([[1.0, t, 0.0], [0.0, 1.0, 0.0]], t)


def _shear_y(t: torch.Tensor) -> torch.Tensor:
    return _affine([[1.0, 0.0, 0.0], [t, 1.0, 0.0]], t)


def _stretch_x(t: torch.Tensor) -> torch.Tensor:
    return _affine([[1 + t, 0.0, 0.0], [0.0, 1.0, 0.0]], t)


def _stretch_y(t: torch.Tensor) -> torch.Tensor:
    return _affine([[1.0, 0.0, 0.0], [0.0, 1 + t, 0.0]], t)


def _hyperbolic_rotate(t: torch.Tensor) -> torch.Tensor:
    c, s = torch.cosh(t), torch.sinh(t)
    return _affine([[c, s, 0.0], [s, c, 0.0]], t)


_Z = 0.0
TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in [
        Transform(
            "translate_x",
            _translate_x,
            ((_Z, _Z, 1.0), (_Z, _Z, _Z)),
            "horizontal translation, A = [[1,0,t],[0,1,0]]",
        ),
        Transform(
            "translate_y",
            _translate_y,
            ((_Z, _Z, _Z), (_Z, _Z, 1.0)),
            "vertical translation, A = [[1,0,0],[0,1,t]]",
        ),
        Transform(
            "rotate",
            _rotate,
            ((_Z, 1.0, _Z), (-1.0, _Z, _Z)),
            "rotation about the centre, A = [[cos t, sin t],[-sin t, cos t]]",
        ),
        Transform(
            "scale",
            _scale,
            ((-1.0, _Z, _Z), (_Z, -1.0, _Z)),
            "isotropic scaling about the centre, A = diag(1-t, 1-t)",
        ),
        Transform("shear_x", _shear_x, ((_Z, 1.0, _Z), (_Z, _Z, _Z)), "horizontal shear, A = [[1,t],[0,1]]"),
        Transform("shear_y", _shear_y, ((_Z, _Z, _Z), (1.0, _Z, _Z)), "vertical shear, A = [[1,0],[t,1]]"),
        Transform(
            "stretch_x",
            _stretch_x,
            ((1.0, _Z, _Z), (_Z, _Z, _Z)),
            "horizontal stretch, A = diag(1+t, 1) (the reference code's collapsed matrix fixed)",
        ),
        Transform(
            "stretch_y",
            _stretch_y,
            ((_Z, _Z, _Z), (_Z, 1.0, _Z)),
            "vertical stretch, A = diag(1, 1+t) (the reference code's collapsed matrix fixed)",
        ),
        Transform(
            "hyperbolic_rotate",
            _hyperbolic_rotate,
            ((_Z, 1.0, _Z), (1.0, _Z, _Z)),
            "hyperbolic rotation (squeeze along the diagonals), A = [[cosh t, sinh t],[sinh t, cosh t]]",
        ),
        Transform(
            "brightness", None, None, "intensity scaling x -> (1+t) x ('saturate' in the paper's code)"
        ),
    ]
}
"""Registry of all transforms, by name."""

SPATIAL_TRANSFORMS: tuple[str, ...] = tuple(n for n, t in TRANSFORMS.items() if t.is_spatial)


def transform_names() -> list[str]:
    """All registered transform names, in registry order."""
    return list(TRANSFORMS)


def get_transform(name: str | Transform) -> Transform:
    """Look a transform up by name (a :class:`Transform` passes through).

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    """
    if isinstance(name, Transform):
        return name
    try:
        return TRANSFORMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown transform {name!r}; valid transforms: {', '.join(TRANSFORMS)}") from None
