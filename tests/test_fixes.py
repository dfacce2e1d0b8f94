"""Anti-aliasing fixes: exact shift invariance of APS + circular padding, blur-pool on constants, lower
aliasing of filtered activations, and the original model left untouched."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from torch import nn

from aliasscope._antialias import FilteredActivation, PolyphaseDown, kaiser_lowpass
from aliasscope.fixes import FIXES, blurpool, changes, circular_padding, filtered_activation, polyphase
from aliasscope.spectrum import spectral, upsample


def _resnet18(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10).to(dtype).eval()


def _shifts(x: torch.Tensor, shifts: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.roll(x, s, dims=(2, 3)) for s in shifts])


def test_polyphase_with_circular_padding_is_exactly_shift_invariant() -> None:
    model = _resnet18()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fixed = polyphase(circular_padding(model, example=x), example=x)
    every = [(dy, dx) for dy in range(32) for dx in range(32)]  # every circular shift of a 32x32 image
    with torch.no_grad():
        base = fixed(x)
        for start in range(0, len(every), 256):
            logits = fixed(_shifts(x, every[start : start + 256]))
            torch.testing.assert_close(logits, base.expand_as(logits), rtol=0, atol=1e-5)
        assert (model(_shifts(x, every[1:64])) - model(x)).abs().max() > 1e-3  # the original is not
        # the shared phase matters: APS layers choosing independently break the residual blocks
        for m in fixed.modules():
            if isinstance(m, PolyphaseDown):
                m.book = None
        assert (fixed(_shifts(x, every[1:64])) - base).abs().max() > 1e-3
    kinds = {c.name: c for c in changes(fixed) if c.fix == "polyphase"}
    assert {"conv1", "maxpool", "layer2.0.conv1", "layer2.0.downsample.0"} <= set(kinds)


def test_polyphase_and_circular_padding_on_tf_same_convs() -> None:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=5).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    fixed = polyphase(circular_padding(model, example=x), example=x)
    with torch.no_grad():
        base = fixed(x)
        logits = fixed(_shifts(x, [(1, 0), (0, 3), (5, 7), (31, 63)]))
    torch.testing.assert_close(logits, base.expand_as(logits), rtol=0, atol=1e-10)
    assert sum(c.changed for c in changes(fixed) if c.fix == "polyphase") == 5  # stem + 4 strided dw convs


def test_blurpool_keeps_constant_images_and_changes_the_rest() -> None:
    model = circular_padding(_resnet18(torch.float64))  # a constant image stays constant in every layer
    fixed = blurpool(model, filter_size=5)
    done = [c for c in changes(fixed) if c.fix == "blurpool"]
    assert len(done) == 8 and all(c.changed for c in done)  # 3x3/7x7/1x1 strided convs and the max-pool
    constant = torch.full((3, 3, 64, 64), 0.5, dtype=torch.float64) * torch.tensor([1.0, -2.0, 3.0]).view(
        3, 1, 1, 1
    )
    with torch.no_grad():
        torch.testing.assert_close(fixed(constant), model(constant), rtol=0, atol=1e-12)
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        assert (fixed(x) - model(x)).abs().max() > 1e-3


def test_blurpool_replacements_keep_shapes_on_odd_sizes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.MaxPool2d(2), nn.AvgPool2d(2)).eval()
    x = torch.randn(1, 3, 30, 30)
    fixed = blurpool(model, example=x)
    assert fixed(x).shape == model(x).shape
    assert [c.name for c in changes(fixed)] == ["0", "1", "2"]


def test_filtered_activation_lowers_the_alias_of_the_ops_it_wraps() -> None:
    model = _resnet18(torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = {r["name"]: r for r in spectral(model, x, upsample=4).table if r["kind"] == "nonlinearity"}
    for filt in ("ideal", "kaiser"):
        fixed = filtered_activation(model, up=2, filter=filt, example=x)
        wrapped = [c.name for c in changes(fixed) if c.changed]
        assert len(wrapped) == 13 and all(  # layer4's 1x1 maps are no grid: left alone
            isinstance(fixed.get_submodule(n), FilteredActivation) for n in wrapped
        )
        after = {r["name"]: r for r in spectral(fixed, x, upsample=4).table}
        assert all(after[name]["kind"] == "nonlinearity" for name in wrapped)
        aliasing = [n for n in wrapped if before[n]["alias_ratio"] > 1e-6]  # 2x2 maps hardly alias at all
        if filt == "kaiser":  # a 25-tap filter only works on maps larger than itself
            aliasing = [n for n in aliasing if n == "act1" or n.startswith("layer1")]
        assert len(aliasing) >= 5, aliasing
        for name in aliasing:
            assert after[name]["alias_ratio"] < 0.8 * before[name]["alias_ratio"], name
        with torch.no_grad():
            rel = (fixed(x) - model(x)).norm() / model(x).norm()
        assert 1e-4 < rel < 0.5  # a different, not a broken, model


def test_filtered_identity_reproduces_band_limited_inputs() -> None:
    taps = kaiser_lowpass(2, dtype=torch.float64)
    assert taps.sum().item() == pytest.approx(1.0, abs=1e-12) and torch.equal(taps, taps.flip(0))
    g = torch.Generator().manual_seed(0)
    smooth = upsample(torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g), 4)  # band-limited 32x32
    ideal = FilteredActivation(nn.Identity(), 2, "ideal")
    torch.testing.assert_close(ideal(smooth), smooth, rtol=0, atol=1e-12)
    kaiser = FilteredActivation(nn.Identity(), 2, "kaiser", pad_mode="circular").double()
    err = (kaiser(smooth) - smooth).abs().max() / smooth.abs().max()
    assert err < 1e-2  # a finite filter: close, not exact, in the pass band


def test_filtered_activation_on_token_and_channels_last_layouts() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    x = torch.randn(1, 3, 32, 32)
    fixed = filtered_activation(vit, up=2, example=x)
    wrapped = [c for c in changes(fixed) if c.changed]
    assert wrapped and all("tokens" in c.after for c in wrapped)
    assert fixed(x).shape == vit(x).shape
    channels_last = nn.Sequential(
        Permute(0, 2, 3, 1), nn.GELU(), Permute(0, 3, 1, 2), nn.Conv2d(3, 2, 3)
    ).eval()
    fixed = filtered_activation(channels_last, example=torch.randn(1, 3, 16, 16))
    assert [c.name for c in changes(fixed) if "bhwc" in c.after] == ["1"]
    x = upsample(torch.randn(1, 3, 4, 4), 4)
    expected = filtered_activation(nn.Sequential(nn.GELU(), nn.Conv2d(3, 2, 3)).eval(), example=x)
    expected[1].load_state_dict(channels_last[3].state_dict())
    torch.testing.assert_close(fixed(x), expected(x), rtol=1e-5, atol=1e-6)  # the same filter either way


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


@pytest.mark.parametrize("name", sorted(FIXES))
def test_the_original_model_is_unchanged(name: str) -> None:
    model = _resnet18().train()
    state = copy.deepcopy(model.state_dict())
    text = repr(model)
    hooks = len(model._forward_pre_hooks) + len(model._forward_hooks)
    fixed = FIXES[name](model, example=torch.randn(1, 3, 32, 32))
    assert fixed is not model and repr(model) == text and model.training and fixed.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert len(model._forward_pre_hooks) + len(model._forward_hooks) == hooks and not changes(model)
    assert changes(fixed) and all(c.fix == name for c in changes(fixed))
    assert not {id(p) for p in fixed.parameters()} & {id(p) for p in model.parameters()}  # weights copied


def test_bad_fix_arguments_and_a_model_with_nothing_to_fix() -> None:
    model = _resnet18()
    with pytest.raises(ValueError, match="filter must be"):
        filtered_activation(model, filter="box")
    with pytest.raises(ValueError, match="filter_size"):
        blurpool(model, filter_size=4)
    stride_one = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Flatten()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blurpool(stride_one, example=torch.randn(1, 3, 8, 8))
    assert any("changed no op" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="divisible"):
        polyphase(model, example=torch.randn(1, 3, 32, 32))(torch.randn(1, 3, 36, 36))


def test_circular_extension_wraps_maps_smaller_than_the_filter() -> None:
    from aliasscope._antialias import _extend

    x = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(
        _extend(x, 2, "circular"), torch.nn.functional.pad(x, (2, 2, 2, 2), mode="circular")
    )
    big = _extend(x, 7, "circular")
    assert big.shape[-2:] == (17, 18)
    rows, cols = torch.arange(-7, 10) % 3, torch.arange(-7, 11) % 4
    torch.testing.assert_close(big, x[..., rows[:, None], cols[None, :]])
    assert _extend(x, 5, "reflect").shape[-2:] == (13, 14)  # too small to mirror: replicated


def test_polyphase_in_two_steps_shares_one_phase_book() -> None:
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    circ = circular_padding(_resnet18(), example=x)
    fixed = polyphase(polyphase(circ, where=["conv1", "maxpool"], example=x), where="layer*", example=x)
    aps = [m for m in fixed.modules() if isinstance(m, PolyphaseDown)]
    assert len(aps) == 8 and len({id(m.book) for m in aps}) == 1 and len(fixed._forward_pre_hooks) == 1
    with torch.no_grad():
        logits = fixed(_shifts(x, [(0, 0), (1, 0), (3, 5), (17, 30)]))
    torch.testing.assert_close(logits, logits[:1].expand_as(logits), rtol=0, atol=1e-5)
