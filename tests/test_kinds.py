"""The op-kind registry: complete records, the views derived from it, and kinds flowing from a
registration through capture, the figures and the report."""

from __future__ import annotations

import dataclasses

import matplotlib
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import random_images, smooth_cnn
from matplotlib.colors import is_color_like, to_hex
from torch import nn

import aliasscope
from aliasscope import _plots as plots
from aliasscope import _report as report
from aliasscope import capture, kinds
from aliasscope.capture import record
from aliasscope.comparison import Comparison
from aliasscope.decomposition import decompose
from aliasscope.fixes import FIXES
from aliasscope.kinds import Fix, Kind, get_kind, register_kind, unregister_kind

matplotlib.use("Agg")

# the kinds that suggested a fix before the registry (report.FIX_FOR_KIND)
_WITH_FIX = {
    "nonlinearity",
    "downsampling",
    "pooling",
    "linear",
    "patch_embed",
    "position_embed",
    "attention",
    "normalisation",
}


@pytest.fixture
def temporary_kind():
    """Register kinds for one test; they are removed after it, whatever happens."""
    added: list[str] = []

    def add(kind: Kind) -> Kind:
        register_kind(kind)
        added.append(kind.name)
        return kind

    yield add
    for name in added:
        unregister_kind(name)


def test_every_registered_kind_is_complete() -> None:
    registry = [get_kind(name) for name in kinds.kind_names()]
    assert [k.name for k in registry] == list(kinds.KINDS)
    for k in registry:
        assert isinstance(k.description, str) and k.description.strip(), k.name
        assert is_color_like(k.colour), (k.name, k.colour)
        assert k.fix is None or (isinstance(k.fix, Fix) and k.fix.advice.strip()), k.name
        assert k.fix is None or k.fix.name == "" or k.fix.name in FIXES, (k.name, k.fix)
    precedences = [k.precedence for k in registry]
    assert len(set(precedences)) == len(precedences)
    assert {k.name for k in registry if k.fix is not None} >= _WITH_FIX
    assert len({to_hex(k.colour) for k in registry}) == len(registry)  # no two kinds look alike
    functions = [f for k in registry for f in k.functions]
    assert len(set(functions)) == len(functions)  # a function name means one kind


def test_views_are_the_registry_and_importable_where_they_were() -> None:
    registry = [get_kind(name) for name in kinds.kind_names()]
    assert kinds.KINDS == {k.name: k.description for k in registry}
    assert kinds.KIND_COLOURS == {k.name: k.colour for k in registry}
    assert kinds.FIX_FOR_KIND == {k.name: (k.fix.name, k.fix.advice) for k in registry if k.fix}
    assert capture.KINDS is kinds.KINDS and aliasscope.KINDS is kinds.KINDS
    assert plots.KIND_COLOURS is kinds.KIND_COLOURS and report.FIX_FOR_KIND is kinds.FIX_FOR_KIND
    assert aliasscope.get_kind is get_kind and aliasscope.register_kind is register_kind
    # the precedence and the zero kinds as they were before the registry
    old = [
        "attention",
        "patch_embed",
        "downsampling",
        "upsampling",
        "position_embed",
        "token_mixing",
        "nonlinearity",
        "normalisation",
        "pooling",
        "residual",
        "linear",
        "other",
        "layout",
    ]
    assert [k for k in kinds.precedence_order() if k in old] == old
    assert [k.name for k in registry if k.zero] == ["layout"]
    assert [k.name for k in registry if k.pointwise] == ["nonlinearity"]


_MODELS = {
    "resnet18": {},
    "vit_tiny_patch16_224": {"img_size": 64},
    "swin_tiny_patch4_window7_224": {"img_size": 64, "window_size": 2},
    "mixer_s16_224": {"img_size": 64},
    "convnext_atto": {},
    "efficientnet_b0": {},
}


@pytest.mark.parametrize("name", list(_MODELS))
def test_every_recorded_kind_is_registered(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, **_MODELS[name]).eval()
    with torch.no_grad(), record(model) as rec:
        model(torch.randn(1, 3, 64, 64))
    unknown = {op.name: op.kind for op in rec if op.kind not in kinds.KINDS}
    assert not unknown
    assert all(kinds.kind_colour(k) != kinds.UNKNOWN_COLOUR for k in rec.kinds)


def test_get_kind_names_the_valid_kinds() -> None:
    assert get_kind("layout").zero and get_kind(get_kind("linear")) is get_kind("linear")
    with pytest.raises(
        ValueError, match=r"unknown op kind 'nope'; valid kinds: nonlinearity, downsampling, .*other"
    ):
        get_kind("nope")


def test_register_kind_refuses_clashes(temporary_kind) -> None:
    with pytest.raises(ValueError, match=r"op kind 'linear' is already registered"):
        register_kind(Kind("linear", "again", colour="#123456", precedence=999))
    with pytest.raises(ValueError, match=r"precedence 10 is 'attention'"):
        register_kind(Kind("clash", "a clash", colour="#123456", precedence=10))
    with pytest.raises(ValueError, match=r"function 'relu' already means kind 'nonlinearity'"):
        register_kind(Kind("clash", "a clash", colour="#123456", precedence=999, functions={"relu"}))
    with pytest.raises(ValueError, match=r"'not-a-colour' is not a matplotlib colour"):
        register_kind(Kind("clash", "a clash", colour="not-a-colour", precedence=999))
    with pytest.raises(ValueError, match=r"needs a description"):
        register_kind(Kind("clash", " ", colour="#123456", precedence=999))
    with pytest.raises(ValueError, match=r"built in and cannot be removed"):
        unregister_kind("layout")
    assert "clash" not in kinds.KINDS  # nothing half-registered
    temporary_kind(Kind("fine", "a fine kind", colour="#123456", precedence=999, fix=("", "advice")))
    assert get_kind("fine").fix == Fix("", "advice") and kinds.FIX_FOR_KIND["fine"] == ("", "advice")
    with pytest.raises(ValueError, match=r"op kind 'fine' is already registered"):
        register_kind(Kind("fine", "twice", colour="#654321", precedence=998))


