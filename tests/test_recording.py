"""The recording package: producer links, and a finished Recording as plain data (no tracer state)."""

from __future__ import annotations

import gc
import types
from collections.abc import Iterator

import pytest
import timm
import torch
from helpers import random_images
from inplace_catalogue import PATTERNS, PatternNet
from torch import nn

import aliasscope
from aliasscope import _recording as recording
from aliasscope import capture
from aliasscope._recording import ops as ops_module
from aliasscope._recording.tracer import Tracer
from aliasscope.capture import OpRecord, Recording, record


def _check_producers(rec: Recording) -> list[tuple[int, int, tuple[int, int] | None]]:
    """Every input's producer is an earlier op listing that tensor (an alias: what it stands for) among
    its outputs -- the latest op listing the tensor itself, if any does; an input with no producer is the
    model's input or no op's output. Returns the links as (op, input, producer)."""
    links = []
    same = lambda a, b: rec.original(a) is rec.original(b)  # noqa: E731
    for i, op in enumerate(rec.ops):
        assert op.index == i
        assert len(op.producers) == len(op.inputs), op.name
        for j, (t, prod) in enumerate(zip(op.inputs, op.producers, strict=True)):
            makers = [(p, k) for p in range(i) for k, o in enumerate(rec.ops[p].outputs) if same(o, t)]
            if prod is None:
                assert not makers, (op.name, j, makers)
            else:
                p, k = prod
                assert 0 <= p < i, (op.name, j, prod)
                assert same(rec.ops[p].outputs[k], t), (op.name, j, rec.ops[p].name)
                assert prod in makers
                exact = [(p, k) for p in range(i) for k, o in enumerate(rec.ops[p].outputs) if o is t]
                assert not exact or prod == exact[-1], (op.name, j, prod, exact)
            links.append((i, j, prod))
    return links


def _record(model: nn.Module, x: torch.Tensor, **kw) -> Recording:
    with record(model, **kw) as rec:
        model(x)
    return rec


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.conv2(self.act(self.conv1(s))) + s
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("alias_inputs", [False, True])
def test_producer_links_of_a_residual_cnn(alias_inputs: bool) -> None:
    model = ResidualCNN().double().eval()
    with torch.enable_grad():
        rec = _record(model, random_images().requires_grad_(), alias_inputs=alias_inputs)
    _check_producers(rec)
    by = {op.name: op for op in rec}
    assert rec.names == ["stem", "conv1", "act", "conv2", "add", "mean", "head"]
    assert by["stem"].producers == [None]  # the model's input
    assert by["add"].producers == [(by["conv2"].index, 0), (by["stem"].index, 0)]  # the skip
    assert by["head"].producers == [(by["mean"].index, 0)]


def test_producer_links_of_a_vit_with_a_class_token() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).double().eval()
    with torch.enable_grad():
        rec = _record(model, random_images(h=32, w=32).requires_grad_(), alias_inputs=True)
    _check_producers(rec)
    by = {op.name: op for op in rec}
    cat = by["cat"]  # the class token is a constant: the patch tokens are its one input
    assert len(cat.inputs) == 1 and cat.producers == [(by["patch_embed.norm"].index, 0)]
    assert by["add"].producers == [(cat.index, 0)]  # + the position embedding, a constant


@pytest.mark.parametrize("alias_inputs", [False, True])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_producer_links_through_in_place_writes(pattern: str, alias_inputs: bool) -> None:
    model = PatternNet(PATTERNS[pattern])
    with torch.enable_grad():
        rec = _record(model, random_images(h=16, w=16).requires_grad_(), alias_inputs=alias_inputs)
    links = _check_producers(rec)
    assert [prod for i, j, prod in links if i == 0] == [None]
    # everything after the first op is computed from some op's output
    assert all(prod is not None for i, j, prod in links if i > 0)


