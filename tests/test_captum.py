"""Captum-native Lie-derivative attribution: exactness against the decomposition, captum conventions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import timm
import torch
from captum.attr import LayerAttribution
from captum.attr import visualization as viz
from helpers import random_images, smooth_cnn
from torch import nn

from aliasscope.captum import LayerLieDerivative, LieDerivativeAttribution
from aliasscope.decomposition import decompose
from aliasscope.lie import lie_derivative


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8
    ).eval()
    nn.init.normal_(model.head.weight, std=0.02)
    return model.double()


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return (
        timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False).double().eval()
    )


class SharedReLU(nn.Module):
    """One ReLU module called twice (at the same shape), then a strided conv and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, stride=1, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.relu(self.conv2(self.conv1(x)))
        h = self.relu(self.conv3(h)) * scale
        return self.head(h.mean((2, 3)))


def _sums(m: torch.Tensor) -> torch.Tensor:
    return m.flatten(1).sum(1)


def _astronaut(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].double() / 255
    img = nn.functional.interpolate(img, size=(size, size), mode="area")
    return img, (img - 0.5) / 0.5


def test_maps_sum_to_the_decompositions_contributions() -> None:
    net, x = smooth_cnn(), random_images(2, 3, 16, 20)
    layers = [net[0], net[2], net[3], net[4]]
    maps, delta = LayerLieDerivative(net, layers, "rotate").attribute(
        x, target=1, return_convergence_delta=True
    )
    d = decompose(net, x, "rotate", target=1)
    for m, name in zip(maps, ["0", "2", "3", "4"], strict=True):
        torch.testing.assert_close(_sums(m), d.values[d.names.index(name)], rtol=1e-9, atol=1e-14)
    assert maps[2].shape == (2, 8, 8, 10)  # the strided conv's output
    others = [i for i, n in enumerate(d.names) if n not in ("0", "2", "3", "4")]
    torch.testing.assert_close(delta, d.values[others].sum(0), rtol=1e-9, atol=1e-14)