class _Padded(nn.Module):
    """A conv net that pads explicitly, by a call and inside a leaf module."""

    class Pad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, (1, 1, 1, 1))

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.border = self.Pad()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        return self.head(self.border(x).mean((2, 3)))


def test_a_registered_kind_flows_through_capture_and_report(temporary_kind) -> None:
    """Adding a kind is one registration: here 'padding' for F.pad (the built-in kinds leave it at
    'other', and Swin's pads stay 'other' outside this test)."""
    model = _Padded().double().eval()
    x = random_images(1, 3, 8, 8)
    with torch.no_grad(), record(model) as rec:
        model(x)
    assert {op.name: op.kind for op in rec}["pad"] == "other"
    temporary_kind(
        Kind(
            "padding",
            "explicit padding of an activation (F.pad)",
            colour="#c49c94",
            precedence=115,
            fix=Fix("circular_padding", "pad circularly (aliasscope fix --fix circular_padding)"),
            functions={"pad"},
        )
    )
    with torch.no_grad(), record(model) as rec:
        model(x)
    ops = {op.name: op.kind for op in rec}
    assert ops["pad"] == "padding" and ops["border"] == "padding"  # the call, and a module calling it
    assert not next(op for op in rec if op.name == "pad").exactly_equivariant
    summary = {
        "layerwise": {
            "translate_x": {
                "num_ops": 2,
                "top": [{"name": "pad", "kind": "padding", "share": 0.7}],
                "by_kind": {"padding": {"share": 0.7, "ops": 2}, "linear": {"share": 0.3, "ops": 1}},
            }
        }
    }
    text = " ".join(report.advice(summary))
    assert "<b>padding</b> ops carry 70%" in text and "For the padding ops: pad circularly" in text


def _bars_by_kind(fig) -> dict[str, str]:
    """The by-kind panel of :func:`plots.plot_layer_attribution`: tick label -> first bar's colour."""
    ax = next(a for a in fig.axes if "Shares by op kind" in a.get_title(loc="left"))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    return {k: to_hex(p.get_facecolor()) for k, p in zip(labels, ax.patches, strict=False)}


def test_by_kind_panels_show_every_kind_of_a_result(temporary_kind) -> None:
    """A kind in a result always gets a bar and a legend entry: registered ones in their colour,
    unregistered ones (a result from elsewhere) in the fallback colour; none silently dropped."""
    temporary_kind(Kind("rare", "a rare kind", colour="#f7b6d2", precedence=998))
    model = smooth_cnn()
    x = random_images(2, h=16, w=16)
    dec = decompose(model, x, "translate_x", target="pred")
    shares = dec.shares()
    big = [int(i) for i in torch.argsort(-shares)[:2]]
    relabelled = list(dec.kinds)
    relabelled[big[0]], relabelled[big[1]] = "rare", "from_elsewhere"
    dec = dataclasses.replace(dec, kinds=relabelled)
    bars = _bars_by_kind(plots.plot_layer_attribution(dec))
    assert bars["rare"] == "#f7b6d2" and bars["from_elsewhere"] == kinds.UNKNOWN_COLOUR
    assert set(bars) == {k for k, r in dec.by_kind().items() if r["share"] >= 1e-3}
    # the comparison figure's by-kind panel too
    row = {"model": "m", "top1": 1.0, "lie_translate_x": 1.0}
    row |= {"lie_translate_x_ci95_low": 0.5, "lie_translate_x_ci95_high": 1.5}
    result = Comparison(
        rows=[row],
        by_kind={"m": {"rare": {"share": 0.5}, "from_elsewhere": {"share": 0.3}, "linear": {"share": 0.2}}},
        settings={"transforms": ["translate_x"]},
    )
    fig = plots.plot_comparison(result)
    ax = next(a for a in fig.axes if "by op kind" in a.get_title())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["linear", "rare", "from_elsewhere"]


class _RowGRU(nn.Module):
    """A token mixer scanning each row with a GRU (rows folded into the batch, as in Sequencer)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(c, c, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, c = x.shape
        return self.rnn(x.reshape(b * h, w, c))[0].reshape(b, h, w, c)


def test_recurrent_kind_names_regions_with_rnns() -> None:
    """The kind added by one registry entry: a region recorded whole because its RNN folds rows into
    the batch was 'block'; with an RNN in it, it is 'recurrent' (Sequencer's LSTM2d mixers)."""
    assert get_kind("recurrent").names_region and not get_kind("recurrent").zero
    torch.manual_seed(0)
    model = timm.create_model("sequencer2d_s", layers=[1, 1, 1, 1]).eval()
    with torch.no_grad(), record(model) as rec:
        model(torch.randn(1, 3, 64, 64))
    ops = {op.name: op.kind for op in rec}
    mixers = [n for n in ops if n.endswith(".rnn_tokens")]
    assert len(mixers) == 4 and {ops[n] for n in mixers} == {"recurrent"}
    assert "block" not in ops.values()

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Permute(), _RowGRU(4)).double().eval()
    with torch.no_grad(), record(model) as rec:
        model(random_images(1, 3, 6, 6))
    assert {op.name: op.kind for op in rec}["2"] == "recurrent"


class _Permute(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)
