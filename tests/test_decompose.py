"""Exact decomposition: completeness on every family, agreement with finite differences, results."""

from __future__ import annotations

import csv
import io
import json

import pytest
import timm
import torch
from helpers import IMAGENET_SAMPLE, random_images, smooth_cnn
from torch import nn

import aliasscope as asc
from aliasscope._resampling import resample
from aliasscope.capture import record
from aliasscope.decomposition import Decomposition, decompose, local_lie_derivative
from aliasscope.generators import apply_generator
from aliasscope.lie import lie_derivative

# the model list, at sizes CI can afford (random init; heads re-initialised where timm zeroes them)
FAMILIES = {
    "resnet50": ({}, 64),
    "convnext_tiny": ({}, 64),
    "vit_small_patch16_224": ({"img_size": 64}, 64),
    "deit_tiny_distilled_patch16_224": ({"img_size": 64}, 64),
    "mixer_b16_224": ({"img_size": 64}, 64),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 2}, 64),
    "efficientnet_b0": ({}, 64),
    "mobilenetv3_large_100": ({}, 64),
    "regnety_008": ({}, 64),
}


def _model(name: str, dtype: torch.dtype) -> nn.Module:
    kwargs, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    head = model.get_classifier()
    if isinstance(head, nn.Linear) and head.weight.abs().max() == 0:
        nn.init.normal_(head.weight, std=0.02)
    return model.to(dtype)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_completeness_on_every_family(name: str, dtype: torch.dtype, tol: float) -> None:
    model = _model(name, dtype)
    size = FAMILIES[name][1]
    x = torch.randn(2, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for transform in ("translate_x", "rotate", "scale"):
        d = decompose(model, x, transform, target="pred", output="softmax")
        assert d.completeness_error <= tol, (transform, d.completeness_error)
        assert (d.unattributed.abs() <= 0.01 * d.total.abs()).all()
        assert d.num_ops > 20


def test_swin_windows_decompose_exactly_with_scalar_and_vector_targets() -> None:
    """Window attention, cyclic shifts and window moves in the op list; per-image inner products over
    window-folded batches; the vector route through window layouts matches the scalar one."""
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=2, depths=(2, 1, 1, 1), num_classes=5
    )
    model = model.double().eval()
    x = random_images(2, 3, 32, 32)
    scalar = decompose(model, x, "rotate", target=3, output="softmax", keep_maps=True)
    vector = decompose(model, x, "rotate", target=None, output="softmax", keep_maps=True, group_size=8)
    assert scalar.completeness_error < 1e-9 and vector.completeness_error < 1e-9
    assert "layers.0.blocks.0.attn" in scalar.names and "layers.0.blocks.1.roll" in scalar.names
    torch.testing.assert_close(scalar.values, vector.extra["vectors"][:, :, 3], rtol=1e-9, atol=1e-15)
    attn = scalar.values[scalar.names.index("layers.0.blocks.1.attn")]
    assert attn.shape == (2,) and attn.abs().max() > 0
    where = scalar.spatial_map("layers.0.blocks.1.attn")  # windows put back on the 8x8 grid
    assert where.shape == (2, 8, 8)
    torch.testing.assert_close(where.sum((1, 2)), attn, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("units", ["paper", ["BatchNormAct2d"]])
def test_completeness_with_units_that_hide_an_activation(units: str) -> None:
    # timm's BatchNormAct2d is a BatchNorm subclass with a ReLU6 inside: recorded whole (as the paper's
    # grouping does), it must not be taken for an affine eval BatchNorm (its contribution was dropped)
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval().double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d = decompose(model, x, "translate_x", target="pred", output="softmax", units=units)
    assert d.completeness_error <= 1e-9, d.completeness_error
    if units == "paper":
        assert any(n == "bn1" for n in d.names)


@pytest.mark.slow
def test_completeness_on_pretrained_lite0_and_real_photos() -> None:
    from aliasscope.data import load_images
    from aliasscope.models import load_model

    model, preprocess = load_model("tf_efficientnet_lite0")
    source = IMAGENET_SAMPLE / "labels.csv" if IMAGENET_SAMPLE.exists() else None
    batch = (
        load_images(source, preprocess, every=500, limit=2)
        if source
        else load_images(None, preprocess, limit=2)
    )
    for transform in ("translate_x", "rotate", "scale"):
        d = decompose(model, batch.images, transform, target="pred", output="softmax")
        ref = lie_derivative(model, batch.images, transform, output="softmax")
        pred = model(batch.images).argmax(1)
        torch.testing.assert_close(d.total.float(), ref.gather(1, pred[:, None])[:, 0], rtol=1e-3, atol=1e-7)
        assert d.completeness_error <= 1e-4
        assert {"nonlinearity", "downsampling", "linear"} <= set(d.kinds)


@pytest.mark.parametrize("output", ["logits", "softmax", "log_softmax"])
@pytest.mark.parametrize("target", [3, [1, 4], "pred"])
def test_total_equals_the_end_to_end_lie_derivative(output: str, target) -> None:
    net, x = smooth_cnn(), random_images(2, 3, 20, 24)
    d = decompose(net, x, "rotate", target=target, output=output)
    full = lie_derivative(net, x, "rotate", output=output)
    idx = net(x).argmax(1) if target == "pred" else torch.as_tensor(target).expand(2)
    torch.testing.assert_close(d.total, full.gather(1, idx[:, None])[:, 0].double(), rtol=1e-10, atol=1e-14)
    assert d.completeness_error < 1e-12


def test_callable_target_and_image_like_output() -> None:
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 2, 3, stride=2, padding=1)
    ).double()
    x = random_images(2, 3, 12, 12)

    def energy(f: torch.Tensor) -> torch.Tensor:
        return (f**2).sum((1, 2, 3))

    d = decompose(net, x, "translate_y", target=energy)
    lie = lie_derivative(net, x, "translate_y")  # image-like output: J D x - D F
    expected = (2 * net(x) * lie).sum((1, 2, 3))
    torch.testing.assert_close(d.total, expected, rtol=1e-10, atol=1e-14)
    assert d.completeness_error < 1e-12