def test_a_block_is_one_op_whose_map_sums_to_its_ops_contributions() -> None:
    model, x = _resnet(), random_images(2, 3, 32, 32)
    attr = LayerLieDerivative(model, model.layer2, "translate_x")
    m, delta = attr.attribute(x, target=3, return_convergence_delta=True)
    assert m.shape == (2, 128, 4, 4)
    d = decompose(model, x, "translate_x", target=3, keep_maps=True)
    inside = torch.tensor([n.startswith("layer2.") for n in d.names])
    torch.testing.assert_close(_sums(m), d.values[inside].sum(0), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(delta, d.values[~inside].sum(0), rtol=1e-8, atol=1e-12)
    assert attr.last_decomposition.names.count("layer2") == 1 and _sums(m).abs().min() > 1e-6
    # its input is what the last op of layer1 made
    inp = attr.attribute(x, target=3, attribute_to_layer_input=True)
    torch.testing.assert_close(inp, d.maps["layer1.1.act2"])


def test_batchnorm_with_activation_keeps_its_activation() -> None:
    """timm's BatchNormAct2d (a BatchNorm2d subclass with an activation inside) is not affine."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(1)
    net = (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            BatchNormAct2d(6, act_layer=nn.GELU),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        )
        .double()
        .eval()
    )
    x = random_images(2, 3, 12, 12)
    m, delta = LayerLieDerivative(net, net[1], "rotate").attribute(x, target=2, return_convergence_delta=True)
    d = decompose(net, x, "rotate", target=2)
    inside = torch.tensor([n.startswith("1.") for n in d.names])
    assert {"1.batch_norm", "1.act"} <= set(d.names)
    torch.testing.assert_close(_sums(m), d.values[inside].sum(0), rtol=1e-9, atol=1e-14)
    assert _sums(m).abs().min() > 1e-6
    torch.testing.assert_close(delta, d.total - d.values[inside].sum(0), rtol=1e-9, atol=1e-14)


def test_convergence_delta_is_zero_with_every_op() -> None:
    net, x = smooth_cnn(), random_images(3, 3, 16, 16)
    attr = LayerLieDerivative(net, None, "scale")
    maps, delta = attr.attribute(x, target=[0, 2, 4], return_convergence_delta=True)
    d = attr.last_decomposition
    assert list(maps) == d.names and "1" in maps  # eval BatchNorm: a map of zeros
    assert torch.count_nonzero(maps["1"]) == 0
    assert delta.abs().max() <= 1e-12 * d.total.abs().max()
    ref = lie_derivative(net, x, "scale").gather(1, torch.tensor([[0], [2], [4]]))[:, 0]
    torch.testing.assert_close(sum(_sums(m) for m in maps.values()), ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(attr.compute_convergence_delta(maps, x, [0, 2, 4]), delta, rtol=0, atol=1e-12)
    assert attr.has_convergence_delta() and attr.multiplies_by_inputs


def test_input_attribution_sums_to_the_lie_derivative_of_the_logit() -> None:
    net, x = smooth_cnn(), random_images(2, 3, 16, 20)
    ig = LieDerivativeAttribution(net, "rotate")
    a, delta = ig.attribute(x, target=torch.tensor([1, 3]), return_convergence_delta=True)
    assert a.shape == x.shape
    ref = lie_derivative(net, x, "rotate").gather(1, torch.tensor([[1], [3]]))[:, 0]
    torch.testing.assert_close(_sums(a), ref, rtol=1e-10, atol=1e-14)
    assert delta.abs().max() < 1e-12
    (a1,) = ig.attribute((x,), target=1)  # a tuple in, a tuple out
    torch.testing.assert_close(a1[0], a[0])
    # an image-like output: the -<dT/dF, D F> term is not in any pixel, it is the delta
    stem = nn.Sequential(*net[:3])
    b, delta = LieDerivativeAttribution(stem, "rotate").attribute(
        x, target=(2, 5, 7), return_convergence_delta=True
    )
    ref = lie_derivative(stem, x, "rotate")[:, 2, 5, 7]
    torch.testing.assert_close(_sums(b) + delta, ref, rtol=1e-10, atol=1e-14)
    assert delta.abs().max() > 1e-6


def test_interpolate_and_visualize_on_a_real_photo() -> None:
    photo, x = _astronaut(32)
    net = smooth_cnn()
    layer_map = LayerLieDerivative(net, net[4], "translate_x").attribute(x, target=2)
    up = LayerAttribution.interpolate(layer_map, (32, 32), interpolate_mode="bilinear")
    assert up.shape == (1, 8, 32, 32)
    fig, _ = viz.visualize_image_attr(
        up[0].permute(1, 2, 0).numpy(),
        photo[0].permute(1, 2, 0).numpy(),
        method="blended_heat_map",
        sign="all",
        use_pyplot=False,
    )
    assert fig is not None and fig.axes
    pix = LieDerivativeAttribution(net, "translate_x").attribute(x, target=2)
    fig, _ = viz.visualize_image_attr(
        pix[0].permute(1, 2, 0).numpy(),
        photo[0].permute(1, 2, 0).numpy(),
        method="heat_map",
        sign="all",
        use_pyplot=False,
    )
    assert fig is not None


def test_vit_token_maps_on_the_patch_grid() -> None:
    model = _vit()
    _, x = _astronaut(32)
    x = torch.cat([x, random_images(1, 3, 32, 32)])
    attr = LayerLieDerivative(model, [model.blocks[0], model.blocks[2].mlp.fc1], "translate_x")
    (block, fc1), delta = attr.attribute(x, target=4, return_convergence_delta=True)
    assert block.shape == (2, 192, 4, 4) and fc1.shape == (2, 768, 4, 4)
    up = LayerAttribution.interpolate(block, (32, 32))
    assert up.shape == (2, 192, 32, 32)
    fig, _ = viz.visualize_image_attr(
        up[0].permute(1, 2, 0).numpy(), method="heat_map", sign="all", use_pyplot=False
    )
    assert fig is not None
    # with to_grid=False the token maps, class token included, sum to the decomposition's values
    raw = attr.attribute(x, target=4, to_grid=False)
    assert raw[0].shape == (2, 17, 192)
    d = attr.last_decomposition
    names = d.names
    for r, name in zip(raw, ["blocks.0", "blocks.2.mlp.fc1"], strict=True):
        torch.testing.assert_close(_sums(r), d.values[names.index(name)], rtol=1e-9, atol=1e-14)
    # the class token's part is what the grid maps leave out: it shows up in the delta
    prefix = sum(r[:, 0].sum(-1) for r in raw)
    rest = d.total - d.values[[names.index("blocks.0"), names.index("blocks.2.mlp.fc1")]].sum(0)
    torch.testing.assert_close(delta, rest + prefix, rtol=1e-9, atol=1e-14)
    # every op at once: complete up to the prefix tokens of the grid maps
    everything, delta_all = LayerLieDerivative(model, None).attribute(x, 4, return_convergence_delta=True)
    raw_all = LayerLieDerivative(model, None).attribute(x, 4, to_grid=False, return_convergence_delta=True)[1]
    assert raw_all.abs().max() <= 1e-10 * d.total.abs().max()
    assert everything["blocks.0.add"].shape == (2, 192, 4, 4)


def test_swin_window_attention_maps_on_the_full_grid() -> None:
    """A window-attention layer's map comes back as (B, C, H, W), windows put back in place."""
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=2, depths=(2, 1, 1, 1), num_classes=5
    )
    model = model.double().eval()
    x = random_images(2, 3, 32, 32)
    attn = model.layers[0].blocks[1].attn
    attr = LayerLieDerivative(model, attn, "rotate")
    grid = attr.attribute(x, target=3)
    assert grid.shape == (2, 96, 8, 8)
    d = attr.last_decomposition
    torch.testing.assert_close(
        grid.flatten(1).sum(1), d.values[d.names.index("layers.0.blocks.1.attn")], rtol=1e-9, atol=1e-15
    )


