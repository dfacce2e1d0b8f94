"""Generators: each is the derivative at 0 of its resampler; exactness, consistency, linearity."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_images, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from aliasscope._resampling import paper_coordinates, resample
from aliasscope.generators import apply_generator, get_generator
from aliasscope.layouts import BCHW, BHWC, INVARIANT, Layout
from aliasscope.transforms import SPATIAL_TRANSFORMS, TRANSFORMS, get_transform


def symmetric_fd(x: torch.Tensor, name: str, generator: str, eps: float = 1e-7) -> torch.Tensor:
    return (resample(x, name, eps, generator) - resample(x, name, -eps, generator)) / (2 * eps)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("generator", ["central", "fourier"])
def test_generator_is_the_derivative_of_its_resampler(name: str, generator: str) -> None:
    x = random_images(2, 3, 14, 17)
    # the bilinear cross term makes the symmetric difference O(eps) off for 2-D vector fields
    assert rel_err(apply_generator(x, name, generator), symmetric_fd(x, name, generator)) < 1e-5


def test_central_is_the_central_difference_with_reflected_borders() -> None:
    x = random_images(1, 1, 5, 6)
    d = apply_generator(x, "translate_x", "central")[0, 0]
    w = x.shape[-1]
    xi = x[0, 0]
    expected = torch.zeros_like(xi)
    expected[:, 1:-1] = (xi[:, 2:] - xi[:, :-2]) / 2
    # border: reflection makes x[-1] = x[1], x[W] = x[W-2], so the central difference is 0 there
    torch.testing.assert_close(d, expected * (w / 2), rtol=0, atol=1e-12)


def test_fourier_is_exact_on_trigonometric_polynomials() -> None:
    h, w = 16, 24
    i = torch.arange(w, dtype=torch.float64)[None, :]
    j = torch.arange(h, dtype=torch.float64)[:, None]
    x = (torch.cos(2 * math.pi * 3 * i / w + 0.3) * torch.sin(2 * math.pi * 2 * j / h))[None, None]
    d = apply_generator(x, "translate_x", "fourier")[0, 0]
    exact = (
        -(2 * math.pi * 3 / w) * torch.sin(2 * math.pi * 3 * i / w + 0.3) * torch.sin(2 * math.pi * 2 * j / h)
    )
    torch.testing.assert_close(d, exact * (w / 2), rtol=0, atol=1e-12)
    nyquist = torch.cos(math.pi * i).expand(h, w)[None, None]  # its interpolant's derivative is 0 on the grid
    assert apply_generator(nyquist, "translate_x", "fourier").abs().max() < 1e-12


def _paper_stencil(x: torch.Tensor, name: str) -> torch.Tensor:
    """Independent closed form of the reference generator: a one-sided bilinear derivative whose
    cell is floor() of the float32 grid, reflected indices, times the grid's velocity."""
    tr = get_transform(name)
    h, w = x.shape[-2:]
    u, v = paper_coordinates(tr, torch.zeros(()), h, w, "cpu")
    u0, v0 = torch.floor(u), torch.floor(v)
    fu, fv = (u - u0).double(), (v - v0).double()
    gx = torch.linspace(-1, 1, w, dtype=torch.float64)[None, :]
    gy = torch.linspace(-1, 1, h, dtype=torch.float64)[:, None]
    vx, vy = tr.vector_field(gx, gy)
    du, dv = vx * (w - 1) / 2, vy * (h - 1) / 2

    def ref(i: torch.Tensor, n: int) -> torch.Tensor:
        return ((n - 1) - ((n - 1) - i.abs()).abs()).long()

    iu0, iu1, iv0, iv1 = ref(u0, w), ref(u0 + 1, w), ref(v0, h), ref(v0 + 1, h)
    a, b = x[..., iv0, iu0], x[..., iv0, iu1]
    c, d = x[..., iv1, iu0], x[..., iv1, iu1]
    return du * ((1 - fv) * (b - a) + fv * (d - c)) + dv * ((1 - fu) * (c - a) + fu * (d - b))


@pytest.mark.parametrize("name", ["translate_x", "translate_y", "rotate", "scale", "hyperbolic_rotate"])
def test_paper_matches_independent_one_sided_stencil(name: str) -> None:
    x = random_images(2, 3, 23, 30)
    # float32 velocities: ~1e-6 rounding; a wrong cell (side of the stencil) would be O(1) off
    torch.testing.assert_close(
        apply_generator(x, name, "paper"), _paper_stencil(x, name), rtol=1e-5, atol=1e-5
    )