def _fd_local(op, transform: str, eps: float = 1e-6) -> torch.Tensor:
    """rho(-t) f(rho(t) h) differentiated at 0 by resampling (BCHW ops)."""

    def g(t: float) -> torch.Tensor:
        out = op.replay(*(resample(h, transform, t) for h in op.inputs))
        return resample(out, transform, -t)

    return (g(eps) - g(-eps)) / (2 * eps)


@pytest.mark.parametrize("transform", ["translate_x", "rotate", "scale"])
def test_local_lie_derivatives_match_finite_differences(transform: str) -> None:
    net, x = smooth_cnn(), random_images(2, 3, 16, 16)
    with torch.no_grad(), record(net) as rec:
        net(x)
    checked = 0
    for op in rec:
        if op.layout.kind == "bchw" and all(lay.kind == "bchw" for lay in op.in_layouts):
            (v,) = local_lie_derivative(op, transform, "central")
            scale = apply_generator(op.outputs[0], transform).norm()  # v is 0 for BatchNorm: compare to D h
            assert (v - _fd_local(op, transform)).norm() <= 1e-4 * scale, op.name
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("generator", ["central", "fourier"])
def test_ops_skipped_as_exactly_equivariant_have_zero_local_lie_derivative(generator: str) -> None:
    """Per-position Linears (tokens, channels-last), unpadded 1x1 convs and ops between invariant
    tensors are skipped: their v_i, computed anyway, is 0 to rounding; padded 1x1 and 3x3 convs are
    not skipped."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).double().eval()
    convnext = timm.create_model("convnext_atto", num_classes=4).double().eval()
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.GELU(), nn.Conv2d(4, 4, 1, padding=1), nn.Conv2d(4, 4, 3), nn.Flatten(2)
    ).double()
    skipped = set()
    for model, size in ((vit, 32), (convnext, 32), (cnn, 12)):
        with torch.no_grad(), record(model) as rec:
            model(random_images(2, 3, size, size))
        for op in rec:
            if not op.exactly_equivariant or op.op in ("reshape", "view", "permute", "transpose", "flatten"):
                continue
            for transform in ("translate_x", "rotate"):
                vs = local_lie_derivative(op, transform, generator)
                for v, h, lay in zip(vs, op.outputs, op.out_layouts, strict=True):
                    scale = apply_generator(h, transform, generator, lay).norm().clamp_min(1e-300)
                    assert v.norm() <= 1e-12 * scale or v.norm() == 0, op.name
            skipped.add((type(model).__name__, op.op))
    assert {("VisionTransformer", "Linear"), ("ConvNeXt", "Linear"), ("Sequential", "Conv2d")} <= skipped
    names = {op.name: op.exactly_equivariant for op in rec}
    assert names["0"] and not names["2"] and not names["3"]  # 1x1 unpadded / 1x1 padded / 3x3


def test_contributions_match_finite_differences_of_the_target() -> None:
    """c_i = <dT/dh_i, v_i>, with v_i by finite differences and the gradient by autograd."""
    net, x = smooth_cnn(), random_images(2, 3, 16, 16)
    d = decompose(net, x, "rotate", target=1, keep_maps=True)
    with torch.no_grad(), record(net) as rec:
        net(x)
    for op in rec:
        if op.name not in ("0", "2", "3") or op.name not in d.names:
            continue
        i = d.names.index(op.name)
        v_fd = _fd_local(op, "rotate")
        h = op.outputs[0].detach().requires_grad_(True)
        rest = net[int(op.name) + 1 :]
        (g,) = torch.autograd.grad(rest(h)[:, 1].sum(), h)
        # v_fd carries ~1e-5 relative finite-difference noise; contributions here are ~1e-2
        torch.testing.assert_close(d.values[i], (g * v_fd).sum((1, 2, 3)), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(d.maps[op.name].sum((1, 2, 3)), d.values[i])


def test_batch_size_joins_parts_equal_to_one_pass() -> None:
    model = smooth_cnn()
    x = random_images(5, h=16, w=16).double()
    labels = torch.tensor([0, 1, 2, 3, 4])
    whole = decompose(model, x, "rotate", target=labels, keep_maps=True)
    parts = decompose(model, x, "rotate", target=labels, keep_maps=True, batch_size=2)
    torch.testing.assert_close(parts.values, whole.values, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(parts.total, whole.total, rtol=1e-9, atol=1e-12)
    assert parts.completeness_error < 1e-9 and parts.names == whole.names
    name = parts.names[0]
    torch.testing.assert_close(parts.maps[name], whole.maps[name], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        decompose(model, x, "rotate", batch_size=0)


def test_cuda_graph_needs_a_gpu_and_a_scalar_target() -> None:
    model, x = smooth_cnn(), random_images(4, h=16, w=16)
    with pytest.raises(ValueError, match="not on a CUDA device"):
        decompose(model, x, "rotate", target=0, batch_size=2, cuda_graph=True)
    auto = decompose(model, x, "rotate", target=0, batch_size=2)  # None: eager on the CPU
    assert "cuda_graph" not in auto.extra and auto.completeness_error < 1e-4


class _DataDependent(nn.Module):
    """Takes a branch on the data (a host sync): cannot be captured as a CUDA graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = torch.relu(h) if h.mean() > 0 else torch.tanh(h)
        return self.fc(h.mean((2, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("target", ["pred", 1, "per-image"])
def test_cuda_graph_replay_equals_eager_batches(target) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5).eval().cuda()
    x = random_images(7, h=32, w=32).float().cuda()
    tgt = torch.tensor([0, 1, 2, 3, 4, 0, 1]) if target == "per-image" else target
    eager = decompose(model, x, "rotate", target=tgt, keep_maps=True, batch_size=3, cuda_graph=False)
    graphed = decompose(model, x, "rotate", target=tgt, keep_maps=True, batch_size=3, cuda_graph=True)
    assert graphed.names == eager.names and graphed.target == eager.target
    scale = eager.values.abs().max().item()
    torch.testing.assert_close(graphed.values, eager.values, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(graphed.total, eager.total, rtol=1e-4, atol=1e-5 * scale)
    assert graphed.completeness_error < 1e-4 and graphed.extra.get("cuda_graph") is True
    assert sorted(graphed.maps) == sorted(eager.maps) and len(eager.maps) > 10
    for name, m in eager.maps.items():
        torch.testing.assert_close(graphed.maps[name], m, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_falls_back_to_eager_with_a_warning() -> None:
    torch.manual_seed(0)
    model, x = _DataDependent().cuda().eval(), random_images(4, h=16, w=16).float().cuda()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="eagerly"):
        got = decompose(model, x, "rotate", target=0, batch_size=2)
    want = decompose(model, x, "rotate", target=0, batch_size=2, cuda_graph=False)
    torch.testing.assert_close(got.values, want.values)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_select_moves_the_rest_to_unattributed() -> None:
    net, x = smooth_cnn(), random_images()
    full = decompose(net, x, "rotate", target=0)
    nonlin = decompose(net, x, "rotate", target=0, select="nonlinearity")
    assert set(nonlin.kinds) == {"nonlinearity"}
    rest = full.values[[k != "nonlinearity" for k in full.kinds]].sum(0)
    torch.testing.assert_close(nonlin.unattributed, rest, rtol=1e-9, atol=1e-15)
    assert nonlin.completeness_error == full.completeness_error
    by_name = decompose(net, x, "rotate", target=0, select=["0", "3"])
    assert by_name.names == ["0", "3"]


def test_results_export(tmp_path) -> None:
    d = decompose(smooth_cnn(), random_images(), "translate_x", target=0)
    rows = list(csv.DictReader(io.StringIO(d.to_csv(tmp_path / "layers.csv"))))
    assert [r["name"] for r in rows] == d.names
    assert abs(sum(float(r["share"]) for r in rows) - 1) < 1e-9
    data = json.loads(d.to_json(tmp_path / "d.json"))
    assert data["num_ops"] == d.num_ops and data["completeness_error"] == d.completeness_error
    kinds = d.by_kind()
    assert abs(sum(r["share"] for r in kinds.values()) - 1) < 1e-9
    assert d.top(3)[0]["share"] >= d.top(3)[-1]["share"]
    assert "completeness error" in str(d)


def test_bad_targets_and_methods() -> None:
    net, x = smooth_cnn(), random_images()
    with pytest.raises(ValueError, match="class index in \\[0, 5\\)"):
        decompose(net, x, "rotate", target=7)
    with pytest.raises(ValueError, match="unknown target 'best'"):
        decompose(net, x, "rotate", target="best")
    with pytest.raises(ValueError, match="one scalar per image"):
        decompose(net, x, "rotate", target=lambda f: f.sum())
    with pytest.raises(ValueError, match="unknown method"):
        decompose(net, x, "rotate", target=0, method="magic")
    with pytest.raises(ValueError, match="unknown transform"):
        decompose(net, x, "spin", target=0)


def test_model_without_image_input() -> None:
    with pytest.raises(ValueError, match="4-D"):
        decompose(nn.Linear(10, 3).double(), torch.randn(4, 10, dtype=torch.float64), "rotate", target=0)


def test_model_restored_after_an_error_mid_way() -> None:
    net = smooth_cnn().train()
    modes = [m.training for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def explode(f: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("target failed")

    with pytest.raises(RuntimeError, match="target failed"):
        decompose(net, random_images(), "rotate", target=explode)
    assert [m.training for m in net.modules()] == modes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_vector_decomposition_is_complete_and_matches_scalar_targets(output: str) -> None:
    net, x = smooth_cnn(), random_images(2, 3, 16, 20)
    vec = decompose(net, x, "rotate", target=None, output=output, keep_maps=True, group_size=3)
    assert vec.total.shape == (2, 5) and vec.unattributed.shape == (2, 5)
    assert vec.completeness_error < 1e-12
    torch.testing.assert_close(vec.total, lie_derivative(net, x, "rotate", output=output).double())
    vectors = vec.extra["vectors"]  # (ops, B, K)
    torch.testing.assert_close(vec.values, vectors.flatten(2).norm(dim=2))
    for k in (0, 3):
        scalar = decompose(net, x, "rotate", target=k, output=output)
        torch.testing.assert_close(scalar.values, vectors[:, :, k], rtol=1e-9, atol=1e-15)


def test_vector_decomposition_through_residual_branches_for_any_group_size() -> None:
    """Tangent slots enter at their op and are widened where residual branches meet: every grouping
    gives the same vectors, equal to the scalar decomposition of each class."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4).double().eval()
    x = random_images(2, 3, 32, 32)
    kw = {"target": None, "output": "softmax", "keep_maps": True}
    one = decompose(model, x, "rotate", group_size=1000, **kw).extra["vectors"]
    for size in (1, 5):
        torch.testing.assert_close(
            decompose(model, x, "rotate", group_size=size, **kw).extra["vectors"], one, rtol=1e-9, atol=1e-15
        )
    scalar = decompose(model, x, "rotate", target=2, output="softmax")
    torch.testing.assert_close(scalar.values, one[:, :, 2], rtol=1e-9, atol=1e-15)


def test_vector_decomposition_on_a_vit_with_prefix_tokens() -> None:
    model = _model("deit_tiny_distilled_patch16_224", torch.float64)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    vec = decompose(model, x, "translate_x", target=None, output="softmax", group_size=16)
    assert vec.completeness_error < 1e-9


def test_probe_estimator_agrees_with_exact_norms_within_sampling_error() -> None:
    net, x = smooth_cnn(), random_images(2, 3, 16, 16)
    exact = decompose(net, x, "scale", target=None, output="softmax")
    probe = decompose(net, x, "scale", target=None, output="softmax", method="probe", num_probes=800)
    assert probe.names == exact.names
    big = exact.values > 1e-3 * exact.values.max()
    ratio = (probe.values[big] / exact.values[big]) ** 2  # estimates of squared norms
    # mean of 800 chi-square(1) draws: relative std sqrt(2/800) = 5%; allow 4 sigma
    assert ((ratio - 1).abs() < 0.2).all(), ratio
    assert (probe.values[~big] <= 1e-2 * exact.values.max()).all()
    with pytest.raises(ValueError, match="use target=None"):
        decompose(net, x, "scale", target=0, method="probe")


class _Embedded(nn.Module):
    """A position embedding produced by a submodule from its own parameters, then added."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pos = nn.Linear(2, 4 * 8 * 8)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.pos(torch.ones(2, dtype=x.dtype)).reshape(1, 4, 8, 8)
        y = torch.tanh(self.conv(x) + pos)
        return self.head(y.mean((2, 3)))


def test_modules_on_parameters_only_are_constants_not_ops() -> None:
    torch.manual_seed(6)
    model = _Embedded().double().eval()
    d = decompose(model, random_images(2, 3, 8, 8), "rotate", target=1)
    assert "pos" not in d.names
    assert d.kinds[d.names.index("add")] == "position_embed"
    assert d.completeness_error < 1e-12


class _Cancelling(torch.nn.Module):
    """Two identical branches subtracted: the output is exactly 0 (invariant), each branch is not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.GELU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.GELU())
        self.b.load_state_dict(self.a.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a(x) - self.b(x)).mean((2, 3))


def test_completeness_relative_to_the_contributions_when_the_total_cancels():
    """Issue 16 item 4: total 0 with contributions of 1e-2 that cancel; the error relative to
    max(|total|, sum |c_i|) stays at rounding while the one relative to |total| means nothing."""
    model = _Cancelling().double().eval()
    dec = decompose(model, random_images(2, h=16, w=16), "translate_x", target=0)
    assert dec.total.abs().max().item() == 0.0
    assert dec.values.abs().sum(0).min().item() > 1e-3
    assert dec.completeness_error_mass <= 1e-14
    assert dec.mass_norm > 1e-3 and dec.residual_norm <= 1e-16
    assert "of sum |c_i|" in dec.summary()
    both = Decomposition.concat([dec, dec])
    assert both.mass_norm == pytest.approx(dec.mass_norm * 2**0.5, rel=1e-12)
    assert both.completeness_error_mass <= 1e-14


class _Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.act = torch.nn.Tanh()
        self.head = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + self.act(self.conv(x))).mean((2, 3)))


def test_a_lost_layout_is_reported_as_a_leak():
    """Issue 16 item 3: forcing a grid tensor to INVARIANT books the conv's error on the residual add:
    completeness still holds (the sum is right), the leak check fails loudly."""
    model, x = _Residual().double().eval(), random_images(2, h=16, w=16)
    honest = decompose(model, x, "translate_x")
    assert honest.passed and honest.leak <= 1e-14 and honest.checks["leak"] <= 1e-14
    with pytest.warns(asc.SelfCheckWarning, match="leak"):
        broken = decompose(model, x, "translate_x", layouts={"act": asc.INVARIANT})
    assert broken.completeness_error <= 1e-12  # the sum cannot see it
    assert broken.leak > 1e-3 and not broken.passed
    assert broken.by_kind()["residual"]["share"] == pytest.approx(broken.leak, rel=1e-9)


def test_a_view_whose_base_resolves_back_to_itself_is_not_followed_forever():
    """Regression (zoo sweep): mobilevit_xs, cspresnet50d and cs3sedarknet_xdw hit a RecursionError in
    the in-place functionalizer's view resolution; they decompose exactly, the jvp check agreeing."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xs").double().eval()
    dec = decompose(model, random_images(1, h=64, w=64), "translate_x")
    assert dec.passed and dec.completeness_error <= 1e-12


def test_class_tokens_joined_again_in_a_later_stage_decompose_exactly():
    """Zoo sweep: PiT concatenates its (attention-pooled, invariant) class tokens with the grid tokens
    of each later stage; that cat is token prefixing, so the decomposition is exact and leak-free."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("pit_ti_distilled_224", img_size=64).double().eval()
    dec = decompose(model, random_images(1, h=64, w=64), "translate_x")
    assert dec.passed and dec.completeness_error <= 1e-12 and dec.leak <= 1e-12


class _FoldedAttention(nn.Module):
    """Attention over 2x2 windows folded into the batch by custom code (no layout known inside: the
    module is recorded as one op, collapsed after the forward)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        win = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        q, k, v = self.qkv(win).chunk(3, dim=-1)
        out = self.proj((q @ k.transpose(-2, -1)).softmax(-1) @ v)
        return out.reshape(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class _SharedInput(nn.Module):
    """MViTv2's pattern: the normalised tokens feed both a collapsed attention and a side branch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = nn.Conv2d(3, 4, 2, stride=2), nn.LayerNorm(4)
        self.attn, self.side, self.head = _FoldedAttention(4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.embed(x).permute(0, 2, 3, 1))
        y = torch.nn.functional.gelu(self.side(y)) + self.attn(y)
        return self.head(y.mean((1, 2)))


@pytest.mark.parametrize("target", [1, None])
def test_a_collapsed_region_sharing_its_input_decomposes_exactly(target) -> None:
    """A region collapsed after the forward is credited the gradient through its own code only: before
    every module call had private input aliases, its input's gradient summed every reader's (here the
    side branch's too) and MViTv2 completed to 0.15 only."""
    torch.manual_seed(0)
    model = _SharedInput().double().eval()
    dec = decompose(model, random_images(2, h=16, w=16), "rotate", target=target)
    assert dec.kinds[dec.names.index("attn")] == "attention"
    assert dec.completeness_error <= 1e-12 and dec.leak <= 1e-12
    assert dec.values[dec.names.index("attn")].abs().max() > 1e-6


class _PatchEmbed(nn.Module):
    """A ViT stem by reshape (NaFlexViT's batch_patchify): (B, C, H, W) -> (B, N, p * p * C) -> Linear."""

    def __init__(self, p: int = 4) -> None:
        super().__init__()
        self.p, self.proj = p, nn.Linear(3 * p * p, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.p
        patches = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return self.proj(patches.reshape(b, (h // p) * (w // p), p * p * c))


class _SpaceToDepth(nn.Module):
    """TResNet's stem, a module without children (recorded as one op): (B, C, H, W) -> (B, C p², H/p, W/p)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(b, c * 4, h // 2, w // 2)


class _Patchify(nn.Module):
    """The reshape patch embedding beside a space-to-depth by reshape and a SpaceToDepth module."""

    def __init__(self, p: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.embed, self.conv, self.p = _PatchEmbed(p), nn.Conv2d(3 * p * p, 8, 1), p
        self.s2d, self.conv2 = _SpaceToDepth(), nn.Conv2d(12, 8, 1)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, c, h, w = x.shape
        p = self.p
        tokens = self.embed(x).relu()
        depth = x.view(b, c, h // p, p, w // p, p).permute(0, 3, 5, 1, 2, 4)
        depth = depth.reshape(b, c * p * p, h // p, w // p)
        grid = self.conv(depth).relu()
        grid2 = self.conv2(self.s2d(x)).relu()
        return self.head(torch.cat([tokens.mean(1), grid.mean((2, 3)), grid2.mean((2, 3))], 1))


@pytest.mark.parametrize("transform", ["translate_x", "rotate"])
def test_patchify_by_reshape_is_a_patch_embedding_and_decomposes_exactly(transform: str) -> None:
    """The reshape that merges a patch's pixels into channels puts the activation on the coarse grid of
    patches: not data movement (it aliases like a stride-p convolution), so not a leak."""
    torch.manual_seed(0)
    model = _Patchify().double().eval()
    dec = decompose(model, random_images(2, h=16, w=16), transform)
    kinds = dict(zip(dec.names, dec.kinds, strict=True))
    assert kinds["embed.reshape"] == "patch_embed" and kinds["reshape"] == kinds["s2d"] == "downsampling"
    assert dec.layouts[dec.names.index("embed.reshape")] == "tokens(4x4)"
    assert dec.layouts[dec.names.index("reshape")] == "bchw"
    assert dec.completeness_error <= 1e-12 and dec.leak <= 1e-12
    for name in ("embed.reshape", "reshape", "s2d"):
        assert dec.values[dec.names.index(name)].abs().max() > 1e-3


class _PooledQueryAttention(nn.Module):
    """MViTv2's / LeViT's attention with subsampled queries: the scores (B, N/4 + 1, N + 1) live on two
    grids, so the module is recorded as one op, from tokens on a 4x4 grid to tokens on its 2x2 subgrid
    (the class token kept)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        b, n, c = q.shape
        grid = q[:, 1:].reshape(b, 4, 4, c)[:, ::2, ::2].reshape(b, 4, c)
        q = torch.cat([q[:, :1], grid], 1)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


class _PooledQueries(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.cls = nn.Conv2d(3, 4, 4, stride=4), nn.Parameter(torch.randn(1, 1, 4))
        self.attn, self.head = _PooledQueryAttention(4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        t = self.attn(t)
        return self.head(t[:, 1:].mean(1) + t[:, 0])


def test_attention_with_subsampled_queries_is_one_op_onto_the_subgrid() -> None:
    torch.manual_seed(0)
    model = _PooledQueries().double().eval()
    dec = decompose(model, random_images(2, h=16, w=16), "rotate")
    i = dec.names.index("attn")
    assert dec.kinds[i] == "attention" and dec.layouts[i] == "tokens(2x2+1)"
    assert not any(n.startswith("attn.") for n in dec.names)
    assert dec.completeness_error <= 1e-12 and dec.leak <= 1e-12
    assert dec.values[i].abs().max() > 1e-6


class _StridedAfterBatchNorm(nn.Module):
    """LeViT's subsampled queries after an eval BatchNorm2d: torch's CPU batch_norm backward gets this
    strided gradient wrong (torch 2.14.1), so the decomposition's total and contributions were off."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.Linear(8, 3)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        b, c, h, w = y.shape
        q = y.flatten(2).transpose(1, 2).reshape(b, h, w, c)[:, ::2, ::2].reshape(b, -1, c)
        return self.head(q.relu().mean(1))


def test_eval_batchnorm_with_a_strided_gradient_decomposes_exactly() -> None:
    torch.manual_seed(0)
    model = _StridedAfterBatchNorm().double().eval()
    x = random_images(1, h=16, w=16)  # a batch of one: the strides torch's kernel gets wrong
    dec = decompose(model, x, "translate_x", verify="jvp")
    assert dec.checks["total_vs_jvp"] <= 1e-12 and dec.completeness_error <= 1e-12
    assert dec.values.abs().sum() > 1e-6


def test_without_batch_size_images_go_in_the_devices_automatic_batches(monkeypatch) -> None:
    """batch_size=None splits the images into the automatic batch (16 on the CPU: 96 lite0 images
    at once held 16.5 GB); the joined result equals one pass over all of them."""
    import aliasscope.decomposition._api as api

    net, x = smooth_cnn(), random_images(5, 3, 16, 16)
    whole = decompose(net, x, "rotate", target="pred", output="softmax", batch_size=5)
    batches = []
    one_batch = api.decompose_batch
    monkeypatch.setattr(api, "auto_batch_size", lambda device: 2)
    monkeypatch.setattr(
        api, "decompose_batch", lambda m, xs, s: batches.append(len(xs)) or one_batch(m, xs, s)
    )
    auto = decompose(net, x, "rotate", target="pred", output="softmax")
    assert batches == [2, 2, 1]
    assert auto.values.shape == whole.values.shape
    torch.testing.assert_close(auto.values, whole.values, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(auto.total, whole.total, rtol=1e-12, atol=1e-15)
