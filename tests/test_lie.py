"""End-to-end Lie derivatives: finite differences vs autodiff, analytic zeros, outputs, metrics."""

from __future__ import annotations

import csv
import io
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import random_images, rel_err, smooth_cnn
from torch import nn

from aliasscope._forward_mode import _sdpa_math, jvp
from aliasscope._reference import reference_lie_derivative
from aliasscope.layouts import Layout
from aliasscope.lie import equivariance_metrics, finite_difference, lie_derivative
from aliasscope.transforms import SPATIAL_TRANSFORMS, TRANSFORMS


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("generator", ["central", "fourier"])
@pytest.mark.parametrize("output", ["logits", "softmax"])
def test_lie_derivative_matches_finite_difference(name: str, generator: str, output: str) -> None:
    net, x = smooth_cnn(), random_images(2, 3, 20, 24)
    lie = lie_derivative(net, x, name, generator=generator, output=output)
    fd = finite_difference(net, x, name, generator=generator, output=output)
    assert lie.shape == (2, 5)
    assert rel_err(lie, fd) < 1e-4


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_paper_generator_reproduces_the_reference_procedure(name: str) -> None:
    net, x = smooth_cnn(), random_images(3, 3, 24, 28)
    ours = lie_derivative(net, x, name, generator="paper", output="softmax")
    # T_0 x is ~1e-6 px away from x: only that separates the two on a smooth network
    assert rel_err(ours, reference_lie_derivative(net, x, name)) < 1e-4


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("generator", ["central", "fourier"])
def test_image_like_outputs_match_finite_difference(name: str, generator: str) -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 2, 3, padding=1)).double()
    x = random_images(2, 3, 12, 14)
    lie = lie_derivative(net, x, name, generator=generator)
    assert lie.shape == (2, 2, 12, 14)
    assert rel_err(lie, finite_difference(net, x, name, generator=generator)) < 1e-4


def _pointwise_linear_model() -> nn.Module:
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return nn.Sequential(nn.Conv2d(3, 6, 1), bn, nn.Conv2d(6, 4, 1, bias=False)).double().eval()


@pytest.mark.parametrize("generator", ["central", "paper", "fourier"])
@pytest.mark.parametrize("name", SPATIAL_TRANSFORMS)
def test_pointwise_linear_models_have_zero_lie_derivative(generator: str, name: str) -> None:
    x = random_images(2, 3, 10, 13)
    lie = lie_derivative(_pointwise_linear_model(), x, name, generator=generator)
    # paper: its float32 stencil weights' derivatives sum to ~1e-7, not 0, so D(bias) is ~1e-8
    assert lie.abs().max() < (1e-6 if generator == "paper" else 1e-10)


def test_relu_is_brightness_equivariant() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False)
    ).double()
    lie = lie_derivative(net, random_images(), "brightness")
    assert lie.abs().max() < 1e-12


@pytest.mark.parametrize("kernel", [3, 5])
def test_circular_conv_is_exactly_translation_equivariant_with_fourier(kernel: int) -> None:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 5, kernel, padding=kernel // 2, padding_mode="circular"),
        nn.Conv2d(5, 5, kernel, padding=kernel // 2, padding_mode="circular", groups=5),
    ).double()
    x = random_images(2, 3, 16, 18)
    for name in ("translate_x", "translate_y"):
        fourier = lie_derivative(net, x, name, generator="fourier")
        assert fourier.abs().max() < 1e-11
        # the central stencil commutes with the conv too, but only away from the reflected border
        central = lie_derivative(net, x, name, generator="central")
        assert central[..., kernel:-kernel, kernel:-kernel].abs().max() < 1e-11
        assert central.abs().max() > 1e-3


def test_zero_padded_conv_is_not_equivariant_at_the_border() -> None:
    torch.manual_seed(4)
    net = nn.Conv2d(3, 4, 3, padding=1).double()
    lie = lie_derivative(net, random_images(), "translate_x", generator="fourier")
    assert lie.abs().max() > 1e-2


def test_token_outputs_use_the_model_grid() -> None:
    vit = (
        timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0)
        .double()
        .eval()
    )

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit
            self.patch_embed, self.num_prefix_tokens = vit.patch_embed, vit.num_prefix_tokens

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit.forward_features(x)

    x = random_images(2, 3, 32, 32)
    model = Features()
    lie = lie_derivative(model, x, "translate_x")
    assert lie.shape == (2, 17, 192)
    fd = finite_difference(model, x, "translate_x")
    assert rel_err(lie, fd) < 1e-4
    explicit = lie_derivative(model, x, "translate_x", output_layout=Layout.tokens((4, 4), num_prefix=1))
    torch.testing.assert_close(lie, explicit)