def test_paper_flips_to_backward_differences_on_36_of_224_columns() -> None:
    w = 224
    i = torch.arange(w, dtype=torch.float64)
    x = (i**2).expand(1, 1, 2, w).clone()
    d = apply_generator(x, "translate_x", "paper")[0, 0, 0] / ((w - 1) / 2)
    forward, backward = 2 * i + 1, 2 * i - 1
    n_backward = int((d - backward).abs().lt(1e-6).sum())
    n_forward = int((d - forward).abs().lt(1e-6).sum())
    assert n_backward == 36
    assert n_forward + n_backward == w - 1  # the last column reflects: x[W] -> x[W-2]


def test_resolution_consistent_coordinates() -> None:
    """A horizontal ramp in image coordinates has d/dg = 1 at every resolution with central/fourier
    units; the paper's align_corners=True units give (W - 1) / W: 0.9955 at 224 vs 0.9286 at 14."""
    for w in (14, 28, 224):
        g = (2 * torch.arange(w, dtype=torch.float64) + 1) / w - 1  # pixel centres
        x = g.expand(1, 1, 4, w).clone()
        central = apply_generator(x, "translate_x", "central")[0, 0, :, 1:-1]
        torch.testing.assert_close(central, torch.ones_like(central), rtol=0, atol=1e-12)
        paper = apply_generator(x, "translate_x", "paper")[0, 0, :, 1:-1]
        torch.testing.assert_close(paper, torch.full_like(paper, (w - 1) / w), rtol=0, atol=1e-5)


@pytest.mark.parametrize("w", [16, 32, 64])
def test_fourier_samples_the_continuous_derivative_at_any_resolution(w: int) -> None:
    """A band-limited periodic image sampled at W and W/2: D gives V . grad f at the pixel centres."""
    g = (2 * torch.arange(w, dtype=torch.float64) + 1) / w - 1
    gx, gy = g[None, :], g[:, None]
    f = torch.sin(math.pi * (2 * gx + gy)) + torch.cos(math.pi * 3 * gy)
    fx = 2 * math.pi * torch.cos(math.pi * (2 * gx + gy))
    fy = math.pi * torch.cos(math.pi * (2 * gx + gy)) - 3 * math.pi * torch.sin(math.pi * 3 * gy)
    for name in SPATIAL_TRANSFORMS:
        vx, vy = get_transform(name).vector_field(gx, gy)
        d = apply_generator(f[None, None], name, "fourier")[0, 0]
        torch.testing.assert_close(d, vx * fx + vy * fy, rtol=0, atol=1e-9)


@pytest.mark.parametrize("generator", ["central", "fourier"])
def test_generator_is_linear_in_the_vector_field(generator: str) -> None:
    x = random_images(2, 2, 12, 15)

    def d(name: str) -> torch.Tensor:
        return apply_generator(x, name, generator)

    torch.testing.assert_close(d("rotate"), d("shear_x") - d("shear_y"), rtol=0, atol=1e-12)
    torch.testing.assert_close(d("hyperbolic_rotate"), d("shear_x") + d("shear_y"), rtol=0, atol=1e-12)
    torch.testing.assert_close(d("scale"), -(d("stretch_x") + d("stretch_y")), rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(list(TRANSFORMS)),
    generator=st.sampled_from(["central", "fourier", "paper"]),
    a=st.floats(-3, 3),
    b=st.floats(-3, 3),
    h=st.integers(2, 11),
    w=st.integers(2, 11),
)
def test_generator_is_linear_in_the_image(
    name: str, generator: str, a: float, b: float, h: int, w: int
) -> None:
    x, y = random_images(1, 2, h, w, seed=1), random_images(1, 2, h, w, seed=2)
    lhs = apply_generator(a * x + b * y, name, generator)
    rhs = a * apply_generator(x, name, generator) + b * apply_generator(y, name, generator)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("generator", ["central", "paper", "fourier"])
def test_constant_images_have_zero_spatial_derivative(generator: str) -> None:
    x = torch.full((1, 3, 9, 13), 0.7, dtype=torch.float64)
    for name in SPATIAL_TRANSFORMS:
        assert apply_generator(x, name, generator).abs().max() < 1e-6


