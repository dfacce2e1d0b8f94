"""Capture: every op in call order, functional ops too, stable names, kinds and layouts."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import random_images
from torch import nn

from aliasscope.capture import KINDS, record


class Functional(nn.Module):
    """A model whose equivariance-relevant ops are functional calls, not modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 16, 4))
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x))  # (B, 4, 4, 4)
        x = self.act(x + 1)  # a reused module
        x = F.gelu(x)
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear")
        x = F.avg_pool2d(x, 2)
        tokens = x.flatten(2).transpose(1, 2) + self.pos
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        pooled = tokens[:, 1:].mean(1) + tokens[:, 0]
        return self.head(pooled)


def _ops(rec) -> dict[str, tuple[str, str]]:
    return {op.name: (op.kind, str(op.layout)) for op in rec}


def test_functional_ops_are_recorded_with_kinds_and_layouts() -> None:
    model = Functional().double().eval()
    with torch.no_grad(), record(model) as rec:
        model(random_images(2, 3, 8, 8))
    ops = _ops(rec)
    assert ops["conv"] == ("downsampling", "bchw")
    assert ops["act"] == ("nonlinearity", "bchw") and ops["act#1"] == ("nonlinearity", "bchw")
    assert ops["gelu"] == ("nonlinearity", "bchw")
    assert ops["interpolate"] == ("upsampling", "bchw")
    assert ops["avg_pool2d"] == ("downsampling", "bchw")
    assert ops["add#1"] == ("position_embed", "tokens(4x4)")
    assert ops["cat"] == ("layout", "tokens(4x4+1)")
    assert ops["getitem"] == ("layout", "tokens(4x4)")
    assert ops["mean"][0] == "pooling" and ops["getitem#1"][0] == "pooling"
    assert ops["head"] == ("linear", "invariant")
    assert (
        rec.names.index("conv") < rec.names.index("gelu") < rec.names.index("cat") < rec.names.index("head")
    )
    assert set(rec.kinds) <= set(KINDS)


def test_hooks_removed_and_inplace_ops_do_not_corrupt_recorded_activations() -> None:
    model = Functional().double().eval()
    x = random_images(2, 3, 8, 8)
    with torch.no_grad(), record(model) as rec:
        y = model(x)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    conv = next(op for op in rec if op.name == "conv")
    torch.testing.assert_close(conv.outputs[0], model.conv(x))  # ReLU(inplace=True) ran out of place
    torch.testing.assert_close(y, model(x))


@pytest.mark.parametrize(
    ("name", "prefix"), [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)]
)
def test_token_layouts_come_from_the_model(name: str, prefix: int) -> None:
    model = timm.create_model(name, img_size=32, depth=1).eval()
    with torch.no_grad(), record(model) as rec:
        model(torch.randn(2, 3, 32, 32))
    block = [op for op in rec if op.name.startswith("blocks.0.")]
    assert {str(op.layout) for op in block if op.kind == "normalisation"} == {f"tokens(2x2+{prefix})"}
    assert any(op.op == "scaled_dot_product_attention" and op.kind == "attention" for op in block)
    assert [op.kind for op in rec if op.op == "add" and op.module == ""].count("position_embed") == 1


def test_convnext_blocks_run_channels_last() -> None:
    model = timm.create_model("convnext_atto", conv_mlp=False).eval()
    with torch.no_grad(), record(model) as rec:
        model(torch.randn(2, 3, 64, 64))
    ops = _ops(rec)
    assert ops["stages.0.blocks.0.conv_dw"] == ("linear", "bchw")
    assert ops["stages.0.blocks.0.mlp.fc1"] == ("linear", "bhwc")
    assert ops["stages.0.blocks.0.mlp.act"] == ("nonlinearity", "bhwc")


def test_mixer_token_mlp_is_one_token_mixing_op() -> None:
    model = timm.create_model("mixer_b16_224", img_size=64).eval()
    with torch.no_grad(), record(model) as rec:
        model(torch.randn(2, 3, 64, 64))
    ops = _ops(rec)
    assert ops["blocks.0.mlp_tokens"] == ("token_mixing", "bcn(4x4)")
    assert ops["blocks.0.mlp_channels.fc1"] == ("linear", "tokens(4x4)")


