"""Layout rules, rule by rule: real torch calls on small tensors, the exact output layouts, and for
every rule a case it cannot know (``None``). A rule of ``RULES`` without a case here fails
:func:`test_every_rule_has_a_case`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from aliasscope._mutation import setitem, view_scatter
from aliasscope.layout_rules import (
    BINARY,
    FALLBACKS,
    GRID_OPS,
    PERMUTES,
    REDUCTIONS,
    RESHAPES,
    RULES,
    SAME_LAYOUT,
    Call,
    _window_ok,
    func_name,
    propagate,
    rule,
    rules_for,
)
from aliasscope.layouts import BCHW, BHWC, INVARIANT, Layout

CONST = "const"
"""In ``lays``: a tensor input that does not depend on the image."""

_g = torch.Generator().manual_seed(0)


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_g)


G = (4, 6)  # the pixel / token grid of the small tensors
X = _t(2, 3, 4, 6)  # BCHW
X2 = _t(2, 3, 4, 6)
XH = _t(2, 4, 6, 3)  # BHWC
XSQ = _t(2, 4, 4, 4)  # square, for layouts of the same shape
TOK = _t(2, 25, 8)  # tokens over G with one prefix (class) token
TOK1 = Layout.tokens(G, 1)
TOK0_T = _t(2, 24, 8)  # tokens over G, no prefix
TOK0 = Layout.tokens(G, 0)
BCN = Layout(("b", "c", "n"), G, 0)  # X.flatten(2)
BCN1 = Layout(("b", "c", "n"), G, 1)
XF = _t(2, 3, 24)
GATE = _t(2, 3, 1, 1)  # a per-channel gate (squeeze-excitation)
BCCC = Layout(("b", "c", "c", "c"))
BC = Layout(("b", "c"))
VEC = _t(2, 5)  # pooled features / logits
# Swin: a 4x4 grid in 2x2 windows, 8 channels
WG, WW = (4, 4), (2, 2)
XS = _t(2, 4, 4, 8)
WIN6 = Layout(("b", "ho", "hi", "wo", "wi", "c"), WG, 0, WW)  # XS.view(2, 2, 2, 2, 2, 8)
WIN6P = Layout(("b", "ho", "wo", "hi", "wi", "c"), WG, 0, WW)  # ... .permute(0, 1, 3, 2, 4, 5)
WINDOWS = Layout(("bw", "ni", "c"), WG, 0, WW)  # ... .reshape(-1, 4, 8)
XW6 = _t(2, 2, 2, 2, 2, 8)
WIN6CF = Layout(("b", "ho", "wo", "c", "hi", "wi"), WG, 0, WW)  # XW6.permute(0, 1, 2, 5, 3, 4)
WIN6S2D = Layout(("b", "hi", "wi", "c", "ho", "wo"), WG, 0, WW)  # XW6.permute(0, 3, 4, 5, 1, 2)
XW = _t(8, 4, 8)


@dataclass
class Case:
    """``func(*args, **kwargs)``; ``lays``: one entry per tensor leaf of the arguments (a Layout,
    ``None`` for image-dependent with an unknown layout, or :data:`CONST`); ``expect``: the layout of
    each output."""

    func: Any
    args: tuple
    kwargs: dict
    lays: list
    expect: list
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = func_name(self.func)


def case(id: str, func: Any, *args: Any, lays: list, expect: Any, **kwargs: Any):
    expect = expect if isinstance(expect, list) else [expect]
    return pytest.param(Case(func, args, kwargs, lays, expect), id=id)


def run(c: Case) -> list[Layout | None]:
    leaves, _ = tree_flatten((c.args, c.kwargs))
    inputs = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    assert len(inputs) == len(c.lays), "one entry of lays per tensor argument"
    dependent = [lay is not CONST for lay in c.lays]
    layouts = [None if lay is CONST else lay for lay in c.lays]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`nn.functional.upsample", UserWarning)  # still a name to cover
        out = c.func(*c.args, **c.kwargs)
    outputs = [leaf for leaf in tree_flatten(out)[0] if isinstance(leaf, torch.Tensor)]
    return propagate(c.func, c.args, c.kwargs, inputs, layouts, dependent, outputs)


# -- cases of the rules of RULES, by rule --------------------------------------------------------------
LINEAR = [
    case("tokens", F.linear, TOK, _t(5, 8), lays=[TOK1, CONST], expect=TOK1),
    case("bhwc", F.linear, XH, _t(5, 3), _t(5), lays=[BHWC, CONST, CONST], expect=BHWC),
    case("invariant-spelled-out", F.linear, VEC, _t(4, 5), lays=[INVARIANT, CONST], expect=BC),
    case("windows", F.linear, XW, _t(6, 8), lays=[WINDOWS, CONST], expect=WINDOWS),
    case("none-over-the-width", F.linear, X, _t(5, 6), lays=[BCHW, CONST], expect=None),
    case("none-unknown-input", F.linear, TOK, _t(5, 8), lays=[None, CONST], expect=None),
]
KT = _t(2, 8, 25)
MATMUL = [
    case("scores", torch.matmul, TOK, KT, lays=[TOK1, BCN1], expect=Layout(("b", "n", "n"), G, 1)),
    case("operator", torch.Tensor.__matmul__, TOK, _t(8, 5), lays=[TOK1, CONST], expect=TOK1),
    case("const-left", torch.matmul, _t(5, 8), KT, lays=[CONST, BCN1], expect=BCN1),
    case("bmm", torch.bmm, TOK, KT, lays=[TOK1, BCN1], expect=Layout(("b", "n", "n"), G, 1)),
    case(
        "mm",
        torch.mm,
        TOK[0],
        _t(8, 5),
        lays=[Layout(("n", "c"), G, 1), CONST],
        expect=Layout(("n", "c"), G, 1),
    ),
    case("none-vector", torch.matmul, TOK, _t(8), lays=[TOK1, CONST], expect=None),
    case("none-ranks-differ", torch.matmul, TOK, KT[0], lays=[TOK1, Layout(("c", "n"), G, 1)], expect=None),
    case("none-unknown-operand", torch.matmul, TOK, KT, lays=[TOK1, None], expect=None),
]
Q = _t(2, 2, 25, 4)
QL = Layout(("b", "c", "n", "c"), G, 1)
ATTENTION = [
    case("self", F.scaled_dot_product_attention, Q, Q, Q, lays=[QL, QL, QL], expect=QL),
    # learned queries (attention pooling): no query roles
    case(
        "none-const-queries",
        F.scaled_dot_product_attention,
        _t(2, 2, 1, 4),
        Q,
        Q,
        lays=[CONST, QL, QL],
        expect=None,
    ),
]
TRANSPOSE = [
    case("to-tokens", torch.Tensor.transpose, XF, 1, 2, lays=[BCN], expect=TOK0),
    case("negative-dims", torch.transpose, X, -1, -2, lays=[BCHW], expect=Layout(("b", "c", "w", "h"))),
    case("swapaxes", torch.swapaxes, X, 1, 3, lays=[BCHW], expect=Layout(("b", "w", "h", "c"))),
    case("swapdims", torch.Tensor.swapdims, XH, 3, 1, lays=[BHWC], expect=Layout(("b", "c", "w", "h"))),
    case("none-unknown-input", torch.Tensor.transpose, XF, 1, 2, lays=[None], expect=None),
]
T = [
    case("t", torch.Tensor.t, TOK[0], lays=[Layout(("n", "c"), G, 1)], expect=Layout(("c", "n"), G, 1)),
    case("mT", torch.Tensor.mT.__get__, TOK, lays=[TOK1], expect=BCN1),
    case("1d-keeps-its-layout", torch.Tensor.t, VEC[0], lays=[Layout(("c",))], expect=Layout(("c",))),
    case("none-unknown-input", torch.Tensor.t, TOK[0], lays=[None], expect=None),
]
PERMUTE = [
    case("bhwc", torch.Tensor.permute, X, 0, 2, 3, 1, lays=[BCHW], expect=BHWC),
    case("tuple", torch.permute, XH, (0, 3, 1, 2), lays=[BHWC], expect=BCHW),
    case("keyword", torch.Tensor.permute, X, dims=(0, -2, -1, 1), lays=[BCHW], expect=BHWC),
    case("windows", torch.Tensor.permute, XW6, 0, 1, 3, 2, 4, 5, lays=[WIN6], expect=WIN6P),
    case("none-unknown-input", torch.Tensor.permute, X, 0, 2, 3, 1, lays=[None], expect=None),
]
MOVEDIM = [
    case("channels-last", torch.movedim, X, 1, -1, lays=[BCHW], expect=BHWC),
    case("method", torch.Tensor.movedim, XH, 3, 1, lays=[BHWC], expect=BCHW),
    case("none-unknown-input", torch.movedim, X, 1, -1, lays=[None], expect=None),
]
RESHAPE = [
    case("flatten-to-tokens", torch.Tensor.flatten, X, 2, lays=[BCHW], expect=BCN),
    case("view-tokens-to-grid", torch.Tensor.view, TOK0_T, 2, 4, 6, 8, lays=[TOK0], expect=BHWC),
    case(
        "reshape-channels-into-batch",
        torch.Tensor.reshape,
        X,
        6,
        4,
        6,
        lays=[BCHW],
        expect=Layout(("b", "h", "w")),
    ),
    case("unflatten", torch.Tensor.unflatten, XF, 2, G, lays=[BCN], expect=BCHW),
    case("view_as", torch.Tensor.view_as, XF, X, lays=[BCN, CONST], expect=BCHW),
    case("reshape_as", torch.Tensor.reshape_as, X, XF, lays=[BCHW, CONST], expect=BCN),
    case("squeeze", torch.Tensor.squeeze, GATE, lays=[BCCC], expect=BC),
    case("unsqueeze", torch.Tensor.unsqueeze, TOK, 1, lays=[TOK1], expect=Layout(("b", "c", "n", "c"), G, 1)),
    case("window-partition", torch.Tensor.view, XS, 2, 2, 2, 2, 2, 8, lays=[BHWC], expect=WIN6),
    case("window-merge", torch.Tensor.reshape, XW6, -1, 4, 8, lays=[WIN6P], expect=WINDOWS),
    case("window-reverse", torch.Tensor.view, XW6, 2, 4, 4, 8, lays=[WIN6], expect=BHWC),
    # patchify by reshape (space-to-depth): a window's positions merged with the channels give a
    # coarse grid of patches, as tokens (NaFlexViT, Qwen3-ViT) or as rows and columns (TResNet)
    case("patchify-tokens", torch.Tensor.reshape, XW6, 2, 4, 32, lays=[WIN6P], expect=Layout.tokens((2, 2))),
    case(
        "patchify-channels-first",
        torch.Tensor.reshape,
        XW6.permute(0, 1, 2, 5, 3, 4),
        2,
        4,
        32,
        lays=[WIN6CF],
        expect=Layout.tokens((2, 2)),
    ),
    case(
        "space-to-depth",
        torch.Tensor.reshape,
        XW6.permute(0, 3, 4, 5, 1, 2),
        2,
        32,
        2,
        2,
        lays=[WIN6S2D],
        expect=BCHW,
    ),
    case("none-patchify-half-a-window", torch.Tensor.reshape, XW6, 2, 2, 2, 2, 16, lays=[WIN6P], expect=None),
    # heads folded into a batch of one and back (MViTv2's pooled queries)
    case(
        "heads-into-a-batch-of-one",
        torch.Tensor.reshape,
        _t(1, 2, 24, 5),
        -1,
        4,
        6,
        5,
        lays=[Layout(("b", "c", "n", "c"), G, 0)],
        expect=BHWC,
    ),
    case(
        "heads-out-of-the-batch",
        torch.Tensor.reshape,
        _t(2, 5, 4, 6),
        -1,
        2,
        5,
        24,
        lays=[BCHW],
        expect=Layout(("b", "c", "c", "n"), G, 0),
    ),
    case("none-pixels-into-batch", torch.Tensor.reshape, X, 24, 6, lays=[BCHW], expect=None),
    case("none-other-grid", torch.Tensor.view, TOK0_T, 2, 6, 4, 8, lays=[TOK0], expect=None),
    case("none-grid-with-prefix", torch.Tensor.reshape, TOK, 2, 5, 5, 8, lays=[TOK1], expect=None),
]
GETITEM = [
    case("class-token", torch.Tensor.__getitem__, TOK, (slice(None), 0), lays=[TOK1], expect=BC),
    case(
        "drop-prefix", torch.Tensor.__getitem__, TOK, (slice(None), slice(1, None)), lays=[TOK1], expect=TOK0
    ),
    case(
        "prefix-only",
        torch.Tensor.__getitem__,
        TOK,
        (slice(None), slice(None, 1)),
        lays=[TOK1],
        expect=Layout(("b", "c", "c")),
    ),
    case(
        "subsample",
        torch.Tensor.__getitem__,
        X,
        (Ellipsis, slice(None, None, 2), slice(None, None, 2)),
        lays=[BCHW],
        expect=BCHW,
    ),
    case(
        "new-axis",
        torch.Tensor.__getitem__,
        X,
        (slice(None), None),
        lays=[BCHW],
        expect=Layout(("b", "c", "c", "h", "w")),
    ),
    case(
        "channel", torch.Tensor.__getitem__, X, (slice(None), 1), lays=[BCHW], expect=Layout(("b", "h", "w"))
    ),
    # a 1x1 crop: its size-1 grid dims become channels (the size check after every rule)
    case(
        "1x1-crop",
        torch.Tensor.__getitem__,
        X,
        (Ellipsis, slice(0, 1), slice(0, 1)),
        lays=[BCHW],
        expect=BCCC,
    ),
    case(
        "none-tensor-index",
        torch.Tensor.__getitem__,
        X,
        (slice(None), slice(None), torch.tensor([0, 2])),
        lays=[BCHW, CONST],
        expect=None,
    ),
    case("none-list-index", torch.Tensor.__getitem__, X, [0, 1], lays=[BCHW], expect=None),
    case(
        "none-some-tokens",
        torch.Tensor.__getitem__,
        TOK,
        (slice(None), slice(5, 10)),
        lays=[TOK1],
        expect=None,
    ),
    case("none-empty-crop", torch.Tensor.__getitem__, X, (Ellipsis, slice(3, 1)), lays=[BCHW], expect=None),
]
CLS = _t(2, 1, 8)
XSQ_H = _t(2, 4, 4, 4)
CAT = [
    case("class-token", torch.cat, [CLS, TOK0_T], 1, lays=[CONST, TOK0], expect=TOK1),
    # a class token that already depends on the image (pooled by attention: CaiT, PiT later stages)
    case(
        "pooled-class-token", torch.cat, [CLS, TOK0_T], 1, lays=[Layout(("b", "c", "c")), TOK0], expect=TOK1
    ),
    case("channels", torch.cat, [X, X], dim=1, lays=[BCHW, BCHW], expect=BCHW),
    case("concat-keyword", torch.concat, tensors=[X, _t(2, 1, 4, 6)], dim=1, lays=[BCHW, CONST], expect=BCHW),
    case("concatenate", torch.concatenate, [TOK, TOK], 0, lays=[TOK1, TOK1], expect=TOK1),
    case("none-mismatched-layouts", torch.cat, [XSQ, XSQ_H], 0, lays=[BCHW, BHWC], expect=None),
    case("none-along-the-grid", torch.cat, [X, X], 3, lays=[BCHW, BCHW], expect=None),
    case("none-grid-not-last", torch.cat, [TOK0_T, CLS], 1, lays=[TOK0, CONST], expect=None),
    case("none-unknown-operand", torch.cat, [X, X2], 1, lays=[BCHW, None], expect=None),
]
STACK = [
    case("front", torch.stack, [X, X], lays=[BCHW, BCHW], expect=Layout(("c", "b", "c", "h", "w"))),
    case("last", torch.stack, [X, X], -1, lays=[BCHW, BCHW], expect=Layout(("b", "c", "h", "w", "c"))),
    case("none-unknown-input", torch.stack, [X, X], lays=[None, None], expect=None),
]
QKV = _t(3, 2, 25, 8)
UNBIND = [
    case("qkv", torch.Tensor.unbind, QKV, 0, lays=[Layout(("c", "b", "n", "c"), G, 1)], expect=[TOK1] * 3),
    case("select", torch.select, X, 1, 0, lays=[BCHW], expect=Layout(("b", "h", "w"))),
    case("none-grid-row", torch.unbind, X, 2, lays=[BCHW], expect=[None] * 4),
]
SPLIT = [
    case("split", torch.Tensor.split, X, 1, 1, lays=[BCHW], expect=[BCHW] * 3),
    case("chunk", torch.chunk, TOK, 2, -1, lays=[TOK1], expect=[TOK1] * 2),
    case("tensor_split", torch.tensor_split, X, 2, 0, lays=[BCHW], expect=[BCHW] * 2),
    case("split_with_sizes", torch.Tensor.split_with_sizes, X, [1, 2], dim=1, lays=[BCHW], expect=[BCHW] * 2),
    case("none-grid", torch.Tensor.split, X, 3, dim=3, lays=[BCHW], expect=[None, None]),
]
REDUCTION = [
    case("mean-tokens", torch.Tensor.mean, TOK, 1, lays=[TOK1], expect=BC),
    case("mean-grid", torch.Tensor.mean, X, (2, 3), lays=[BCHW], expect=BC),
    case("mean-keepdim", torch.Tensor.mean, X, (-2, -1), keepdim=True, lays=[BCHW], expect=BCCC),
    case("sum-all", torch.Tensor.sum, X, lays=[BCHW], expect=Layout(())),
    case("sum-all-keepdim", torch.sum, X, dim=None, keepdim=True, lays=[BCHW], expect=Layout(("c",) * 4)),
    case("amax", torch.amax, X, dim=1, lays=[BCHW], expect=Layout(("b", "h", "w"))),
    case("amin", torch.Tensor.amin, XH, -1, lays=[BHWC], expect=Layout(("b", "h", "w"))),
    case("std", torch.std, X, (2, 3), lays=[BCHW], expect=BC),
    case("var-keepdim", torch.Tensor.var, TOK, -1, keepdim=True, lays=[TOK1], expect=TOK1),
    case("logsumexp", torch.logsumexp, X, 1, lays=[BCHW], expect=Layout(("b", "h", "w"))),
    case("norm", torch.Tensor.norm, X, dim=1, lays=[BCHW], expect=Layout(("b", "h", "w"))),
    case("prod", torch.prod, X, 0, lays=[BCHW], expect=Layout(("c", "h", "w"))),
    case("nansum", torch.nansum, X, (2, 3), lays=[BCHW], expect=BC),
    case("nanmean", torch.Tensor.nanmean, X, (2, 3), lays=[BCHW], expect=BC),
    case("none-half-the-grid", torch.Tensor.mean, X, 2, lays=[BCHW], expect=None),
]
MAX_MIN = [
    case("max-dim", torch.max, X, 1, lays=[BCHW], expect=[Layout(("b", "h", "w"))] * 2),
    case("min-dim-keepdim", torch.Tensor.min, X, dim=1, keepdim=True, lays=[BCHW], expect=[BCHW, BCHW]),
    case("max-other", torch.max, X, X, lays=[BCHW, BCHW], expect=BCHW),
    case("min-all", torch.min, X, lays=[BCHW], expect=Layout(())),
    case("max-tokens", torch.Tensor.max, TOK, 1, lays=[TOK1], expect=[BC, BC]),
    case("none-unknown", torch.max, X, 1, lays=[None], expect=[None, None]),
]
EXPAND = [
    case("expand", torch.Tensor.expand, GATE, 2, 3, 4, 6, lays=[BCCC], expect=BCCC),
    case("repeat", torch.Tensor.repeat, X, 1, 2, 1, 1, lays=[BCHW], expect=BCHW),
    case("broadcast_to", torch.broadcast_to, GATE, (2, 3, 4, 6), lays=[BCCC], expect=BCCC),
    case("tile", torch.tile, X, (2, 1, 1, 1), lays=[BCHW], expect=BCHW),
    case("none-more-dims", torch.Tensor.expand, X, 5, 2, 3, 4, 6, lays=[BCHW], expect=None),
    # the rule keeps the roles; the size check then sees 50 tokens where the grid has 25
    case("none-tokens-repeated", torch.Tensor.repeat, TOK, 1, 2, 1, lays=[TOK1], expect=None),
]
EXPAND_AS = [
    case("same-shape", torch.Tensor.expand_as, X, _t(2, 3, 4, 6), lays=[BCHW, CONST], expect=BCHW),
    case("invariant-same-shape", torch.Tensor.expand_as, VEC, _t(2, 5), lays=[INVARIANT, CONST], expect=BC),
    case("broadcast", torch.Tensor.expand_as, GATE, X, lays=[BCCC, CONST], expect=BCCC),
    case("as-binary", torch.Tensor.expand_as, GATE, X, lays=[BCCC, BCHW], expect=BCHW),
    # several image-dependent inputs: as BINARY, even where the first layout is unknown
    case(
        "as-binary-first-unknown",
        torch.Tensor.expand_as,
        _t(2, 1),
        VEC,
        lays=[None, INVARIANT],
        expect=INVARIANT,
    ),
    case("none-unknown-input", torch.Tensor.expand_as, GATE, X, lays=[None, CONST], expect=None),
    case("none-grid-partner", torch.Tensor.expand_as, X[:1], X, lays=[BCHW, BCHW], expect=None),
]
W3 = _t(4, 3, 3, 3)
GRID_SAMPLE = torch.rand(2, 4, 6, 2, generator=_g) * 2 - 1
GRID = [
    case(
        "conv1d-not-spatial",
        F.conv1d,
        XF,
        _t(4, 3, 3),
        lays=[Layout(("b", "c", "c")), CONST],
        expect=Layout(("b", "c", "c")),
    ),
    # channels-first tokens (efficientvim's HSM-SSD projections): kept while the token count is
    case("conv1d-tokens-1x1", F.conv1d, XF, _t(5, 3, 1), lays=[BCN, CONST], expect=BCN),
    case("conv1d-tokens-k3", F.conv1d, XF, _t(5, 3, 3), None, 1, 1, lays=[BCN, CONST], expect=BCN),
    case("conv1d-tokens-prefix", F.conv1d, _t(2, 3, 25), _t(5, 3, 1), lays=[BCN1, CONST], expect=BCN1),
    case("none-conv1d-tokens-strided", F.conv1d, XF, _t(5, 3, 1), None, 2, lays=[BCN, CONST], expect=None),
    case("conv2d", F.conv2d, X, W3, None, 2, 1, lays=[BCHW, CONST], expect=BCHW),
    case(
        "conv3d-not-spatial",
        F.conv3d,
        _t(2, 3, 2, 4, 6),
        _t(4, 3, 1, 1, 1),
        lays=[Layout(("b",) + ("c",) * 4), CONST],
        expect=Layout(("b",) + ("c",) * 4),
    ),
    case("conv_transpose2d", F.conv_transpose2d, X, _t(3, 4, 2, 2), None, 2, lays=[BCHW, CONST], expect=BCHW),
    case("avg_pool2d", F.avg_pool2d, X, 2, lays=[BCHW], expect=BCHW),
    case("max_pool2d", F.max_pool2d, X, 2, lays=[BCHW], expect=BCHW),
    case("max_pool2d_with_indices", F.max_pool2d_with_indices, X, 2, lays=[BCHW], expect=[BCHW, None]),
    case("adaptive_avg_pool2d-1x1", F.adaptive_avg_pool2d, X, 1, lays=[BCHW], expect=BCCC),
    case("adaptive_max_pool2d", F.adaptive_max_pool2d, X, 2, lays=[BCHW], expect=BCHW),
    case(
        "adaptive_max_pool2d_with_indices",
        F.adaptive_max_pool2d_with_indices,
        X,
        1,
        lays=[BCHW],
        expect=[BCCC, None],
    ),
    case("lp_pool2d", F.lp_pool2d, X, 2, 2, lays=[BCHW], expect=BCHW),
    case("interpolate", F.interpolate, X, scale_factor=2.0, mode="bilinear", lays=[BCHW], expect=BCHW),
    case("upsample", F.upsample, X, scale_factor=2, lays=[BCHW], expect=BCHW),
    case("upsample_bilinear", F.upsample_bilinear, X, scale_factor=2, lays=[BCHW], expect=BCHW),
    case("upsample_nearest", F.upsample_nearest, X, scale_factor=2, lays=[BCHW], expect=BCHW),
    case("pixel_shuffle", F.pixel_shuffle, _t(2, 4, 4, 6), 2, lays=[BCHW], expect=BCHW),
    case("pixel_unshuffle", F.pixel_unshuffle, X, 2, lays=[BCHW], expect=BCHW),
    case("grid_sample", F.grid_sample, X, GRID_SAMPLE, align_corners=False, lays=[BCHW, CONST], expect=BCHW),
    case("none-bhwc", F.avg_pool2d, XH, 2, lays=[BHWC], expect=None),
    case("none-tokens", F.interpolate, XF, scale_factor=2.0, lays=[BCN], expect=None),
    case("none-unknown-input", F.conv2d, X, W3, lays=[None, CONST], expect=None),
]
PAD = [
    case("bchw", F.pad, X, (1, 1, 1, 1), lays=[BCHW], expect=BCHW),
    case("bhwc", F.pad, XH, (0, 0, 1, 1, 1, 1), lays=[BHWC], expect=BHWC),
    case("reflect", F.pad, X, (2, 2, 2, 2), mode="reflect", lays=[BCHW], expect=BCHW),
    case("none-tokens", F.pad, TOK, (0, 0, 1, 0), lays=[TOK1], expect=None),
    case("none-unknown-input", F.pad, X, (1, 1, 1, 1), lays=[None], expect=None),
]
CANVAS = torch.zeros(2, 3, 4, 6)
WRITE = [
    case(
        "into-activation", setitem, X, (slice(None), slice(0, 1)), X2[:, :1], lays=[BCHW, BCHW], expect=BCHW
    ),
    case(
        "canvas-channels",
        setitem,
        CANVAS,
        (slice(None), slice(0, 2)),
        X[:, :2],
        lays=[CONST, BCHW],
        expect=BCHW,
    ),
    case(
        "canvas-ellipsis",
        setitem,
        CANVAS,
        (Ellipsis, slice(1, 3), slice(None), slice(None)),
        X[:, 1:3],
        lays=[CONST, BCHW],
        expect=BCHW,
    ),
    case("canvas-filled", view_scatter, CANVAS, X, lambda b: b, lays=[CONST, BCHW], expect=BCHW),
    case(
        "none-canvas-part-of-grid",
        setitem,
        CANVAS,
        (slice(None), slice(None), slice(0, 2)),
        X[:, :, :2],
        lays=[CONST, BCHW],
        expect=None,
    ),
    case(
        "none-view-of-canvas",
        view_scatter,
        CANVAS,
        X[:, :1],
        lambda b: b[:, :1],
        lays=[CONST, BCHW],
        expect=None,
    ),
]
BY_RULE = {
    "write": WRITE,
    "linear": LINEAR,
    "matmul_rule": MATMUL,
    "attention": ATTENTION,
    "transpose": TRANSPOSE,
    "t": T,
    "permute": PERMUTE,
    "movedim": MOVEDIM,
    "reshape_rule": RESHAPE,
    "getitem_rule": GETITEM,
    "cat_rule": CAT,
    "stack": STACK,
    "unbind": UNBIND,
    "split": SPLIT,
    "reduction": REDUCTION,
    "max_min": MAX_MIN,
    "expand": EXPAND,
    "expand_as": EXPAND_AS,
    "grid": GRID,
    "pad": PAD,
}
RULE_CASES = [pytest.param(*p.values, id=f"{name}:{p.id}") for name, cases in BY_RULE.items() for p in cases]


@pytest.mark.parametrize("c", RULE_CASES)
def test_rule(c: Case) -> None:
    assert run(c) == c.expect


# -- the fallbacks, for names without a rule ---------------------------------------------------------
SCORES = _t(2, 25, 25)
SL = Layout(("b", "n", "n"), G, 1)
FALLBACK_CASES = {
    "same_layout": [
        case("relu", F.relu, X, lays=[BCHW], expect=BCHW),
        case("softmax", F.softmax, SCORES, -1, lays=[SL], expect=SL),
        case("layer_norm", F.layer_norm, TOK, (8,), lays=[TOK1], expect=TOK1),
        case("to", torch.Tensor.to, X, torch.float64, lays=[BCHW], expect=BCHW),
        case("gelu-windows", F.gelu, XW, lays=[WINDOWS], expect=WINDOWS),
        case("invariant-spelled-out", F.relu, VEC, lays=[INVARIANT], expect=BC),
        # pow is BINARY too: one input of the output's shape is still SAME_LAYOUT (roles spelled out)
        case("pow-before-binary", torch.Tensor.__pow__, VEC, 2, lays=[INVARIANT], expect=BC),
        case("none-unknown-input", F.relu, X, lays=[None], expect=None),
        # glu halves the channels: not the input's shape, and the shape fallback cannot tell either
        case("none-glu", F.glu, _t(2, 4, 4, 6), 1, lays=[BCHW], expect=None),
    ],
    "elementwise": [
        case("bias", torch.Tensor.__add__, X, _t(1, 3, 1, 1), lays=[BCHW, CONST], expect=BCHW),
        case("gate", torch.mul, X, GATE, lays=[BCHW, BCCC], expect=BCHW),
        case("residual", torch.add, TOK, TOK, lays=[TOK1, TOK1], expect=TOK1),
        case("rsub", torch.Tensor.__rsub__, X, 1.0, lays=[BCHW], expect=BCHW),
        case("windows", torch.Tensor.__add__, XW, XW, lays=[WINDOWS, WINDOWS], expect=WINDOWS),
        case("invariant-kept", torch.Tensor.__mul__, VEC, _t(2, 1), lays=[INVARIANT, BC], expect=INVARIANT),
        case("small-not-spatial", torch.Tensor.__mul__, _t(2, 1), _t(1, 5), lays=[BC, BC], expect=BC),
        case("same-layout-two-inputs", torch.Tensor.type_as, X, X, lays=[BCHW, BCHW], expect=BCHW),
        case("where", torch.where, X > 0, X, X2, lays=[CONST, BCHW, CONST], expect=BCHW),
        case("none-mismatched-layouts", torch.add, XSQ, XSQ_H, lays=[BCHW, BHWC], expect=None),
        case("none-grid-partner", torch.mul, X, X[:1], lays=[BCHW, BCHW], expect=None),
        case("none-unknown-input", torch.add, X, X2, lays=[BCHW, None], expect=None),
        case("none-broadcast-spatial", torch.add, X[:, :, :1], X[..., :1], lays=[None, BCHW], expect=None),
    ],
    "keep_shape": [
        case("flip", torch.flip, X, [3], lays=[BCHW], expect=BCHW),
        case("channel_shuffle", F.channel_shuffle, _t(2, 4, 4, 6), 2, lays=[BCHW], expect=BCHW),
        case("none-shape-changed", torch.diff, X, dim=3, lays=[BCHW], expect=None),
    ],
}


@pytest.mark.parametrize(
    "c",
    [pytest.param(*p.values, id=f"{name}:{p.id}") for name, cases in FALLBACK_CASES.items() for p in cases],
)
def test_fallback(c: Case) -> None:
    assert run(c) == c.expect


# -- the checks before any rule -------------------------------------------------------------------------
PRECHECK = [
    case("no-dependent-input", torch.add, X, X, lays=[CONST, CONST], expect=None),
    case("no-dependent-input-several-outputs", torch.Tensor.split, X, 1, 1, lays=[CONST], expect=[None] * 3),
    case("windows-not-for-reductions", torch.Tensor.mean, XW, 1, lays=[WINDOWS], expect=None),
    case(
        "windows-not-for-getitem", torch.Tensor.__getitem__, XW, (slice(None), 0), lays=[WINDOWS], expect=None
    ),
    case("windows-not-for-cat", torch.cat, [XW, XW], 2, lays=[WINDOWS, WINDOWS], expect=None),
    case("windows-not-for-unknown-ops", torch.flip, XW, [0], lays=[WINDOWS], expect=None),
    case(
        "windows-for-moves",
        torch.Tensor.transpose,
        XW,
        1,
        2,
        lays=[WINDOWS],
        expect=Layout(("bw", "c", "ni"), WG, 0, WW),
    ),
]


@pytest.mark.parametrize("c", PRECHECK)
def test_checks_before_the_rules(c: Case) -> None:
    assert run(c) == c.expect


# -- what calls which rule --------------------------------------------------------------------------------
def _cases(params) -> list[Case]:
    return [p.values[0] for p in params]


def test_every_rule_has_a_case() -> None:
    """A registered name without a case here, or a rule without a case it cannot know, fails."""
    named = {c.name for c in _cases(RULE_CASES)}
    assert set(RULES) - named == set(), "add a case to tests/test_layout_rules.py for each name"
    assert set(BY_RULE) == {r.name for r in RULES.values()}
    for rule_name, cases in BY_RULE.items():
        for c in _cases(cases):
            assert RULES[c.name].name == rule_name, f"{c.name} is not a name of {rule_name}"
        assert any(None in c.expect for c in _cases(cases)), f"{rule_name}: add a case it cannot know"
    assert set(FALLBACK_CASES) == {f.name for f in FALLBACKS}
    for cases in FALLBACK_CASES.values():
        assert all(c.name not in RULES for c in _cases(cases))
        assert any(None in c.expect for c in _cases(cases))


def test_rules_for_gives_the_order_propagate_tries() -> None:
    same, elementwise, keep = FALLBACKS
    assert rules_for("relu") == (same, elementwise, keep)
    assert rules_for("pow") == (same, elementwise, keep)
    assert rules_for("add") == (elementwise, keep)
    assert rules_for("flip") == (keep,)
    assert rules_for("transpose") == (RULES["transpose"], keep)
    assert rules_for("expand_as") == (RULES["expand_as"], same, elementwise, keep)  # its own rule first
    assert RULES["swapaxes"] is RULES["transpose"]


def test_the_families_are_registered() -> None:
    assert RESHAPES | PERMUTES | REDUCTIONS | GRID_OPS <= set(RULES)
    # only these are names of both a rule and the elementwise fallbacks (their rules handle both)
    assert set(RULES) & (SAME_LAYOUT | BINARY) == {"expand_as", "max", "min"}
    # window-partitioned inputs: only moves, elementwise maps and linear
    windows = {n for n in set(RULES) | SAME_LAYOUT | BINARY if _window_ok(n)}
    assert windows == SAME_LAYOUT | BINARY | RESHAPES | PERMUTES | {"linear"}
    free = GRID_OPS | {"expand_as", "max", "min", "setitem", "view_scatter"}
    assert {n for n, r in RULES.items() if not r.needs_layout} == free
    for r in (*RULES.values(), *FALLBACKS):
        assert r.doc, f"rule {r.name} needs a docstring: what it does to roles, what it cannot know"


def test_adding_a_rule_is_one_decorated_function() -> None:
    def my_op(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-1, -2).contiguous()

    assert run(Case(my_op, (X,), {}, [BCHW], [None])) == [None]  # shape changed: unknown
    try:

        @rule("my_op")
        def _my_op(call: Call) -> list[Layout | None]:
            """Swaps the last two roles."""
            roles = call.layout.roles
            return [call.make(roles[:-2] + (roles[-1], roles[-2]))]

        assert RULES["my_op"].fn is _my_op and rules_for("my_op")[0] is RULES["my_op"]
        assert run(Case(my_op, (X,), {}, [BCHW], [None])) == [Layout(("b", "c", "w", "h"))]
        assert run(Case(my_op, (X,), {}, [None], [None])) == [None]  # needs_layout: unknown stays
        with pytest.raises(ValueError, match="already have a rule"):
            rule("my_op")(_my_op)
    finally:
        del RULES["my_op"]
    with pytest.raises(ValueError, match="at least one"):
        rule()


# -- what were known limitations (strict xfails until fixed) ---------------------------------------------
def test_movedim_with_tuples() -> None:
    """Sequences of dims, checked against torch.movedim's own result on a tensor of distinct sizes."""
    assert run(Case(torch.movedim, (X, (1,), (3,)), {}, [BCHW], [BHWC])) == [BHWC]
    assert run(Case(torch.movedim, (X, (2, 3), (1, 2)), {}, [BCHW], [BHWC])) == [BHWC]
    probe = torch.empty(2, 3, 5, 7)
    for src, dst in [((2, 3), (1, 2)), ((0, 3), (3, 0)), ((1,), (-1,)), ((3, 1), (1, 3))]:
        shape = torch.movedim(probe, src, dst).shape
        roles = run(Case(torch.movedim, (X, src, dst), {}, [BCHW], [None]))[0]
        sizes = dict(zip(("b", "c", "h", "w"), probe.shape, strict=True))
        assert roles is not None and tuple(sizes[r] for r in roles.roles) == tuple(shape), (src, dst)


