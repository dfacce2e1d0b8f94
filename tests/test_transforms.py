"""The one-parameter groups: matrices as in the paper, generators = derivatives at 0, registry errors."""

from __future__ import annotations

import math

import pytest
import torch

from aliasscope.transforms import SPATIAL_TRANSFORMS, TRANSFORMS, get_transform

EXPECTED = {  # the paper's matrices at t = 0.3 (stretch fixed: diag(1 + t, 1))
    "translate_x": [[1, 0, 0.3], [0, 1, 0]],
    "translate_y": [[1, 0, 0], [0, 1, 0.3]],
    "rotate": [[math.cos(0.3), math.sin(0.3), 0], [-math.sin(0.3), math.cos(0.3), 0]],
    "scale": [[0.7, 0, 0], [0, 0.7, 0]],
    "shear_x": [[1, 0.3, 0], [0, 1, 0]],
    "shear_y": [[1, 0, 0], [0.3, 1, 0]],
    "stretch_x": [[1.3, 0, 0], [0, 1, 0]],
    "stretch_y": [[1, 0, 0], [0, 1.3, 0]],
    "hyperbolic_rotate": [[math.cosh(0.3), math.sinh(0.3), 0], [math.sinh(0.3), math.cosh(0.3), 0]],
}


def test_registry_has_every_transform() -> None:
    assert set(TRANSFORMS) == set(EXPECTED) | {"brightness"}
    assert set(SPATIAL_TRANSFORMS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_matrices_match_the_paper(name: str) -> None:
    a = get_transform(name).affine(0.3)
    torch.testing.assert_close(a, torch.tensor(EXPECTED[name], dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_identity_at_zero_and_generator_is_derivative(name: str) -> None:
    tr = get_transform(name)
    eye = torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(tr.affine(0.0), eye, rtol=0, atol=0)
    t = torch.zeros((), dtype=torch.float64)
    _, deriv = torch.func.jvp(tr.matrix, (t,), (torch.ones_like(t),))
    torch.testing.assert_close(
        deriv, torch.tensor(tr.generator_matrix, dtype=torch.float64), rtol=0, atol=1e-15
    )
    gx, gy = torch.tensor([0.3, -0.7], dtype=torch.float64), torch.tensor([0.5, 0.1], dtype=torch.float64)
    vx, vy = tr.vector_field(gx, gy)
    ones = torch.ones_like(gx)
    torch.testing.assert_close(torch.stack([vx, vy]), deriv @ torch.stack([gx, gy, ones]))


@pytest.mark.parametrize(
    "name", ["translate_x", "translate_y", "rotate", "shear_x", "shear_y", "hyperbolic_rotate"]
)
def test_one_parameter_group_law(name: str) -> None:
    tr = get_transform(name)

    def h(t: float) -> torch.Tensor:
        return torch.cat([tr.affine(t), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])

    torch.testing.assert_close(h(0.2) @ h(-0.45), h(-0.25), rtol=0, atol=1e-14)


def test_brightness_is_not_spatial() -> None:
    tr = get_transform("brightness")
    assert not tr.is_spatial
    with pytest.raises(ValueError, match="not spatial"):
        tr.affine(0.1)


def test_unknown_transform_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown transform 'spin'.*translate_x.*brightness"):
        get_transform("spin")