class FoldedWindowAttention(nn.Module):
    """Swin-like attention inside 2x2 windows, folded into the batch by custom code: no layout is known
    inside, so the module is recorded as one op."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        win = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        q, k, v = self.qkv(win).chunk(3, dim=-1)
        att = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        out = self.proj(att).reshape(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h, w, c)


class SwinLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 2, stride=2)
        self.norm = nn.LayerNorm(4)
        self.attn = FoldedWindowAttention(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(x).permute(0, 2, 3, 1)
        y = y + self.attn(self.norm(y))
        return self.head(y.mean((1, 2)))


@pytest.mark.parametrize("alias_inputs", [False, True])
def test_producer_links_survive_the_collapse_pass(alias_inputs: bool) -> None:
    model = SwinLike().double().eval()
    with torch.enable_grad():
        rec = _record(model, random_images().requires_grad_(), alias_inputs=alias_inputs)
    _check_producers(rec)
    by = {op.name: op for op in rec}
    attn = by["attn"]  # the collapsed region, renumbered
    assert attn.unit is model.attn and attn.kind == "attention"
    assert not any(name.startswith("attn.") for name in rec.names)
    assert attn.producers == [(by["norm"].index, 0)]
    assert by["add"].producers == [(by["permute"].index, 0), (attn.index, 0)]
    assert by["head"].producers == [(by["mean"].index, 0)]


# -- a finished Recording is the recorded data, with no tracer state -----------------------------------
_DATA_FIELDS = {
    "model",
    "input_layout",
    "overrides",
    "unit_patterns",
    "alias_inputs",
    "ops",
    "input",
    "output",
    "activations",
    "alias_of",
}


def _reachable(root: object, skip: tuple[type, ...]) -> Iterator[object]:
    seen, todo = {id(root)}, [root]
    while todo:
        obj = todo.pop()
        yield obj
        if isinstance(obj, skip):
            continue
        if isinstance(obj, types.FunctionType):  # what a closure holds, not the globals of its module
            refs = [c.cell_contents for c in obj.__closure__ or ()] + list(obj.__defaults__ or ())
        else:
            refs = gc.get_referents(obj)
        for ref in refs:
            if id(ref) not in seen and not isinstance(ref, type | types.ModuleType):
                seen.add(id(ref))
                todo.append(ref)


def test_a_finished_recording_holds_no_tracer_state() -> None:
    model = SwinLike().double().eval()
    with torch.enable_grad():
        rec = _record(model, random_images().requires_grad_(), alias_inputs=True)
    assert not hasattr(rec, "__dict__")  # no attribute beyond its data fields
    assert set(Recording.__slots__) == _DATA_FIELDS
    with pytest.raises(AttributeError):
        rec._stack = []  # type: ignore[attr-defined]
    assert all(isinstance(op, OpRecord) for op in rec.ops)
    # nothing reachable from the recording (its ops' replay closures included) is the tracer or its
    # working state: the functionalizer, module calls, the mode
    from aliasscope._mutation import Functionalizer
    from aliasscope._recording.tracer import _Call, _RecordMode

    tracer_types = (Tracer, Functionalizer, _Call, _RecordMode)
    found = [
        type(o).__name__ for o in _reachable(rec, (torch.Tensor, nn.Module)) if isinstance(o, tracer_types)
    ]
    assert found == []


def test_the_data_module_knows_nothing_of_the_tracer() -> None:
    """ops.py (the data) imports neither the tracer nor the in-place machinery."""
    src = open(ops_module.__file__).read()
    assert "tracer" not in src.split('"""', 2)[2].split("class ")[0]
    assert "mutation" not in src and "TorchFunctionMode" not in src


def test_capture_stays_the_import_path() -> None:
    for name in ("record", "Recording", "OpRecord", "KINDS", "PAPER_UNITS", "select_ops", "_tensors"):
        assert getattr(capture, name) is getattr(recording, name)
    assert aliasscope.record is capture.record and aliasscope.Recording is capture.Recording
