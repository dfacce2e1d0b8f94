"""Requests with no meaningful answer get ONE clear error naming the problem and the fix (issue 14);
where a request has a meaningful answer instead, the answer is checked. Models come back unchanged
(weights, train/eval flags, hooks), also when the error is raised half-way."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import random_images, smooth_cnn
from model_state import assert_unchanged, snapshot
from PIL import Image
from torch import nn

import aliasscope as asc
from aliasscope.captum import LayerLieDerivative, LieDerivativeAttribution
from aliasscope.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")

X = random_images(4, 3, 16, 16)


# -- models ---------------------------------------------------------------------------------------


@functools.cache
def scripted() -> nn.Module:
    return torch.jit.script(smooth_cnn())


@functools.cache
def traced() -> nn.Module:
    return torch.jit.trace(smooth_cnn(), X[:1])


class Overflow(nn.Module):
    """``exp`` of the activations: inf wherever an image is bright enough (float64 overflows at 709)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


def overflowing(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    blocks = nn.Sequential(OrderedDict(act=nn.GELU(), exp=Overflow()))
    layers = OrderedDict(
        stem=nn.Conv2d(3, 4, 3, padding=1),
        blocks=blocks,
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        head=nn.Linear(4, classes),
    )
    return nn.Sequential(layers).double().eval()


BRIGHT = X.clone()
BRIGHT[[1, 3], :, 8, 8] = 1e4  # images 1 and 3 overflow in blocks.exp

NAN_WEIGHTS = smooth_cnn()
with torch.no_grad():
    NAN_WEIGHTS[3].weight[0, 0, 0, 0] = float("nan")


class Returns(nn.Module):
    """A classifier whose forward returns a tuple, a dict or an object with ``.logits``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net, self.kind = smooth_cnn(), kind

    def forward(self, x: torch.Tensor):
        y = self.net(x)
        if self.kind == "tuple":
            return x, y
        if self.kind == "dict":
            return {"hidden": x, "logits": y}
        return SimpleNamespace(logits=y, hidden=x)


def with_input_size(size: int) -> nn.Module:
    net = smooth_cnn()
    net.pretrained_cfg = {"input_size": (3, size, size)}
    return net


def _empty_checkpoint() -> str:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "resnet18.pth"
    path.write_bytes(b"")
    return str(path)


def _without_cuda(fn: Callable) -> Callable:
    def run():
        with mock.patch("torch.cuda.is_available", lambda: False):
            return fn()

    return run


# -- one row per request without a meaningful answer ---------------------------------------------

SCRIPTED = r"TorchScript model \(torch\.jit\.ScriptModule.*cannot be analysed.*nn\.Module.*pass that instead"
UPSAMPLE = r"upsample \(the upsampling factor\) must be an integer >= 2"

ANALYSES: dict[str, Callable[[nn.Module], object]] = {
    "lie_derivative": lambda m: asc.lie_derivative(m, X, "rotate"),
    "finite_difference": lambda m: asc.finite_difference(m, X, "rotate"),
    "equivariance_metrics": lambda m: asc.equivariance_metrics(m, X, ["rotate"], progress=False),
    "decompose": lambda m: asc.decompose(m, X, "rotate"),
    "spectral": lambda m: asc.spectral(m, X),
    "compare": lambda m: asc.compare({"m": m}, X, crop=16, progress=False),
    "blurpool": lambda m: asc.blurpool(m, example=X[:1]),
    "filtered_activation": lambda m: asc.filtered_activation(m, example=X[:1]),
    "circular_padding": lambda m: asc.circular_padding(m, example=X[:1]),
    "polyphase": lambda m: asc.polyphase(m, example=X[:1]),
    "record": lambda m: asc.record(m).__enter__(),
    "LayerLieDerivative": lambda m: LayerLieDerivative(m, None, "rotate"),
    "LieDerivativeAttribution": lambda m: LieDerivativeAttribution(m, "rotate"),
}

CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    *(
        (f"{kind}-{name}", functools.partial(lambda f, make: f(make()), f, make), TypeError, SCRIPTED)
        for kind, make in (("script", scripted), ("trace", traced))
        for name, f in ANALYSES.items()
    ),
    (
        "trace-named",
        lambda: asc.decompose(traced(), X, "rotate"),
        TypeError,
        r"made by torch\.jit\.trace",
    ),
    (
        "scripted-submodule",
        lambda: asc.lie_derivative(nn.Sequential(scripted()), X, "rotate"),
        TypeError,
        r"submodule '0' is a TorchScript module",
    ),
    (
        "record-compiled",
        lambda: asc.record(torch.compile(smooth_cnn())).__enter__(),
        TypeError,
        r"torch\.compile'd model cannot be recorded.*_orig_mod",
    ),
    # NaN/inf outputs: the images and the first module that produced non-finite values
    *(
        (
            f"nonfinite-{name}",
            f,
            ValueError,
            r"output contains NaN/inf for images \[1, 3\]; the first module producing non-finite values "
            r"is 'blocks\.exp' \(Overflow\)",
        )
        for name, f in (
            ("lie_derivative", lambda: asc.lie_derivative(overflowing(), BRIGHT, "rotate")),
            (
                "equivariance_metrics-batches",
                lambda: asc.equivariance_metrics(overflowing(), BRIGHT, batch_size=2, progress=False),
            ),
            ("decompose", lambda: asc.decompose(overflowing(), BRIGHT, "rotate")),
            ("decompose-batches", lambda: asc.decompose(overflowing(), BRIGHT, "rotate", batch_size=2)),
            ("decompose-vector", lambda: asc.decompose(overflowing(), BRIGHT, "rotate", target=None)),
            ("spectral-batches", lambda: asc.spectral(overflowing(), BRIGHT, batch_size=1)),
        )
    ),
    (
        "nonfinite-weights",
        lambda: asc.lie_derivative(NAN_WEIGHTS, X, "translate_x"),
        ValueError,
        r"images \[0, 1, 2, 3\]; the first module producing non-finite values is '3' \(Conv2d\) "
        r"\(its own parameters hold NaN/inf\)",
    ),
    (
        "nonfinite-head",
        lambda: asc.lie_derivative(smooth_cnn(), X, "rotate", output=lambda y: (y - 100).log()),
        ValueError,
        r"NaN/inf for images \[0, 1, 2, 3\], although the model's own output is finite: the output= head",
    ),
    # spectral factors
    ("spectral-upsample-1", lambda: asc.spectral(smooth_cnn(), X, upsample=1), ValueError, UPSAMPLE),
    ("spectral-upsample-2.5", lambda: asc.spectral(smooth_cnn(), X, upsample=2.5), ValueError, UPSAMPLE),
    (
        "spectral-convergence-1",
        lambda: asc.spectral(smooth_cnn(), X, convergence=(1,)),
        ValueError,
        r"each convergence factor must be an integer >= 2, got 1",
    ),
    (
        "spectral-batch_size-0",
        lambda: asc.spectral(smooth_cnn(), X, batch_size=0),
        ValueError,
        r"batch_size must be a positive integer",
    ),
    # fixes
    (
        "blurpool-twice",
        lambda: asc.blurpool(asc.blurpool(smooth_cnn(), example=X[:1]), example=X[:1]),
        ValueError,
        r"blurpool was already applied to '3'.*changes\(model\).*second blur",
    ),
    (
        "filtered_activation-up-1",
        lambda: asc.filtered_activation(smooth_cnn(), up=1, example=X[:1]),
        ValueError,
        r"up must be an integer >= 2, got 1",
    ),
    # compare
    (
        "compare-classes",
        lambda: asc.compare({"a": smooth_cnn(1000), "b": smooth_cnn(10)}, X, crop=16, progress=False),
        ValueError,
        r"different numbers of classes \('a' 1000, 'b' 10\)",
    ),
    (
        "compare-labels-length",
        lambda: asc.compare({"a": smooth_cnn()}, X, torch.tensor([0, 1]), crop=16, progress=False),
        ValueError,
        r"labels must hold one class index per image, shape \(4,\), got \(2,\)",
    ),
    (
        "compare-labels-range",
        lambda: asc.compare({"a": smooth_cnn()}, X, torch.tensor([0, 7, 5, 7]), crop=16, progress=False),
        ValueError,
        r"labels \[5, 7\] are outside the model's 5 classes \(0\.\.4\)",
    ),
    (
        "compare-quick-start-crop",
        lambda: asc.compare({"a": with_input_size(224)}, torch.zeros(1, 3, 224, 224, dtype=torch.float64)),
        ValueError,
        r"224-pixel crops .* needs images 256 pixels wide .*got 224x224.*crop= explicitly",
    ),
    (
        "compare-crop-too-big",
        lambda: asc.compare({"a": smooth_cnn()}, X, crop=32, progress=False),
        ValueError,
        r"crop must be an integer in \[16, 16\] for images 16x16, got 32",
    ),
    # decompose targets and output heads
    *(
        (
            f"target-{name}",
            lambda t=t: asc.decompose(smooth_cnn(), X, "rotate", target=t),
            TypeError,
            r"target must be an integer class index .*a float or bool is not a class index",
        )
        for name, t in (("float", 1.5), ("bool", True), ("float-tensor", torch.tensor([0.0, 1, 2, 3])))
    ),
    (
        "target-batch-sum",
        lambda: asc.decompose(smooth_cnn(), X, "rotate", target=lambda f: f.sum()),
        ValueError,
        r"one scalar per image, a tensor of shape \(4,\), got \(\) \(a reduction over the batch",
    ),
    *(
        (
            f"output-batch-sum-{name}",
            f,
            ValueError,
            r"output= callable must keep the batch dimension: it maps the model's output \(4, 5\) to \(\)",
        )
        for name, f in (
            ("lie_derivative", lambda: asc.lie_derivative(smooth_cnn(), X, "rotate", output=torch.sum)),
            ("decompose", lambda: asc.decompose(smooth_cnn(), X, "rotate", output=torch.sum)),
        )
    ),
    # names that match nothing
    (
        "select-nothing",
        lambda: asc.decompose(smooth_cnn(), X, "rotate", select="blocks.99*"),
        ValueError,
        r"select='blocks\.99\*' matches no op; ops are named like '0', '1', .*kinds: linear",
    ),
    (
        "spectral-select-nothing",
        lambda: asc.spectral(smooth_cnn(), X, select="attention"),
        ValueError,
        r"select='attention' matches no op",
    ),
    (
        "units-nothing",
        lambda: asc.decompose(overflowing(), X, "rotate", units=["block"]),
        ValueError,
        r"units entry 'block' matches no module path or class name .*close module paths: 'blocks'",
    ),
    (
        "layouts-nothing",
        lambda: asc.decompose(overflowing(), X, "rotate", layouts={"blocks.ex": asc.BCHW}),
        ValueError,
        r"layouts key 'blocks\.ex' matches no module path .*close module paths: 'blocks\.exp'",
    ),
    # one line instead of a traceback
    *(
        (f"device-{name}", f, ValueError, rx)
        for name, f, rx in (
            ("tpu", lambda: asc.load_model("resnet18", False, device="tpu"), r"unknown device 'tpu'"),
            (
                "cuda-absent",
                _without_cuda(lambda: asc.load_model("resnet18", False, device="cuda")),
                r"device 'cuda' requested but CUDA is not available",
            ),
        )
    ),
    ("load_model-None", lambda: asc.load_model(None), TypeError, r"name or a checkpoint path.*NoneType"),
    # half precision: refused with the fix (8-11 mantissa bits gave errors of several percent)
    *(
        (
            f"half-{name}-{dtype}",
            functools.partial(lambda f, d: f(smooth_cnn().to(d), X.to(d)), f, dtype),
            ValueError,
            r"computes in float32 or float64.*model is torch\.b?float16.*model\.float\(\) and images\.float",
        )
        for dtype in (torch.float16, torch.bfloat16)
        for name, f in (
            ("lie", lambda m, x: asc.lie_derivative(m, x, "rotate")),
            ("decompose", lambda m, x: asc.decompose(m, x, "rotate")),
            ("metrics", lambda m, x: asc.equivariance_metrics(m, x, ["rotate"], progress=False)),
        )
    ),
    (
        "half-images",
        lambda: asc.lie_derivative(smooth_cnn().float(), X.float().half(), "rotate"),
        ValueError,
        r"images are torch\.float16",
    ),
    (
        "load_model-empty-pth",
        lambda: asc.load_model(_empty_checkpoint()),
        ValueError,
        r"resnet18\.pth is an empty file \(0 bytes\)",
    ),
    (
        "batch_size-0",
        lambda: asc.equivariance_metrics(smooth_cnn(), X, batch_size=0, progress=False),
        ValueError,
        r"batch_size must be a positive integer, got 0",
    ),
    (
        "meta-images",
        lambda: asc.lie_derivative(smooth_cnn(), X.to("meta"), "rotate"),
        ValueError,
        r"images are on the meta device",
    ),
    (
        "meta-model",
        lambda: asc.lie_derivative(smooth_cnn().to("meta"), X, "rotate"),
        ValueError,
        r"parameters are on the meta device",
    ),
    (
        "transforms-empty",
        lambda: asc.equivariance_metrics(smooth_cnn(), X, [], progress=False),
        ValueError,
        r"transforms is empty",
    ),
    # models whose output is not one tensor: the right expression for each
    *(
        (
            f"returns-{kind}",
            lambda kind=kind: asc.lie_derivative(Returns(kind), X, "rotate"),
            TypeError,
            rf"returned a {what}, not a tensor.*wrapper.*forward\(x\) returns {expr} \(an output= callable",
        )
        for kind, what, expr in (
            ("tuple", "tuple", r"self\.model\(x\)\[0\]"),
            ("dict", r"dict with keys \['hidden', 'logits'\]", r"self\.model\(x\)\['logits'\]"),
            ("object", "SimpleNamespace", r"self\.model\(x\)\.logits"),
        )
    ),
    (
        "returns-dict-decompose",
        lambda: asc.decompose(Returns("dict"), X, "rotate"),
        TypeError,
        r"returns self\.model\(x\)\['logits'\]",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_clear_error(call: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# -- the model comes back unchanged after an error half-way ---------------------------------------


def _mixed(model: nn.Module) -> nn.Module:
    """Train mode with one submodule in eval mode and a hook of the user's: all must survive."""
    model.train()
    list(model.children())[1].eval()
    model.register_forward_hook(lambda *a: None)
    return model


@pytest.mark.parametrize(
    ("make", "call", "match"),
    [
        (overflowing, lambda m: asc.decompose(m, BRIGHT, "rotate", batch_size=2), "blocks.exp"),
        (overflowing, lambda m: asc.spectral(m, BRIGHT, batch_size=1), "blocks.exp"),
        (overflowing, lambda m: asc.equivariance_metrics(m, BRIGHT, batch_size=2, progress=False), "exp"),
        (smooth_cnn, lambda m: asc.decompose(m, X, "rotate", select="nothing*"), "matches no op"),
        (smooth_cnn, lambda m: asc.compare({"a": m, "b": smooth_cnn(3)}, X, crop=16), "classes"),
        (
            smooth_cnn,
            lambda m: asc.blurpool(asc.blurpool(m, example=X[:1]), example=X[:1]),
            "already applied",
        ),
    ],
    ids=["decompose-nonfinite", "spectral-nonfinite", "metrics-nonfinite", "select", "compare", "blurpool"],
)
def test_model_unchanged_after_the_error(make, call, match: str) -> None:
    model = _mixed(make())
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    assert_unchanged(model, snap)


# -- requests that have a meaningful answer ------------------------------------------------------


def test_a_single_transform_name_is_one_transform() -> None:
    one = asc.equivariance_metrics(smooth_cnn(), X, "rotate", progress=False)
    listed = asc.equivariance_metrics(smooth_cnn(), X, ["rotate"], progress=False)
    assert one.transforms == ["rotate"]
    torch.testing.assert_close(one.values, listed.values, rtol=0, atol=0)


def test_compiled_models_are_analysed_as_the_module_they_wrap() -> None:
    net = smooth_cnn()
    compiled = torch.compile(net)
    torch.testing.assert_close(
        asc.lie_derivative(compiled, X, "rotate"), asc.lie_derivative(net, X, "rotate"), rtol=0, atol=0
    )
    a = asc.decompose(compiled, X, "rotate", target=1)
    b = asc.decompose(net, X, "rotate", target=1)
    assert a.names == b.names
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    sa, sb = asc.spectral(compiled, X[:1], upsample=2), asc.spectral(net, X[:1], upsample=2)
    torch.testing.assert_close(sa.alias_ratio, sb.alias_ratio, rtol=0, atol=0, equal_nan=True)
    fixed = asc.blurpool(compiled, example=X[:1])  # a new plain module, the original untouched
    assert not isinstance(fixed, type(compiled)) and asc.changes(fixed)
    attr = LayerLieDerivative(compiled, net[3], "rotate").attribute(X[:1], target=0)
    assert attr.shape == (1, 8, 8, 8)


def test_compare_uses_the_models_input_size_as_crop() -> None:
    net = with_input_size(24)
    res = asc.compare({"a": net}, random_images(2, 3, 56, 56), transforms="translate_x",
                      layer_images=0, spectral_images=0, progress=False)  # fmt: skip
    assert res.settings["crop"] == 24 and res.settings["transforms"] == ["translate_x"]


# -- the command line: one line and exit code 2 ---------------------------------------------------

TINY = ["--model", "test_efficientnet", "--no-pretrained", "--transforms", "translate_x", "--quiet"]
LEAN = ["--no-layerwise", "--no-spectral", "--no-report"]


def _labelled(folder: Path, labels: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["file,class_index"]
    for i, label in enumerate(labels):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        rows.append(f"img{i}.png,{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (lambda tmp: ["--device", "tpu"], r"--device: unknown device 'tpu'"),
        (lambda tmp: ["--model", _empty_checkpoint()], r"resnet18\.pth is an empty file"),
        (
            lambda tmp: ["--images", str(_labelled(tmp / "imgs", [3, 1000, 1203]))],
            r"labels \[1000, 1203\] are outside the model's 1000 classes \(0\.\.999\)",
        ),
    ],
    ids=["device-tpu", "empty-pth", "labels-out-of-range"],
)
def test_cli_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv, match: str) -> None:
    assert main(["diagnose", *TINY, *LEAN, "--out", str(tmp_path / "out"), *argv(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aliasscope: error:"), err
    assert __import__("re").search(match, err[0]), err[0]