@pytest.mark.parametrize("batch", [1, 2])
def test_swin_window_partition_gets_a_window_layout(batch: int) -> None:
    """Window partition/reverse are moves between BHWC and a window layout, so a Swin block splits into
    norms, the cyclic shift, window attention (one op: its scores live inside windows), MLP and adds."""
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=64, window_size=2, depths=(2, 1, 1, 1)
    ).eval()
    with torch.no_grad(), record(model) as rec:
        model(torch.randn(batch, 3, 64, 64))
    ops = _ops(rec)
    assert ops["layers.0.blocks.0.attn"] == ("attention", "windows(16x16/2x2)")
    assert ops["layers.0.blocks.0.view#1"] == ("layout", "windows2d(16x16/2x2)")
    assert ops["layers.0.blocks.0.view#5"] == ("layout", "bhwc")  # windows put back
    assert ops["layers.0.blocks.1.roll"] == ("other", "bhwc")  # the shifted block's cyclic shift
    assert ops["layers.0.blocks.0.mlp.act"] == ("nonlinearity", "tokens(16x16)")
    # patch merging folds each 2x2 window into the channels: a space-to-depth reshape, then norm, Linear
    assert ops["layers.1.downsample.flatten"] == ("downsampling", "bhwc")
    assert ops["layers.1.downsample.reduction"] == ("linear", "bhwc")
    by_name = {op.name: op for op in rec}
    assert by_name["layers.0.blocks.0.view#1"].exactly_equivariant
    assert not by_name["layers.0.blocks.1.roll"].exactly_equivariant
    assert not any(name.startswith("layers.0.blocks.0.attn.") for name in ops)


class Folded(nn.Module):
    """Folds pixels into the batch: no layout is known inside."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 4)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = y.shape
        z = self.mix(y.permute(0, 2, 3, 1).reshape(-1, c))
        return z.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Scrambled(nn.Module):
    def __init__(self, inner: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fold = Folded()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fold(self.conv(x))
        if self.inner:
            return y.mean((2, 3))
        return (
            self.fold.mix(y.permute(0, 2, 3, 1).reshape(-1, 4)).reshape(x.shape[0], -1).mean(1, keepdim=True)
        )


def test_unknown_layout_inside_a_module_records_that_module_whole() -> None:
    model = Scrambled(inner=True).double().eval()
    with torch.no_grad(), record(model) as rec:
        model(random_images())
    assert rec.names[:2] == ["conv", "fold"]
    assert _ops(rec)["fold"] == ("block", "bchw")


def test_unknown_layout_at_the_top_is_an_error_naming_the_op() -> None:
    model = Scrambled(inner=False).double().eval()
    with pytest.raises(ValueError, match=r"cannot infer the layout .* op 'reshape.*layouts=.*units="):
        with torch.no_grad(), record(model):
            model(random_images())


def test_recording_works_under_forward_mode_jvp() -> None:
    model = Functional().eval()
    x = torch.randn(2, 3, 8, 8)
    with record(model) as rec:
        torch.func.jvp(model, (x,), (torch.randn_like(x),))
    assert {"conv", "gelu", "add#1", "head"} <= set(rec.names)


def test_nothing_recorded_is_an_error() -> None:
    model = Functional()
    with pytest.raises(ValueError, match="nothing was recorded"), record(model):
        pass


def test_paper_units_group_modules_as_the_reference_code() -> None:
    model = timm.create_model("efficientnet_b0").eval()
    with torch.no_grad(), record(model, units="paper") as rec:
        model(torch.randn(2, 3, 64, 64))
    names = rec.names
    assert "bn1" in names and "bn1.act" not in names  # BatchNormAct2d is a BatchNorm2d: one layer
    assert "blocks.1.0.se" in names and not any(n.startswith("blocks.1.0.se.") for n in names)
    with pytest.raises(ValueError, match="'paper'"), record(model, units="reference"):
        pass
