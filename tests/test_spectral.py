"""Spectral primitives: closed-form aliasing of ReLU on a cosine, exact zeros, stride aliasing."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_images

from aliasscope.spectrum import (
    alias_ratio,
    aliasing_error,
    convergence,
    downsample,
    hf_fraction,
    power_spectrum,
    radial_profile,
    stride_alias,
    upsample,
)


def _cosine(n: int, k: int, rows: int = 4) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return torch.cos(2 * math.pi * k * i / n).expand(1, 1, rows, n).clone()


def _relu_cosine_alias(n: int, k: int, terms: int = 200_000) -> float:
    """relu(cos t) = 1/pi + cos(t)/2 + sum_m (2/pi) (-1)^(m+1) cos(2 m t) / (4 m^2 - 1); mean square 1/4.
    Energy outside the band of n samples: harmonics 2 m k > n / 2, each with energy c_m^2 / 2."""
    m = torch.arange(1, terms, dtype=torch.float64)
    c = (2 / math.pi) / (4 * m**2 - 1)
    outside = 2 * m * k > n / 2
    return ((c[outside] ** 2 / 2).sum() / 0.25).item()


def _relu_cosine_sampled(n: int, k: int, s: int, terms: int = 1_000_000) -> float:
    """The same series sampled on s * n points: each DFT bin j receives every harmonic h * k with
    h * k = j (mod s * n) (a kink makes the fine samples alias a little too); exact for the method."""
    fine = s * n
    h = torch.arange(0, terms, dtype=torch.float64)
    amp = torch.zeros_like(h)
    amp[0], amp[1] = 1 / math.pi, 0.5
    even = torch.arange(2, terms, 2)
    m = even.double() / 2
    amp[even] = (2 / math.pi) * (-1) ** (m + 1) / (4 * m**2 - 1)
    bins = torch.zeros(fine, dtype=torch.float64)
    for sign in (1, -1):  # a cosine is half at +f and half at -f (the constant term once)
        weight = amp / 2 if sign == 1 else amp / 2
        idx = (sign * h.long() * k) % fine
        w = weight.clone()
        if sign == -1:
            w[0] = 0
        else:
            w[0] = amp[0]
        bins.index_add_(0, idx, w)
    power = bins**2
    f = torch.fft.fftfreq(fine, d=1.0 / fine, dtype=torch.float64).abs()
    inside = (f <= n / 2).double()  # every term is a zero-phase cosine: a Nyquist pair is representable
    return (1 - (power * inside).sum() / power.sum()).item()


@pytest.mark.parametrize(("n", "k", "s"), [(64, 5, 4), (64, 5, 8), (48, 7, 8), (64, 3, 4)])
def test_relu_of_a_cosine_matches_its_sampled_fourier_series(n: int, k: int, s: int) -> None:
    measured = alias_ratio(torch.relu, _cosine(n, k), s)
    # the reference series is truncated at 1M harmonics: agreement measured at <= 5e-6 relative
    assert abs(measured - _relu_cosine_sampled(n, k, s)) < 1e-4 * measured


@pytest.mark.parametrize(("n", "k"), [(64, 5), (48, 7)])
def test_relu_of_a_cosine_converges_to_the_continuous_series(n: int, k: int) -> None:
    exact = _relu_cosine_alias(n, k)
    errors = [abs(alias_ratio(torch.relu, _cosine(n, k), s) - exact) / exact for s in (4, 8, 16)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3


def test_estimates_converge_with_the_upsampling_factor() -> None:
    out = convergence(torch.relu, _cosine(64, 5), factors=(2, 4, 8))
    ratios = [out[s][0] for s in (2, 4, 8)]
    assert abs(ratios[2] - ratios[1]) < abs(ratios[1] - ratios[0])
    errors = [out[s][1] for s in (2, 4, 8)]
    assert all(e > 0 for e in errors)
    assert abs(errors[2] - errors[1]) < abs(errors[1] - errors[0])
    assert abs(errors[2] - errors[1]) / errors[2] < 0.1


@pytest.mark.parametrize(
    "op",
    [
        lambda x: x,
        lambda x: 2.5 * x - 0.3,
        lambda x: torch.nn.functional.conv2d(x, torch.linspace(-1, 1, 12, dtype=x.dtype).reshape(4, 3, 1, 1)),
    ],
)
def test_linear_pointwise_ops_do_not_alias(op) -> None:
    h = random_images(2, 3, 16, 20)
    assert alias_ratio(op, h, 4) < 1e-20
    assert aliasing_error(op, h, 4) < 1e-20


def test_upsample_interpolates_band_limited_signals_and_downsample_inverts_it() -> None:
    h = random_images(2, 3, 12, 16)
    torch.testing.assert_close(downsample(upsample(h, 4), (12, 16)), h, rtol=0, atol=1e-12)
    fine = upsample(_cosine(16, 3), 4)
    torch.testing.assert_close(fine, _cosine(64, 3, rows=16), rtol=0, atol=1e-12)
    nyquist = upsample(_cosine(16, 8), 2)  # the Nyquist cosine interpolates as a cosine
    torch.testing.assert_close(nyquist, _cosine(32, 8, rows=8), rtol=0, atol=1e-12)


def test_stride_aliasing_of_band_limited_and_white_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 1, 64, 64, dtype=torch.float64, generator=g)
    for s in (2, 4):
        assert abs(stride_alias(noise, s) - (1 - 1 / s**2)) < 0.005
        band_limited = upsample(downsample(noise, (64 // s, 64 // s)), s)  # ideal low-pass to the output band
        assert stride_alias(band_limited, s) < 1e-20


def test_power_spectrum_profile_and_high_frequency_fraction() -> None:
    low = _cosine(32, 2, rows=32)
    high = _cosine(32, 14, rows=32)
    assert hf_fraction(power_spectrum(low)) < 1e-20
    assert hf_fraction(power_spectrum(high)) > 1 - 1e-12
    h = random_images(3, 2, 16, 16)
    p = power_spectrum(h)
    assert p.shape == (16, 16)
    torch.testing.assert_close(p.sum() / 256, (h**2).mean(), rtol=1e-12, atol=0)  # Parseval
    centres, profile = radial_profile(power_spectrum(low))
    assert profile.argmax() == (centres - 2 / 16).abs().argmin()
    with pytest.raises(ValueError, match="unknown window"):
        power_spectrum(h, window="kaiser")
    assert power_spectrum(h, window="hann").shape == (16, 16)


def test_spectral_measures_every_op_of_a_model(tmp_path) -> None:
    import csv
    import json

    from torch import nn

    from aliasscope.spectrum import spectral

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-1, 1)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2, padding=1),
            bn,
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 4),
        )
        .double()
        .eval()
    )
    sp = spectral(model, random_images(2, 3, 32, 32), upsample=4)
    rows = {r["name"]: r for r in sp.table}
    assert rows["0"]["kind"] == "downsampling" and 0 < rows["0"]["stride_alias"] < 1
    assert rows["5"]["kind"] == "downsampling" and 0 < rows["5"]["stride_alias"] < 1
    assert rows["1"]["alias_ratio"] < 1e-20  # eval BatchNorm: per-channel affine, no aliasing
    assert 1e-4 < rows["2"]["alias_ratio"] < 1 and rows["2"]["aliasing_error"] > 0
    assert 1e-4 < rows["4"]["alias_ratio"] < 1
    assert math.isnan(rows["8"]["alias_ratio"]) and math.isnan(rows["8"]["hf_fraction"])  # invariant head
    assert 0 < rows["3"]["hf_fraction"] < 1
    by_kind = sp.by_kind()
    assert by_kind["nonlinearity"]["ops"] == 2 and by_kind["nonlinearity"]["alias_ratio"] > 0
    parsed = list(csv.DictReader(sp.to_csv(tmp_path / "s.csv").splitlines()))
    assert [r["name"] for r in parsed] == sp.names
    assert json.loads(sp.to_json())["upsample"] == 4


def test_spectral_on_a_vit_measures_token_ops() -> None:
    import timm

    from aliasscope.spectrum import spectral

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    sp = spectral(model, torch.randn(2, 3, 32, 32), upsample=2)
    kinds = sp.by_kind()
    assert kinds["nonlinearity"]["alias_ratio"] > 0  # GELU on tokens
    assert kinds["normalisation"]["alias_ratio"] >= 0  # LayerNorm per token


def test_pointwise_aliasing_agrees_with_the_separate_measures() -> None:
    from aliasscope.spectrum import pointwise_aliasing

    h = random_images(2, 3, 16, 16)
    ratio, error = pointwise_aliasing(torch.nn.functional.gelu, h, 4)
    assert ratio == pytest.approx(alias_ratio(torch.nn.functional.gelu, h, 4), rel=1e-9)
    assert error == pytest.approx(aliasing_error(torch.nn.functional.gelu, h, 4), rel=1e-9)
    assert 0 < ratio < 1 and 0 < error < 1


def test_stride_one_slides_the_strided_kernel_with_stride_one() -> None:
    from aliasscope.spectrum import stride_one

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    w, b = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    full = stride_one(lambda t: torch.nn.functional.conv2d(t, w, b, stride=2, padding=1), x, 2)
    reference = torch.nn.functional.conv2d(x, w, b, stride=1, padding=1)
    # equal except at the odd phase next to the start (row/column 1), where the strided op's own
    # zero padding stands for a pixel that the shift moved out
    torch.testing.assert_close(full[..., 2:, 2:], reference[..., 2:, 2:], rtol=0, atol=1e-12)
    torch.testing.assert_close(full[..., 0, 0::2], reference[..., 0, 0::2], rtol=0, atol=1e-12)
    assert not torch.allclose(full[..., 1, 2:], reference[..., 1, 2:])
    pooled = stride_one(lambda t: torch.nn.functional.avg_pool2d(t, 4), x, 4)
    torch.testing.assert_close(
        pooled[..., :13, :13], torch.nn.functional.avg_pool2d(x, 4, 1), rtol=0, atol=1e-12
    )


def _small_net() -> torch.nn.Module:
    from torch import nn

    torch.manual_seed(1)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1),
            nn.GELU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(6 * 8 * 8, 4),
        )
        .double()
        .eval()
    )


def test_spectral_does_not_depend_on_batching_or_the_memory_budget() -> None:
    from aliasscope.spectrum import spectral

    model, x = _small_net(), random_images(5, 3, 32, 32)
    whole = spectral(model, x, upsample=4, batch_size=8)
    chunked = spectral(model, x, upsample=4, batch_size=2, max_bytes=1)  # one image per FFT chunk
    for name in ("alias_ratio", "aliasing_error", "stride_alias", "hf_fraction"):
        torch.testing.assert_close(
            getattr(chunked, name), getattr(whole, name), rtol=1e-10, atol=1e-300, equal_nan=True
        )
    assert whole.strides == [2, None, None, None, 2, None, None]
    assert whole.stride_alias[0] > 0 and whole.stride_alias[4] > 0


def test_elementwise_activations_split_over_channels_under_a_small_budget() -> None:
    # one image of a wide activation at a high factor may not fit: an elementwise op is measured
    # a few channels at a time, with the same pooled energies
    from torch import nn

    from aliasscope.spectrum import spectral

    seen: list[int] = []

    class Spy(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[1])
            return super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), Spy(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = model.double().eval()
    x = random_images(2, 3, 16, 16)
    whole = spectral(model, x, upsample=4)
    assert min(seen) == 6
    seen.clear()
    small = spectral(model, x, upsample=4, max_bytes=2 * 16 * 16 * 16 * 64)  # two channels at 4x
    assert min(seen) == 2
    for name in ("alias_ratio", "aliasing_error"):
        torch.testing.assert_close(
            getattr(small, name), getattr(whole, name), rtol=1e-10, atol=1e-300, equal_nan=True
        )
    assert whole.alias_ratio[1] > 1e-4


def test_spectral_reports_convergence_in_the_upsampling_factor(tmp_path) -> None:
    import json

    from aliasscope.spectrum import spectral

    sp = spectral(_small_net(), random_images(2, 3, 32, 32), upsample=4, convergence=(2, 4, 8))
    assert sorted(sp.convergence) == [2, 8]
    row = sp.table[3]  # GELU
    assert row["alias_ratio_s8"] == pytest.approx(row["alias_ratio"], rel=0.05)
    assert abs(row["alias_ratio_s2"] - row["alias_ratio"]) > abs(row["alias_ratio_s8"] - row["alias_ratio"])
    summary = json.loads(sp.to_json(tmp_path / "s.json"))["convergence"]
    assert summary["max_rel_change_s8_vs_s4"] < summary["max_rel_change_s2_vs_s4"]
    assert "alias_ratio_s8" in sp.to_csv().splitlines()[0]


def test_patch_embedding_and_patch_merging_get_a_stride_alias() -> None:
    import timm

    from aliasscope.spectrum import spectral

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    rows = {r["name"]: r for r in spectral(vit, torch.randn(1, 3, 32, 32), upsample=2).table}
    assert rows["patch_embed.proj"]["stride"] == 8 and 0.5 < rows["patch_embed.proj"]["stride_alias"] < 1
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=64,
        window_size=2,
        depths=(1, 1, 1, 1),
        embed_dim=24,
        num_heads=(1, 1, 1, 1),
    ).eval()
    rows = {r["name"]: r for r in spectral(swin, torch.randn(1, 3, 64, 64), upsample=2).table}
    # patch merging's space-to-depth reshape (of window-partitioned input) shrinks the grid
    merging = [r for n, r in rows.items() if n.endswith(".downsample.flatten") and r["stride"] == 2]
    assert len(merging) == 3 and all(0 < r["stride_alias"] < 1 for r in merging)


def test_in_place_activations_do_not_corrupt_later_measures() -> None:
    from torch import nn

    from aliasscope.spectrum import spectral

    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6(inplace=True), nn.Conv2d(4, 2, 3))
        .double()
        .eval()
    )
    x = random_images(2, 3, 16, 16) * 4
    with_conv = spectral(model, x, upsample=4, convergence=(2, 8))
    for s in (2, 8):
        alone = spectral(model, x, upsample=s)
        assert with_conv.convergence[s][0][1].item() == pytest.approx(alone.alias_ratio[1].item(), rel=1e-9)


def test_functional_strided_ops_are_downsampling_with_a_stride_alias_and_decompose_exactly() -> None:
    """F.avg_pool2d / F.max_pool2d / x[..., ::2, ::2] / a strided F.conv2d inside a forward: recorded as
    downsampling, measured at stride 1, and the decomposition still adds up (a crop stays a grid)."""
    import torch.nn.functional as F
    from torch import nn

    import aliasscope as asc
    from aliasscope.spectrum import spectral

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.weight = nn.Parameter(torch.randn(4, 4, 3, 3) / 6)
            self.fc = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.avg_pool2d(F.relu(self.conv(x)), 2)
            h = F.max_pool2d(h, 2)[:, :, ::2, ::2]
            h = F.conv2d(h[..., 1:-1, 1:-1], self.weight, stride=2, padding=1)
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    model = Functional().double().eval()
    x = random_images(2, 3, 64, 64)
    rows = spectral(model, x, upsample=2).table
    got = {r["name"]: (r["kind"], r["stride"]) for r in rows}
    assert got["avg_pool2d"] == got["max_pool2d"] == got["getitem"] == got["conv2d"] == ("downsampling", 2)
    assert got["getitem#1"] == ("layout", None)  # a crop keeps the grid's spacing
    assert all(0 < r["stride_alias"] < 1 for r in rows if r["stride"] == 2)
    for transform in ("translate_x", "rotate"):
        dec = asc.decompose(model, x, transform, target=0)
        assert dec.completeness_error < 1e-9
        assert dec.values[dec.names.index("getitem")].abs().max() > 1e-6  # subsampling breaks it