def test_fast_jvp_rules_equal_pytorch_forward_ad() -> None:
    net, x = smooth_cnn(), random_images()
    v = torch.randn_like(x)
    with torch.no_grad():
        y0, t0 = torch.func.jvp(net, (x,), (v,))
        y1, t1 = jvp(net, x, v)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(t1, t0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs", [{}, {"is_causal": True}, {"scale": 0.3}, {"mask": "bool"}, {"mask": "float"}]
)
def test_attention_decomposition_equals_fused_kernel(kwargs: dict) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=g) for _ in range(3))
    mask = kwargs.pop("mask", None)
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(5, 5, generator=g) > 0.3
        kwargs["attn_mask"].fill_diagonal_(True)
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(5, 5, dtype=torch.float64, generator=g)
    torch.testing.assert_close(
        _sdpa_math(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs)
    )


def test_vit_with_fused_attention_runs_in_forward_mode() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    lie = lie_derivative(vit, x, "rotate", output="softmax")
    fd = finite_difference(vit.double(), x.double(), "rotate", output="softmax")
    assert rel_err(lie.double(), fd) < 1e-3


def test_equivariance_metrics_values_and_exports(tmp_path) -> None:
    net, x = smooth_cnn(), random_images(5, 3, 16, 16)
    m = equivariance_metrics(net, x, ["translate_x", "rotate"], batch_size=2, progress=False)
    assert m.values.shape == (5, 2)
    expected = lie_derivative(net, x, "rotate", output="softmax").abs().mean(1)
    torch.testing.assert_close(m.values[:, 1], expected)
    mean, lo, hi = m.interval()["rotate"]
    assert lo < mean < hi
    rows = list(csv.DictReader(io.StringIO(m.to_csv(tmp_path / "m.csv"))))
    assert len(rows) == 5 and float(rows[3]["rotate"]) == pytest.approx(expected[3].item(), rel=1e-8)
    assert (tmp_path / "m.csv").read_text() == m.to_csv()
    d = json.loads(m.to_json(tmp_path / "m.json"))
    assert d["transforms"]["translate_x"]["n"] == 5
    assert d["per_image"]["rotate"] == pytest.approx(expected.tolist())
    assert "rotate" in str(m) and "95% interval" in m.summary()


def test_equivariance_metrics_default_covers_every_transform() -> None:
    m = equivariance_metrics(smooth_cnn(), random_images(2, 3, 12, 12), progress=False)
    assert m.transforms == list(TRANSFORMS)
    assert torch.isfinite(m.values).all() and (m.values > 0).all()


def test_intervals_of_skewed_nonnegative_values_stay_nonnegative() -> None:
    """Means of |L| over few images are skewed: the t-interval of these went below 0, BCa does not."""
    from scipy import stats

    from aliasscope.lie import EquivarianceMetrics

    v = torch.tensor([[1e-4], [2e-4], [1.5e-4], [3e-2], [1e-4]], dtype=torch.float64)
    n, mean, sd = 5, v.mean().item(), v.std().item()
    assert mean - stats.t.ppf(0.975, n - 1) * sd / n**0.5 < 0  # what the t-interval gave
    m = EquivarianceMetrics(v, ["rotate"], "central", "softmax")
    mean_, lo, hi = m.interval()["rotate"]
    assert mean_ == pytest.approx(mean)
    assert v.min().item() <= lo < mean < hi <= v.max().item()
    assert m.interval() == m.interval()  # seeded
    same = EquivarianceMetrics(torch.full((3, 1), 0.5, dtype=torch.float64), ["rotate"], "central", "x")
    assert same.interval()["rotate"] == (0.5, 0.5, 0.5)


def test_intervals_are_computed_once_per_set_of_values() -> None:
    from aliasscope.lie import EquivarianceMetrics

    m = EquivarianceMetrics(torch.rand(20, 2, dtype=torch.float64), ["rotate", "scale"], "central", "softmax")
    first = m.interval()
    assert m.interval() == first and len(m._intervals) == 1
    m.values[:, 0] *= 2  # an in-place change is seen: the interval is computed again
    again = m.interval()
    assert again["rotate"][0] == pytest.approx(2 * first["rotate"][0]) and again["scale"] == first["scale"]
