"""Bad input gets a clear error; the model comes back unchanged, also after an error half-way."""

from __future__ import annotations

import pytest
import torch
from helpers import random_images, smooth_cnn
from model_state import assert_unchanged, snapshot
from torch import nn

from aliasscope.lie import equivariance_metrics, finite_difference, lie_derivative


@pytest.mark.parametrize("fn", [lie_derivative, finite_difference])
def test_model_unchanged_in_train_mode(fn) -> None:
    net = smooth_cnn().train()
    net[2].eval()  # a mixed state must come back mixed
    snap = snapshot(net)
    fn(net, random_images(), "rotate", output="softmax")
    assert_unchanged(net, snap)


def test_model_unchanged_after_error_half_way() -> None:
    net = smooth_cnn().train()

    class Exploding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.body(x)
            self.body[0].register_forward_hook(lambda *a: None)
            raise RuntimeError("boom")

    model = Exploding().train()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="boom"):
        lie_derivative(model, random_images(), "translate_x")
    assert_unchanged(model, snap)

    def bad_head(y: torch.Tensor) -> torch.Tensor:
        raise KeyError("head failed")

    with pytest.raises(KeyError, match="head failed"):
        equivariance_metrics(model.body, random_images(), ["rotate"], output=bad_head, progress=False)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.zeros(3, 20, 24, dtype=torch.float64), ValueError, r"4-D \(B, C, H, W\).*images\[None\]"),
        (torch.zeros(2, 3, 20, dtype=torch.float64), ValueError, "4-D"),
        (torch.zeros(2, 1, 20, 24, dtype=torch.float64), ValueError, "expects 3 input channels"),
        (torch.zeros(2, 3, 20, 24, dtype=torch.int64), TypeError, "floating point"),
        (torch.zeros(2, 3, 20, 24, dtype=torch.float32), ValueError, "torch.float32 but the model.*float64"),
        (torch.zeros(0, 3, 20, 24, dtype=torch.float64), ValueError, "empty"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images(images, error, match) -> None:
    with pytest.raises(error, match=match):
        lie_derivative(smooth_cnn(), images, "rotate")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_images(bad: float) -> None:
    x = random_images(3)
    x[1, 0, 4, 4] = bad
    with pytest.raises(ValueError, match=r"NaN or inf.*\[1\]"):
        lie_derivative(smooth_cnn(), x, "rotate")


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown transform 'twist'; valid transforms: translate_x"):
        lie_derivative(smooth_cnn(), random_images(), "twist")
    with pytest.raises(
        ValueError, match="unknown generator 'sobel'; valid generators: central, paper, fourier"
    ):
        lie_derivative(smooth_cnn(), random_images(), "rotate", generator="sobel")
    with pytest.raises(ValueError, match="unknown output 'probs'"):
        lie_derivative(smooth_cnn(), random_images(), "rotate", output="probs")
    with pytest.raises(ValueError, match="unknown transform"):
        equivariance_metrics(smooth_cnn(), random_images(), ["rotate", "twist"], progress=False)


class _TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = smooth_cnn()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.net(x)
        return y, y


def test_model_returning_a_tuple() -> None:
    with pytest.raises(TypeError, match="returned a tuple, not a tensor"):
        lie_derivative(_TupleModel(), random_images(), "rotate")


def test_non_image_model() -> None:
    mlp = nn.Sequential(nn.Linear(10, 4)).double()
    with pytest.raises(ValueError, match="model failed on images of shape"):
        lie_derivative(mlp, random_images(), "rotate")


def test_softmax_needs_logits() -> None:
    conv = nn.Conv2d(3, 4, 3).double()
    with pytest.raises(ValueError, match="output='softmax' needs \\(B, classes\\) logits"):
        lie_derivative(conv, random_images(), "rotate", output="softmax")


def test_layout_that_cannot_be_inferred() -> None:
    class Tokens(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(2).transpose(1, 2)[:, :7]

    with pytest.raises(ValueError, match="cannot infer the spatial layout.*Layout.tokens"):
        lie_derivative(Tokens(), random_images(), "rotate")


def test_tf32_is_off_during_analysis_and_restored() -> None:
    from aliasscope._borrow import _precision_knobs

    knobs = _precision_knobs()
    seen = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = smooth_cnn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append([getattr(obj, name) for obj, name in knobs])
            return self.net(x)

    before = [getattr(obj, name) for obj, name in knobs]
    tf32 = ["tf32" if name == "fp32_precision" else True for _, name in knobs]
    for (obj, name), value in zip(knobs, tf32, strict=True):
        setattr(obj, name, value)
    try:
        lie_derivative(Probe(), random_images(), "rotate")
        assert seen and all(v in ("ieee", False) for flags in seen for v in flags)
        assert [getattr(obj, name) for obj, name in knobs] == tf32
    finally:
        for (obj, name), value in zip(knobs, before, strict=True):
            setattr(obj, name, value)