def test_reductions_read_positional_arguments_as_torch_does() -> None:
    """var(x, dim, unbiased, keepdim), var(x, unbiased), norm(x, p, dim, keepdim): each checked
    against the rank torch gives."""
    bhw = Layout(("b", "h", "w"))
    assert run(Case(torch.Tensor.var, (X, 1, True), {}, [BCHW], [None])) == [bhw]
    assert run(Case(torch.Tensor.std, (X, 1, True, True), {}, [BCHW], [None])) == [BCHW]
    assert run(Case(torch.var, (X, False), {}, [BCHW], [None])) == [Layout(())]
    assert run(Case(torch.Tensor.norm, (X, 2, 1), {}, [BCHW], [None])) == [bhw]
    assert run(Case(torch.Tensor.norm, (X, 2, 1, True), {}, [BCHW], [None])) == [BCHW]
    for func, args in [
        (torch.var, (X, 1, True)),
        (torch.std, (X, 1, True, True)),
        (torch.var, (X, False)),
        (torch.Tensor.norm, (X, 2, 1)),
        (torch.Tensor.norm, (X, 2, 1, True)),
    ]:
        lay = run(Case(func, args, {}, [BCHW], [None]))[0]
        assert lay is not None and func(*args).dim() == len(lay.roles), (func, args)