def test_target_conventions() -> None:
    net, x = smooth_cnn(), random_images(2, 3, 16, 16)
    attr = LayerLieDerivative(net, net[3], "translate_y")
    per_image = attr.attribute(x, target=[3, 3])
    for t in (3, (3,), torch.tensor(3), torch.tensor([3, 3])):
        torch.testing.assert_close(attr.attribute(x, target=t), per_image)
    mixed = attr.attribute(x, target=torch.tensor([0, 4]))
    torch.testing.assert_close(mixed[1], attr.attribute(x[1:], target=4)[0])
    # batching: chunks give the same maps, targets sliced per chunk
    torch.testing.assert_close(attr.attribute(x, target=[0, 4], internal_batch_size=1), mixed)
    with pytest.raises(ValueError, match="one scalar per example"):
        attr.attribute(x)  # (B, 5) logits need a target
    with pytest.raises(ValueError, match="one scalar per example"):
        LieDerivativeAttribution(net).attribute(x)
    # a forward with one scalar per example needs none
    scalar = nn.Sequential(net, Pick(3))
    torch.testing.assert_close(LayerLieDerivative(scalar, net[3], "translate_y").attribute(x), per_image)
    pix = LieDerivativeAttribution(scalar, "translate_y").attribute(x)
    torch.testing.assert_close(pix, LieDerivativeAttribution(net, "translate_y").attribute(x, 3))


class Pick(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.k]


def test_reused_module_is_the_sum_of_its_calls_and_forward_args() -> None:
    net, x = SharedReLU().double().eval(), random_images(2, 3, 16, 16)
    every = LayerLieDerivative(net, None, "rotate").attribute(x, target=1)
    assert {"relu", "relu#1"} <= set(every)
    relu = LayerLieDerivative(net, net.relu, "rotate").attribute(x, target=1)
    torch.testing.assert_close(relu, every["relu"] + every["relu#1"])
    # additional_forward_args reach the forward; names stay the model's own
    attr = LayerLieDerivative(net, None, "rotate")
    scaled = attr.attribute(x, target=1, additional_forward_args=(2.0,))
    assert list(scaled) == list(every) and attr.last_decomposition.names == list(every)
    torch.testing.assert_close(scaled["conv1"], 2 * every["conv1"])
    pix = LieDerivativeAttribution(net, "rotate").attribute(x, 1, additional_forward_args=(2.0,))
    torch.testing.assert_close(pix, 2 * LieDerivativeAttribution(net, "rotate").attribute(x, 1))


def test_layer_input_is_the_map_of_the_op_that_produced_it() -> None:
    net, x = smooth_cnn(), random_images(2, 3, 16, 16)
    outputs = LayerLieDerivative(net, [net[0], net[3]], "rotate").attribute(x, target=0)
    inputs, delta = LayerLieDerivative(net, [net[0], net[4]], "rotate").attribute(
        x, target=0, attribute_to_layer_input=True, return_convergence_delta=True
    )
    assert torch.count_nonzero(inputs[0]) == 0 and inputs[0].shape == x.shape  # the image: nothing made
    torch.testing.assert_close(inputs[1], outputs[1])  # tanh reads the strided conv's output
    d = decompose(net, x, "rotate", target=0)
    torch.testing.assert_close(delta, d.total - d.values[d.names.index("3")], rtol=1e-9, atol=1e-14)


def test_model_left_unchanged_and_clear_errors() -> None:
    net, x = smooth_cnn().train(), random_images()
    modes = [m.training for m in net.modules()]

    def untouched() -> None:
        assert [m.training for m in net.modules()] == modes
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
        assert all(not m._backward_hooks for m in net.modules())

    LayerLieDerivative(net, net[2]).attribute(x, target=0)
    LieDerivativeAttribution(net).attribute(x, target=0, return_convergence_delta=True)
    untouched()
    with pytest.raises(ValueError, match="does not select"):
        LayerLieDerivative(net, net[2]).attribute(x, target=9)  # fails mid-way, inside the recording
    untouched()
    with pytest.raises(ValueError, match="one scalar per example"):
        LieDerivativeAttribution(net).attribute(x)
    untouched()
    with pytest.raises(TypeError, match="nn.Module"):
        LayerLieDerivative(lambda t: net(t), net[2])
    with pytest.raises(ValueError, match="not a submodule"):
        LayerLieDerivative(net, nn.ReLU())
    model = _resnet()
    with pytest.raises(ValueError, match="contains layer"):
        LayerLieDerivative(model, [model.layer1, model.layer1[0].conv1])
    with pytest.raises(ValueError, match="unknown transform"):
        LayerLieDerivative(net, net[2], "spin")
    with pytest.raises(ValueError, match="one image tensor"):
        LieDerivativeAttribution(net).attribute((x, x), target=0)
    holder = Holder(net)
    with pytest.raises(ValueError, match="not recorded as an op"):
        LayerLieDerivative(holder, holder.spare).attribute(x, target=0)
    untouched()


class Holder(nn.Module):
    """A model with a module its forward never calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.spare = net, nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