def test_brightness_generator_is_identity_on_images_and_zero_on_invariants() -> None:
    x = random_images(2, 3, 5, 5)
    for generator in ("central", "paper", "fourier"):
        torch.testing.assert_close(apply_generator(x, "brightness", generator), x)
    assert apply_generator(x[:, :, 0, 0], "brightness", layout=INVARIANT).abs().max() == 0


def test_layouts_agree_with_bchw() -> None:
    x = random_images(2, 4, 6, 5)
    d = apply_generator(x, "rotate", "central", BCHW)
    d_hwc = apply_generator(x.permute(0, 2, 3, 1), "rotate", "central", BHWC)
    torch.testing.assert_close(d_hwc, d.permute(0, 2, 3, 1))
    tokens = torch.cat([torch.randn(2, 1, 4, dtype=torch.float64), x.flatten(2).transpose(1, 2)], dim=1)
    d_tok = apply_generator(tokens, "rotate", "central", Layout.tokens((6, 5), num_prefix=1))
    assert d_tok[:, 0].abs().max() == 0
    torch.testing.assert_close(d_tok[:, 1:], d.flatten(2).transpose(1, 2))
    assert apply_generator(x[:, :, 0, 0], "rotate", layout=INVARIANT).abs().max() == 0


def test_unknown_generator_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown generator 'sobel'.*central.*paper.*fourier"):
        get_generator("sobel")
    with pytest.raises(ValueError, match="central, paper, fourier"):
        apply_generator(random_images(), "rotate", "sobel")


@pytest.mark.parametrize("generator", ["central", "fourier", "paper"])
def test_generator_on_every_layout_equals_the_generator_on_the_image_grid(generator: str) -> None:
    """BHWC, tokens with prefix tokens and a (B, heads, N, N) attention map: D acts on each spatial
    group as on the (B, C, H, W) image it came from; prefix tokens get 0."""
    from aliasscope.layouts import Layout

    torch.manual_seed(0)
    img = torch.randn(2, 3, 4, 5)
    d_img = apply_generator(img, "rotate", generator)
    bhwc = apply_generator(img.permute(0, 2, 3, 1), "rotate", generator, Layout(("b", "h", "w", "c")))
    torch.testing.assert_close(bhwc, d_img.permute(0, 2, 3, 1), rtol=0, atol=1e-6)
    tokens = torch.cat([torch.randn(2, 2, 3), img.flatten(2).transpose(1, 2)], dim=1)
    d_tok = apply_generator(tokens, "rotate", generator, Layout.tokens((4, 5), 2))
    assert d_tok[:, :2].abs().max() == 0
    torch.testing.assert_close(d_tok[:, 2:], d_img.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)
    attn = torch.randn(2, 3, 21, 21)
    d_attn = apply_generator(attn, "rotate", generator, Layout(("b", "c", "n", "n"), (4, 5), 1))
    rows = apply_generator(attn[:, :, 1:, :].transpose(2, 3).reshape(2, 3 * 21, 4, 5), "rotate", generator)
    cols = apply_generator(attn[:, :, :, 1:].reshape(2, 3 * 21, 4, 5), "rotate", generator)
    want = torch.zeros_like(attn)
    want[:, :, 1:, :] += rows.reshape(2, 3, 21, 20).transpose(2, 3)
    want[:, :, :, 1:] += cols.reshape(2, 3, 21, 20)
    torch.testing.assert_close(d_attn, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("generator", ["central", "fourier"])
def test_generator_on_swin_windows_equals_the_generator_on_the_reassembled_grid(generator: str) -> None:
    from aliasscope.layouts import Layout

    torch.manual_seed(0)
    b, h, w, c, wh, ww = 2, 6, 8, 3, 3, 4
    grid = torch.randn(b, h, w, c)

    def partition(x: torch.Tensor) -> torch.Tensor:  # timm's window_partition, then flattened windows
        x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, wh * ww, c)

    windows = Layout(("bw", "ni", "c"), (h, w), 0, (wh, ww))
    got = apply_generator(partition(grid), "rotate", generator, windows)
    want = partition(apply_generator(grid, "rotate", generator, Layout(("b", "h", "w", "c"))))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="window"):
        Layout(("bw", "ni", "c"), (h, w))
