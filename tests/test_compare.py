"""compare(): consistency measures on models with known behaviour, and the result's files."""

from __future__ import annotations

import json

import torch
from torch import nn

from aliasscope.comparison import compare, fft_shift, fractional_shift_consistency, shift_consistency


class MeanColour(nn.Module):
    """Logits from the mean colour of the image: exactly invariant to any shift or crop of a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


class Corner(nn.Module):
    """Logits from the top-left pixel: changes with every shift."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x[:, :, 0, 0].repeat(1, 2)


def test_fft_shift_by_whole_pixels_is_a_roll_and_composes() -> None:
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    moved = fft_shift(x, torch.tensor([1.0, 3.0]), torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(moved[0], torch.roll(x[0], (1, 2), (1, 2)))
    torch.testing.assert_close(moved[1], torch.roll(x[1], (3, -1), (1, 2)))
    odd = torch.randn(2, 3, 11, 9, dtype=torch.float64)  # no Nyquist bin: sub-pixel shifts compose exactly
    step = (torch.full((2,), 0.5), torch.zeros(2))
    half = fft_shift(fft_shift(odd, *step), *step)
    torch.testing.assert_close(half, torch.roll(odd, 1, 2), rtol=0, atol=1e-9)


def test_consistency_of_an_invariant_and_a_shift_sensitive_model() -> None:
    g = torch.Generator().manual_seed(0)
    flat = torch.rand(16, 3, 1, 1, generator=g).expand(16, 3, 48, 48).clone()
    assert shift_consistency(MeanColour().eval(), flat, 16) == 1.0
    assert fractional_shift_consistency(MeanColour().eval(), flat, 16) == 1.0
    noise = torch.randn(64, 3, 48, 48, generator=g)
    assert shift_consistency(Corner().eval(), noise, 16) < 0.9


def test_compare_measures_every_model(tmp_path) -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    models = {"conv": conv.eval(), "blurred": nn.Sequential(nn.AvgPool2d(3, 1, 1), conv).eval()}
    images = torch.randn(6, 3, 48, 48)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    res = compare(models, images, labels, ["translate_x"], layer_images=2, spectral_images=1, progress=False)
    assert res.names == ["conv", "blurred"] and res.settings["crop"] == 16
    first, second = res.rows
    assert first["agreement"] == 1.0 and 0 <= second["agreement"] <= 1
    assert first["lie_translate_x_ci95_low"] <= first["lie_translate_x"] <= first["lie_translate_x_ci95_high"]
    assert first["params"] == second["params"] == sum(p.numel() for p in conv.parameters())
    assert abs(first["completeness_error"]) < 1e-4 and "nonlinearity" in res.by_kind["conv"]
    assert json.loads(res.to_json(tmp_path / "c.json"))["rows"][1]["model"] == "blurred"
    assert res.to_csv().splitlines()[0].startswith("model,params,top1")
    res.plot(tmp_path / "fig")
    assert (tmp_path / "fig.png").exists() and (tmp_path / "fig.svg").exists()
