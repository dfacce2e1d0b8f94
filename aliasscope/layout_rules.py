"""Propagating layouts through torch calls: given the layouts of a call's inputs, those of its outputs.

Used by :mod:`aliasscope.capture` to know, for every activation of a network, which dimensions are
the batch, channels, the pixel grid, the token sequence or window-partitioned grids (Swin). A rule
returns ``None`` when it cannot tell (attention scores inside windows, pixels folded into the batch
by custom code); the capture then treats the smallest enclosing module with known boundary layouts as
one op.

The rules are a table, :data:`RULES`: one small function per torch function family, registered under
the family's normalised names (:func:`func_name`). :func:`propagate` looks a call up there first; a
name without a rule goes to the fallbacks, in this order: the elementwise maps of
:data:`SAME_LAYOUT` (one image-dependent input, shape kept: its layout), broadcasting
:data:`BINARY` maps (and :data:`SAME_LAYOUT` ones with several image-dependent inputs), then any
other call that keeps the shape keeps the layout; anything else is unknown. :func:`rules_for` says
which rules a name goes through.

Adding a rule is one decorated function here, plus its cases in ``BY_RULE`` of
``tests/test_layout_rules.py``: exact layouts, and one it cannot know (a test fails for a registered
name or a rule without them)::

    @rule("channel_shuffle", "native_channel_shuffle")
    def _channel_shuffle(call: Call) -> list[Layout | None] | None:
        \"\"\"Reorders channels: every role kept. Cannot know: an unknown input layout.\"\"\"
        return [call.layout]

The rule gets a :class:`Call` (the call's arguments, its tensor inputs with their layouts and
whether each depends on the image, its outputs, and the first image-dependent input ``call.x`` with
its layout ``call.layout``) and returns one layout per output, ``None`` where it cannot tell, or
``None`` as a whole to leave the call to the fallbacks. Every result then goes through the same
size check (a size-1 grid dim becomes a channel; a dim count or token count that does not fit the
output makes it unknown). Options of :func:`rule`: ``needs_layout=False`` for a rule that also runs
when ``call.layout`` is unknown (else its outputs are unknown then), ``windows=True`` for a rule
that may see window-partitioned (Swin) inputs (else their outputs are unknown). A rule for a name of
:data:`SAME_LAYOUT` or :data:`BINARY` replaces the fallbacks for that name, so it must handle their
cases itself (see ``expand_as``; a test lists those names).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .layouts import WINDOW_ROLES, Layout

__all__ = [
    "propagate",
    "func_name",
    "ACTIVATIONS",
    "NORMS",
    "SAME_LAYOUT",
    "BINARY",
    "RESHAPES",
    "PERMUTES",
    "GRID_OPS",
    "REDUCTIONS",
    "Call",
    "Rule",
    "RULES",
    "FALLBACKS",
    "rule",
    "rules_for",
]

Roles = tuple[str, ...]

ACTIVATIONS = frozenset(
    {
        "relu",
        "relu6",
        "gelu",
        "silu",
        "sigmoid",
        "tanh",
        "hardtanh",
        "hardswish",
        "hardsigmoid",
        "elu",
        "leaky_relu",
        "mish",
        "softplus",
        "selu",
        "celu",
        "glu",
        "prelu",
        "rrelu",
        "logsigmoid",
        "softsign",
        "threshold",
        "swish",
        "quick_gelu",
        "tanhshrink",
    }
)
"""Pointwise nonlinearities, by normalised function name."""
NORMS = frozenset(
    {
        "batch_norm",
        "layer_norm",
        "group_norm",
        "instance_norm",
        "rms_norm",
        "normalize",
        "local_response_norm",
    }
)
"""Normalisation layers, by normalised function name."""
SAME_LAYOUT = (
    ACTIVATIONS
    | NORMS
    | {
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
        "clone",
        "contiguous",
        "detach",
        "to",
        "float",
        "double",
        "half",
        "bfloat16",
        "type",
        "type_as",
        "abs",
        "neg",
        "exp",
        "log",
        "sqrt",
        "rsqrt",
        "pow",
        "square",
        "clamp",
        "clip",
        "clamp_min",
        "clamp_max",
        "softmax",
        "log_softmax",
        "roll",
        "masked_fill",
        "sign",
        "erf",
        "cos",
        "sin",
        "reciprocal",
        "expand_as",
        "requires_grad_",
        "nan_to_num",
        "cumsum",
        "pos",
        "floor",
        "ceil",
        "round",
        "trunc",
        "frac",
    }
)
BINARY = {
    "add",
    "sub",
    "mul",
    "div",
    "true_divide",
    "maximum",
    "minimum",
    "where",
    "addcmul",
    "addcdiv",
    "lerp",
    "rsub",
    "floor_divide",
    "remainder",
    "fmod",
    "max",
    "min",
    "pow",
    "radd",
    "rmul",
    "rtruediv",
    "truediv",
    "atan2",
    "hypot",
    "logaddexp",
}
RESHAPES = frozenset(
    {"reshape", "view", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze"}
)
"""Calls that regroup dimensions without moving data."""
PERMUTES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "t", "mT", "movedim"})
"""Calls that reorder dimensions."""
GRID_OPS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose2d",
    "avg_pool2d",
    "max_pool2d",
    "max_pool2d_with_indices",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "adaptive_max_pool2d_with_indices",
    "lp_pool2d",
    "interpolate",
    "upsample",
    "upsample_bilinear",
    "upsample_nearest",
    "pad",
    "pixel_shuffle",
    "pixel_unshuffle",
    "grid_sample",
}
REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm", "prod", "nansum", "nanmean"}


def func_name(func: Any) -> str:
    """Normalised name of a torch function or Tensor method: ``__add__`` -> ``add``, ``add_`` -> ``add``."""
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # properties such as Tensor.T
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("i") and name[1:] in BINARY | {"truediv", "matmul", "and", "or"}:
            name = name[1:]
        if name.startswith("r") and name[1:] in BINARY | {"truediv", "matmul"}:
            name = name[1:]
    elif name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, key: str, default: Any = None) -> Any:
    if key in kwargs:
        return kwargs[key]
    return args[index] if len(args) > index else default


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _all_non_spatial(roles: Roles) -> bool:
    return all(r in ("b", "c") for r in roles)


def _make(roles: Roles, like: Layout) -> Layout | None:
    try:
        if WINDOW_ROLES & set(roles):
            return Layout(roles, like.grid, 0, like.window) if like.windowed else None
        if "n" in roles:
            return Layout(roles, like.grid, like.num_prefix)
        return Layout(roles)
    except ValueError:  # roles that make no grid (an 'h' without its 'w', half a window split)
        return None


def _window_geometry(
    layout: Layout, in_shape: Sequence[int], out: Sequence[str], out_shape: Sequence[int]
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Full grid and window size of a reshape's window-partitioned result."""
    grid = list(layout.grid) if layout.windowed else [None, None]
    window = list(layout.window) if layout.windowed else [None, None]
    for axis, (plain, outer, inner) in enumerate((("h", "ho", "hi"), ("w", "wo", "wi"))):
        if inner in out:
            window[axis] = out_shape[out.index(inner)]
        if plain in (layout.roles or ()):
            grid[axis] = in_shape[layout.roles.index(plain)]
        elif outer in out and inner in out:
            grid[axis] = out_shape[out.index(outer)] * out_shape[out.index(inner)]
    if None in grid or None in window:
        return None
    return (int(grid[0]), int(grid[1])), (int(window[0]), int(window[1]))


def _size_one_roles(shape: Sequence[int], roles: Roles) -> Roles:
    """Spatial dimensions of size 1 carry no grid: call them channels."""
    return tuple("c" if (s == 1 and r in ("h", "w")) else r for s, r in zip(shape, roles, strict=True))


def _reshape(layout: Layout, in_shape: Sequence[int], out_shape: Sequence[int]) -> Layout | None:
    """Roles through view/reshape/flatten: match dimension groups whose sizes multiply to the same."""
    roles = layout.roles
    out: list[str] = []
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while i < n_in or j < n_out:
        if i < n_in and j < n_out and in_shape[i] == 1 and out_shape[j] == 1:
            out.append(roles[i] if roles[i] in ("b", "c") else "c")
            i += 1
            j += 1
            continue
        if i < n_in and in_shape[i] == 1 and (j >= n_out or out_shape[j] != 1):
            i += 1
            continue
        if j < n_out and out_shape[j] == 1 and (i >= n_in or in_shape[i] != 1):
            out.append("b" if j == 0 and i < n_in and roles[i] == "b" else "c")  # batch (B*heads) split
            j += 1
            continue
        if i >= n_in or j >= n_out:
            return None
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= n_in:
                    return None
                gi.append(i)
                pi *= in_shape[i]
            else:
                j += 1
                if j >= n_out:
                    return None
                gj.append(j)
                pj *= out_shape[j]
        i += 1
        j += 1
        src = tuple(roles[k] for k in gi if in_shape[k] != 1) or ("c",)
        sizes_out = [out_shape[k] for k in gj]
        grouped = _regroup(src, [in_shape[k] for k in gi if in_shape[k] != 1], sizes_out, layout)
        if grouped is None:
            return None
        out.extend(grouped)
    if len(out) != n_out:
        return None
    if "b" in out:  # one batch dim: a batch split into (1, heads) keeps it on the first
        first = out.index("b")
        out = [r if r != "b" or k == first else "c" for k, r in enumerate(out)]
    if _DEPTH in out:
        return _space_to_depth(layout, out)
    out = ["bw" if r == _OUTER else r for r in out]
    batch_lost = ("b" in roles or "bw" in roles) and not {"b", "bw"} & set(out)
    if batch_lost and (out_shape[0] == 1 or out[0] == "c"):
        # a batch of one: its size-1 dim was matched to nothing (windows unfolded), or folded into
        # the channels that lead (heads into the batch: MViTv2's pooled queries)
        out[0] = "b"
    if WINDOW_ROLES & set(out):
        geometry = _window_geometry(layout, in_shape, out, out_shape)
        if geometry is None:
            return None
        try:
            return Layout(tuple(out), geometry[0], 0, geometry[1])
        except ValueError:
            return None
    if "h" in out and "n" in roles and layout.num_prefix == 0:
        return _make(tuple(out), Layout())  # None for two grids unflattened (relative position tables)
    if "n" in out and "h" in roles:
        hs = in_shape[roles.index("h")], in_shape[roles.index("w")]
        return Layout(tuple(out), (int(hs[0]), int(hs[1])), 0)
    return _make(tuple(out), layout)


# window partition (Swin) and its reverse: split an axis into (window index, position in window),
# fold the window indices into the batch and the in-window positions into one token dim, and back
_WINDOW_SPLIT = {("h",): ("ho", "hi"), ("w",): ("wo", "wi")}
_OUTER = "<ho*wo>"  # window indices merged: folded into a batch of one (Swin), or patch tokens
_DEPTH = "<hi*wi*c>"  # positions in a window merged with the channels: space-to-depth (patchify)
_WINDOW_MERGE = {
    ("b", "ho", "wo"): "bw",
    ("ho", "wo"): _OUTER,  # Swin's batch of one (its size-1 dim dropped before matching) or patches
    ("hi", "wi"): "ni",
    ("ho", "hi"): "h",
    ("wo", "wi"): "w",
}


def _regroup(src: Roles, in_sizes: list[int], out_sizes: list[int], layout: Layout) -> list[str] | None:
    """Roles of ``out_sizes`` made from input dims of roles ``src`` (one matched group)."""
    if len(src) == 1 and len(out_sizes) == 1:
        return [src[0]]
    if _all_non_spatial(src):
        lead = "b" if "b" in src else "c"
        return [lead] + ["c"] * (len(out_sizes) - 1)
    if src == ("h", "w") and len(out_sizes) == 1:
        return ["n"]
    if src in _WINDOW_SPLIT and len(out_sizes) == 2 and min(out_sizes) > 1:
        return list(_WINDOW_SPLIT[src])
    if src in _WINDOW_MERGE and len(out_sizes) == 1:
        return [_WINDOW_MERGE[src]]
    if len(out_sizes) == 1 and {"hi", "wi"} <= set(src) <= {"hi", "wi", "c"}:
        return [_DEPTH]
    if layout.windowed:
        (gh, gw), (wh, ww) = layout.grid, layout.window
        if src == ("bw",) and len(out_sizes) == 3 and out_sizes[1:] == [gh // wh, gw // ww]:
            return ["b", "ho", "wo"]
        if src == ("bw",) and out_sizes == [gh // wh, gw // ww]:  # a batch of one (size-1 dim apart)
            return ["ho", "wo"]
        if src == ("ni",) and out_sizes == [wh, ww]:
            return ["hi", "wi"]
    if src == ("n",) and layout.num_prefix == 0 and layout.grid and out_sizes == list(layout.grid):
        return ["h", "w"]
    return None


def _space_to_depth(layout: Layout, out: list[str]) -> Layout | None:
    """The layout of a patchified tensor: every position in a window (patch) merged into the channels
    (``_DEPTH``), the window indices left as the rows and columns (``ho``, ``wo``: TResNet's
    SpaceToDepth) or merged into tokens (``_OUTER``: ViT patchify by reshape) of the coarse grid of
    windows, ``(H / wh, W / ww)``. ``None`` when a position in a window or the batch merge is left."""
    if not layout.windowed or out.count(_DEPTH) != 1 or {"hi", "wi", "ni", "bw"} & set(out):
        return None
    (gh, gw), (wh, ww) = layout.grid, layout.window
    roles = tuple({_DEPTH: "c", _OUTER: "n", "ho": "h", "wo": "w"}.get(r, r) for r in out)
    try:
        return Layout(roles, (gh // wh, gw // ww), 0) if "n" in roles else Layout(roles)
    except ValueError:  # one axis of the windows left, or an axis split twice
        return None


def _getitem(layout: Layout, shape: Sequence[int], index: Any) -> Layout | None:
    if not isinstance(index, tuple):
        index = (index,)
    if any(isinstance(ix, torch.Tensor) or isinstance(ix, list) for ix in index):
        return None
    n_real = sum(1 for ix in index if ix is not None and ix is not Ellipsis)
    expanded: list[Any] = []
    for ix in index:
        if ix is Ellipsis:
            expanded.extend([slice(None)] * (len(shape) - n_real))
        else:
            expanded.append(ix)
    roles, out = layout.roles, []
    prefix, d = layout.num_prefix, 0
    for ix in expanded:
        if ix is None:
            out.append("c")
            continue
        if d >= len(roles):
            return None
        r, size = roles[d], shape[d]
        d += 1
        if isinstance(ix, int):
            continue  # the dimension is removed (a class token picked, a channel selected)
        if not isinstance(ix, slice):
            return None
        start, stop, step = ix.indices(size)
        full = (start, stop, step) == (0, size, 1)
        if full or r in ("b", "c"):
            out.append(r)
        elif r in ("h", "w") and step >= 1 and stop > start:
            out.append(r)  # a crop or a strided subsampling of the pixel grid: still a grid
        elif r == "n" and step == 1 and stop == size and start == prefix:
            out.append("n")
            prefix = 0
        elif r == "n" and step == 1 and stop <= layout.num_prefix:
            out.append("c")
        else:
            return None
    out.extend(roles[d:])
    new = tuple(out)
    if "n" in new:
        return Layout(new, layout.grid, prefix)
    return _make(new, layout)


def _cat(
    layouts: list[Layout | None], tensors: list[torch.Tensor], dim: int, dep: list[bool]
) -> Layout | None:
    ndim = tensors[0].dim()
    dim = _norm_dim(dim, ndim)
    last = layouts[-1]
    earlier = [lay for lay, d in zip(layouts[:-1], dep[:-1], strict=True) if d]
    if (
        dep[-1]
        and last is not None
        and last.roles is not None
        and last.roles[dim] == "n"
        and all(lay is not None and not lay.is_image_like for lay in earlier)
    ):  # tokens after invariant ones (a class token that attention pooled in a later stage: CaiT, PiT)
        prefix = sum(t.shape[dim] for t in tensors[:-1])
        return Layout(last.roles, last.grid, prefix + last.num_prefix)
    known = [lay for lay, d in zip(layouts, dep, strict=True) if d]
    base = next((lay for lay in known if lay is not None and lay.roles is not None), None)
    if base is None or any(lay is None for lay in known):
        return None
    role = base.roles[dim]
    if role in ("b", "c"):
        if any(lay.roles != base.roles for lay in known):
            return None
        return base
    if role != "n":
        return None
    # token concatenation: the grid-bearing operand comes last, everything before it is prefix tokens
    last = layouts[-1]
    if not dep[-1] or last is None or last.roles is None or last.roles[dim] != "n":
        return None
    prefix = sum(t.shape[dim] for t in tensors[:-1])
    return Layout(last.roles, last.grid, prefix + last.num_prefix)


def _matmul(a: Layout | None, b: Layout | None, da: bool, db: bool, ta: torch.Tensor, tb: torch.Tensor):
    if ta.dim() < 2 or tb.dim() < 2:
        return None
    if da and not db:
        return None if a is None else _make(a.roles[:-1] + ("c",), a)
    if db and not da:
        return None if b is None else _make(b.roles[:-2] + ("c", b.roles[-1]), b)
    if a is None or b is None or ta.dim() != tb.dim():
        return None
    roles = a.roles[:-2] + (a.roles[-2], b.roles[-1])
    like = a if "n" in a.roles else b
    return _make(roles, like)


def _reduce(layout: Layout, ndim: int, dims: Any, keepdim: bool) -> Layout | None:
    if dims is None:
        return Layout(("c",) * 0) if not keepdim else _make(("c",) * ndim, layout)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    dims = {_norm_dim(d, ndim) for d in dims}
    roles = [("c" if keepdim else None) if d in dims else r for d, r in enumerate(layout.roles)]
    roles = tuple(r for r in roles if r is not None)
    if "h" in roles and "w" not in roles or "w" in roles and "h" not in roles:
        return None
    return _make(roles, layout)


def _grid_op(name: str, layout: Layout | None, out: torch.Tensor) -> Layout | None:
    if layout is None:
        return None
    if not layout.is_image_like:
        return Layout(("b",) + ("c",) * (out.dim() - 1))
    if layout.roles != ("b", "c", "h", "w") or out.dim() != 4:
        return None
    if out.shape[-2:] == (1, 1):
        return Layout(("b", "c", "c", "c"))
    return Layout(("b", "c", "h", "w"))


# -- the rule table ---------------------------------------------------------------------------------
Result = list[Layout | None]


@dataclass(frozen=True, eq=False)
class Call:
    """What a rule sees of one torch call ``func(*args, **kwargs)``.

    ``inputs`` are the call's tensor arguments in order, ``layouts`` their layouts as recorded
    (``None``: unknown or constant), ``dependent`` whether each depends on the image, ``outputs`` the
    output tensors. ``first`` indexes the first image-dependent input (:attr:`x`); :attr:`layout` is its
    layout, an invariant one (``roles=None``) spelled out as ``("b", "c", ...)``.
    """

    name: str
    func: Any
    args: Sequence[Any]
    kwargs: dict[str, Any]
    inputs: list[torch.Tensor]
    layouts: list[Layout | None]
    dependent: list[bool]
    outputs: list[torch.Tensor]
    first: int
    layout: Layout | None

    @property
    def x(self) -> torch.Tensor:
        """The first image-dependent input."""
        return self.inputs[self.first]

    @property
    def ndim(self) -> int:
        """Number of dims of :attr:`x`."""
        return self.x.dim()

    @property
    def out(self) -> torch.Tensor:
        """The first output."""
        return self.outputs[0]

    @property
    def num_dependent(self) -> int:
        """How many inputs depend on the image."""
        return sum(self.dependent)

    def arg(self, index: int, key: str, default: Any = None) -> Any:
        """Argument ``key``, given by keyword or at position ``index`` (``default`` when absent)."""
        return _arg(self.args, self.kwargs, index, key, default)

    def dim_arg(self, index: int, key: str, default: Any = None, ndim: int | None = None) -> int:
        """A dim argument made non-negative (for a tensor of ``ndim`` dims, :attr:`ndim` by default)."""
        return _norm_dim(self.arg(index, key, default), self.ndim if ndim is None else ndim)

    def make(self, roles: Roles, like: Layout | None = None) -> Layout | None:
        """A layout of ``roles`` with the grid, prefix and window of ``like`` (:attr:`layout`), or
        ``None`` when the roles make no grid."""
        return _make(roles, self.layout if like is None else like)

    def unknown(self) -> Result:
        """``None`` for every output."""
        return [None] * len(self.outputs)


RuleFn = Callable[[Call], Result | None]


@dataclass(frozen=True)
class Rule:
    """A registered rule: ``fn`` maps a :class:`Call` to its outputs' layouts (``None`` as a whole:
    not for this call, the next rule of :func:`rules_for` decides).

    ``names`` are the normalised function names it is registered for (``None``: a fallback for any
    name); ``needs_layout``: outputs are unknown without running ``fn`` when the first dependent
    input's layout is; ``windows``: ``fn`` also sees window-partitioned inputs (otherwise their
    outputs are unknown).
    """

    fn: RuleFn
    names: tuple[str, ...] | None
    needs_layout: bool = True
    windows: bool = False

    @property
    def name(self) -> str:
        """The rule function's name (``transpose`` for ``_transpose``)."""
        return self.fn.__name__.lstrip("_")

    @property
    def doc(self) -> str:
        """The rule function's docstring."""
        return inspect.getdoc(self.fn) or ""

    def __call__(self, call: Call) -> Result | None:
        if self.needs_layout and call.layout is None:
            return call.unknown()
        return self.fn(call)


RULES: dict[str, Rule] = {}
"""The exact-name table: normalised function name -> its rule (see :func:`rule`)."""


def rule(*names: str, needs_layout: bool = True, windows: bool = False) -> Callable[[RuleFn], RuleFn]:
    """Register the decorated function as the rule of the torch functions ``names`` (normalised, as
    :func:`func_name` gives them) in :data:`RULES`; see :class:`Rule` for the options."""
    if not names:
        raise ValueError("rule() needs at least one function name")

    def register(fn: RuleFn) -> RuleFn:
        taken = [n for n in names if n in RULES]
        if taken:
            raise ValueError(f"{fn.__name__}: names {taken} already have a rule ({RULES[taken[0]].name})")
        entry = Rule(fn, tuple(names), needs_layout, windows)
        for n in names:
            RULES[n] = entry
        return fn

    return register


def rules_for(name: str) -> tuple[Rule, ...]:
    """The rules :func:`propagate` tries, in order, for a call of normalised name ``name``: its rule
    of :data:`RULES` if any, then the :data:`FALLBACKS` that apply to the name."""
    exact = (RULES[name],) if name in RULES else ()
    return exact + tuple(f for f in FALLBACKS if f.names is None or name in f.names)


def _window_ok(name: str) -> bool:
    """Whether a call may see window-partitioned inputs: data moves, elementwise maps, linear."""
    return name in SAME_LAYOUT or name in BINARY or (name in RULES and RULES[name].windows)


# -- linear algebra and attention -------------------------------------------------------------------
@rule("linear", windows=True)
def _linear(call: Call) -> Result:
    """The last dim (features) becomes a channel; the other roles (tokens, a channels-last grid,
    window roles) are kept. Cannot know: a last dim that was half of a grid (an ``h`` left without
    its ``w``)."""
    return [call.make(call.layout.roles[:-1] + ("c",))]


@rule("matmul", "bmm", "mm")
def _matmul_rule(call: Call) -> Result:
    """``a @ b``: with ``b`` constant, ``a``'s roles with the last (contracted) dim a channel; with
    ``a`` constant, ``b``'s with its second-to-last a channel; both image-dependent (attention
    ``q @ k^T``, ``attn @ v``), ``a``'s rows and ``b``'s columns (two token dims for scores). Cannot
    know: 1-D operands, an unknown operand layout, operands of different ranks."""
    inputs, layouts, dependent = call.inputs, call.layouts, call.dependent
    j = 1 if len(inputs) > 1 else 0
    return [_matmul(layouts[0], layouts[j], dependent[0], dependent[j], inputs[0], inputs[j])]


@rule("scaled_dot_product_attention")
def _attention(call: Call) -> Result:
    """Fused attention: the output has the roles of the queries. Cannot know: unknown query roles."""
    q = call.layouts[0]
    return [None if q is None else _make(q.roles, q)]


# -- moving dims ------------------------------------------------------------------------------------
@rule("transpose", "swapaxes", "swapdims", windows=True)
def _transpose(call: Call) -> Result:
    """Swaps the roles of ``dim0`` and ``dim1`` (``flatten(2).transpose(1, 2)`` gives tokens).
    Cannot know: nothing beyond the input's layout (roles that make no grid give ``None``)."""
    d0, d1 = call.dim_arg(1, "dim0"), call.dim_arg(2, "dim1")
    roles = list(call.layout.roles)
    roles[d0], roles[d1] = roles[d1], roles[d0]
    return [call.make(tuple(roles))]


@rule("t", "mT", windows=True)
def _t(call: Call) -> Result | None:
    """Swaps the roles of the last two dims. A 0-D or 1-D input is left to the fallbacks (unchanged
    shape: unchanged layout)."""
    if call.ndim < 2:
        return None
    roles = call.layout.roles
    return [call.make(roles[:-2] + (roles[-1], roles[-2]))]


@rule("permute", windows=True)
def _permute(call: Call) -> Result:
    """Reorders the roles as the dims (``permute(0, 2, 3, 1)`` gives BHWC). Cannot know: nothing
    beyond the input's layout (roles that make no grid give ``None``)."""
    args = call.args
    dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else call.arg(1, "dims")
    dims = [_norm_dim(d, call.ndim) for d in dims]
    return [call.make(tuple(call.layout.roles[d] for d in dims))]


@rule("movedim", windows=True)
def _movedim(call: Call) -> Result:
    """Moves the roles of dims ``source`` to ``destination`` (ints or sequences, as torch.movedim:
    the other dims keep their order). Cannot know: nothing beyond the input's layout (roles that
    make no grid give ``None``)."""
    src, dst = call.arg(1, "source"), call.arg(2, "destination")
    ndim = call.ndim
    src = [_norm_dim(d, ndim) for d in ((src,) if isinstance(src, int) else src)]
    dst = [_norm_dim(d, ndim) for d in ((dst,) if isinstance(dst, int) else dst)]
    perm: list[int | None] = [None] * ndim
    for s_, d_ in zip(src, dst, strict=True):
        perm[d_] = s_
    rest = iter(d for d in range(ndim) if d not in src)
    perm = [next(rest) if d is None else d for d in perm]
    return [call.make(tuple(call.layout.roles[d] for d in perm))]


@rule(*sorted(RESHAPES), windows=True)
def _reshape_rule(call: Call) -> Result:
    """Regroups roles by matching groups of dims whose sizes multiply to the same: ``h, w`` merged
    give tokens ``n`` (and back, over the known grid), batch and channels merge or split freely,
    size-1 dims are channels, Swin's window partition and reverse give and take window roles.
    Cannot know: pixels folded into the batch or channels, a grid split other than into windows,
    tokens unflattened to a grid other than theirs (or with prefix tokens)."""
    return [_reshape(call.layout, call.x.shape, call.out.shape)]


# -- indexing, joining and splitting ----------------------------------------------------------------
@rule("getitem")
def _getitem_rule(call: Call) -> Result:
    """``x[index]`` with ints, slices, ``None`` and ``...``: an int removes its dim (a class token
    read out, a channel picked), ``None`` adds a channel, a slice keeps the role of a batch/channel
    dim, crops or subsamples (step >= 1) a grid dim, and on tokens drops the prefix (``x[:, p:]``)
    or keeps prefix tokens only (as channels). Cannot know: tensor or list indices (gathers),
    reversed or empty grid slices, a slice of some grid tokens."""
    return [_getitem(call.layout, call.x.shape, call.args[1])]


@rule("cat", "concat", "concatenate")
def _cat_rule(call: Call) -> Result:
    """Along a batch or channel dim: the common layout of the image-dependent operands; along tokens:
    the last operand's grid with everything before it counted as prefix tokens (``cat([cls, x])``, also
    when the class token already depends on the image but is invariant, as in CaiT's and PiT's later
    stages).
    Cannot know: operands of different layouts (along b/c), an unknown operand layout, a join along
    a grid dim, tokens whose grid-bearing operand is not last."""
    args, kwargs, inputs = call.args, call.kwargs, call.inputs
    tensors = list(args[0]) if args else list(kwargs.get("tensors"))
    dim = call.arg(1, "dim", 0)
    lays = [call.layouts[_index(inputs, t)] for t in tensors]
    deps = [call.dependent[_index(inputs, t)] for t in tensors]
    return [_cat(lays, tensors, dim, deps)]


@rule("stack")
def _stack(call: Call) -> Result:
    """A new channel dim at ``dim``, the first image-dependent operand's roles around it. Cannot know:
    nothing beyond that operand's layout."""
    dim = call.dim_arg(1, "dim", 0, ndim=call.ndim + 1)
    roles = list(call.layout.roles)
    roles.insert(dim, "c")
    return [call.make(tuple(roles))]


@rule("unbind", "select")
def _unbind(call: Call) -> Result:
    """Removes dim ``dim`` from every output (``qkv.unbind(0)``). Cannot know: removing a grid or
    token dim (a row of the grid, one token)."""
    dim = call.dim_arg(1, "dim", 0)
    roles = tuple(r for d, r in enumerate(call.layout.roles) if d != dim)
    ok = call.layout.roles[dim] in ("b", "c")
    return [call.make(roles) if ok else None for _ in call.outputs]


@rule("split", "chunk", "tensor_split", "split_with_sizes")
def _split(call: Call) -> Result:
    """Pieces along a batch or channel dim keep the input's layout. Cannot know: pieces of a grid or
    of the tokens."""
    dim = call.dim_arg(2, "dim", 0)
    ok = call.layout.roles[dim] in ("b", "c")
    return [call.layout if ok else None for _ in call.outputs]


# -- reductions and broadcasts ----------------------------------------------------------------------
@rule(*sorted(REDUCTIONS))
def _reduction(call: Call) -> Result:
    """Reduced dims are removed (channels with ``keepdim``); a full reduction gives a 0-D tensor (all
    channels with ``keepdim``); positional arguments as each function reads them (``norm``'s ``p``,
    ``var``/``std``'s ``unbiased``). Cannot know: reducing one grid dim but not the other."""
    dim_at, keep_at = _REDUCTION_POSITIONS.get(call.name, (1, 2))
    dims = call.arg(dim_at, "dim")
    if call.name in ("var", "std") and isinstance(dims, bool):  # var(x, unbiased): a full reduction
        dims, keep_at = None, 2
    keepdim = bool(call.arg(keep_at, "keepdim", False))
    return [_reduce(call.layout, call.ndim, dims, keepdim)]


_REDUCTION_POSITIONS = {"norm": (2, 3), "var": (1, 3), "std": (1, 3)}
"""(position of ``dim``, position of ``keepdim``) where they differ from (1, 2): ``norm(x, p, dim,
keepdim)``, ``var(x, dim, unbiased, keepdim)``."""


@rule("max", "min", needs_layout=False)
def _max_min(call: Call) -> Result | None:
    """Three calls in one name: with a tensor ``other``, an elementwise map (as :data:`BINARY`); with
    a ``dim``, a reduction with two outputs (values, indices), both of the reduced layout; with
    neither, a full reduction. Cannot know: an unknown input layout (with a dim or none), what
    ``BINARY`` cannot."""
    other = call.arg(1, "other")
    if isinstance(other, torch.Tensor):
        return _elementwise(call)
    dim = call.arg(1, "dim")
    lay = (
        None
        if call.layout is None
        else _reduce(call.layout, call.ndim, dim, bool(call.arg(2, "keepdim", False)))
    )
    return [lay for _ in call.outputs]


@rule("expand", "repeat", "broadcast_to", "tile")
def _expand(call: Call) -> Result:
    """Same rank: the input's roles (a broadcast of size-1 dims, or repeats). Cannot know: a result
    with more dims than the input."""
    return [call.layout if call.out.dim() == call.ndim else None]


@rule("expand_as", needs_layout=False)
def _expand_as(call: Call) -> Result:
    """An elementwise name too (:data:`SAME_LAYOUT`), so first as those: shape kept, its layout;
    several image-dependent inputs, as :data:`BINARY`; else as ``expand``. Cannot know: an unknown
    input layout (one image-dependent input), what ``expand`` and ``BINARY`` cannot."""
    result = _same_layout(call) or _elementwise(call)
    return result if result is not None else RULES["expand"](call)


# -- grid ops ---------------------------------------------------------------------------------------
@rule(*sorted(GRID_OPS - {"pad"}), needs_layout=False)
def _grid(call: Call) -> Result:
    """Convolutions, pools, resampling and pixel shuffles keep BCHW (a 1x1 result: all channels);
    on a non-spatial input, (b, c, ...); a ``conv1d`` over channels-first tokens (b, c, n) that keeps
    their number (a per-token projection, or a 1-D filter along the token order) keeps (b, c, n).
    Cannot know: a spatial input other than BCHW (or tokens for conv1d), a result that is not 4-D,
    a conv1d that changes the number of tokens, non-float outputs (pooling indices), an unknown input
    layout."""
    lay = call.layout
    if call.name == "conv1d" and lay is not None and lay.roles == ("b", "c", "n"):
        return [lay if call.out.shape[-1] == call.x.shape[-1] else None]
    return [_grid_op(call.name, lay, o) if o.is_floating_point() else None for o in call.outputs]


@rule("pad", needs_layout=False)
def _pad(call: Call) -> Result:
    """Padding keeps every dim's role (BCHW, BHWC, any grid). Tokens, or an unknown input layout,
    as the other grid ops (:func:`_grid`)."""
    lay = call.layout
    if lay is not None and lay.roles is not None and "n" not in lay.roles:
        return [lay]
    return _grid(call)


@rule("setitem", "view_scatter", needs_layout=False)
def _write(call: Call) -> Result:
    """A tensor after an in-place write in functional form (:mod:`aliasscope._mutation`: ``x[i] = v``
    as ``setitem(x, i, v)``, a write through a view as ``view_scatter(base, v)``): the written
    tensor's layout when it depends on the image; a constant canvas (``torch.zeros``) takes the
    written value's layout when the value fills it, or when ``x[i] = v`` slices only batch and
    channel dims (every grid and token position written). Cannot know: a value written into part of
    a constant canvas's grid, or through a view of it."""
    target = call.inputs[0]
    if call.dependent[0]:
        return [call.layouts[0]]
    k = next((k for k in range(1, len(call.inputs)) if call.dependent[k]), None)
    value, lay = (call.inputs[k], call.layouts[k]) if k is not None else (None, None)
    if lay is None or lay.roles is None:
        return call.unknown()
    if value.shape == target.shape:
        return [lay]
    index = call.args[1] if call.name == "setitem" and len(call.args) > 1 else None
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(ix, slice) or ix is Ellipsis for ix in index) or value.dim() != target.dim():
        return call.unknown()
    at = next((k for k, ix in enumerate(index) if ix is Ellipsis), None)
    if at is not None:
        index = index[:at] + (slice(None),) * (target.dim() - len(index) + 1) + index[at + 1 :]
    full = [ix.indices(n) == (0, n, 1) for ix, n in zip(index, target.shape, strict=False)]
    full += [True] * (target.dim() - len(full))
    if all(f or lay.roles[d] in ("b", "c") for d, f in enumerate(full)):
        return [lay]
    return call.unknown()


# -- fallbacks, for names without a rule ------------------------------------------------------------
def _same_layout(call: Call) -> Result | None:
    """An elementwise map of one image-dependent input (activations, norms, dropout, casts, ...):
    its layout, when the call has one output of the input's shape; else not for this call."""
    single = len(call.outputs) == 1 and call.out.shape == call.x.shape and call.num_dependent == 1
    return [call.layout] if call.name in SAME_LAYOUT and single else None


def _elementwise(call: Call) -> Result | None:
    """A broadcasting map (``BINARY``, or ``SAME_LAYOUT`` with several image-dependent inputs): the
    common layout of the inputs of the output's shape; broadcast partners must be constant along the
    grid (a gate, a per-channel scale); non-spatial inputs only: (b, c, ...). Cannot know: inputs of
    different spatial layouts, an unknown layout, a broadcast partner that varies over the grid."""
    if call.name in BINARY or (call.name in SAME_LAYOUT and call.num_dependent > 1):
        return [_binary(call.inputs, call.layouts, call.dependent, call.out)]
    return None


def _keep_shape(call: Call) -> Result:
    """Any other call whose outputs all have the input's shape: assume they keep its layout. Cannot
    know: a call that changes the shape."""
    if call.outputs and all(o.shape == call.x.shape for o in call.outputs):
        return [call.layout] * len(call.outputs)
    return call.unknown()


FALLBACKS: tuple[Rule, ...] = (
    Rule(_same_layout, tuple(sorted(SAME_LAYOUT)), needs_layout=False),
    Rule(_elementwise, tuple(sorted(BINARY | SAME_LAYOUT)), needs_layout=False),
    Rule(_keep_shape, None, needs_layout=False),
)
"""The rules tried, in this order, after a name's rule of :data:`RULES` (or without one)."""


def propagate(
    func: Any,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    inputs: list[torch.Tensor],
    layouts: list[Layout | None],
    dependent: list[bool],
    outputs: list[torch.Tensor],
) -> list[Layout | None]:
    """Layouts of ``outputs`` of ``func(*args, **kwargs)``.

    ``inputs`` are the call's tensor arguments in order, ``layouts`` their layouts (``None``:
    unknown or constant) and ``dependent`` whether each depends on the image. Returns one entry per
    output tensor, ``None`` where the rule cannot tell.
    """
    name = func_name(func)
    first = next((i for i, d in enumerate(dependent) if d), None)
    if first is None:
        return [None] * len(outputs)
    lay, x = layouts[first], inputs[first]
    if lay is not None and lay.roles is None:
        lay = Layout(("b",) + ("c",) * (x.dim() - 1)) if x.dim() >= 1 else lay
    if lay is not None and lay.windowed and not _window_ok(name):
        return [None] * len(outputs)  # window-partitioned tensors: only moves and elementwise maps
    call = Call(name, func, args, kwargs, inputs, layouts, dependent, outputs, first, lay)
    result: Result | None = None
    for r in rules_for(name):
        result = r(call)
        if result is not None:
            break
    if result is None:
        result = call.unknown()
    return [_size_fix(r, o) for r, o in zip(result, outputs, strict=True)]


def _index(inputs: list[torch.Tensor], t: torch.Tensor) -> int:
    for i, u in enumerate(inputs):
        if u is t:
            return i
    raise KeyError("tensor not among the call's inputs")


def _size_fix(layout: Layout | None, out: torch.Tensor) -> Layout | None:
    if layout is None or layout.roles is None:
        return layout
    if len(layout.roles) != out.dim():
        return None
    roles = _size_one_roles(out.shape, layout.roles)
    if any(r == "n" and n != layout.num_tokens for r, n in zip(roles, out.shape, strict=True)):
        return None  # every token dim over the one grid (subsampled queries: two grids, unknown)
    if layout.windowed:
        try:
            layout.check(out)
        except ValueError:
            return None
    if roles != layout.roles:
        return _make(roles, layout)
    return layout


def _binary(inputs, layouts, dependent, out: torch.Tensor) -> Layout | None:
    full = [
        lay
        for t, lay, d in zip(inputs, layouts, dependent, strict=True)
        if d and tuple(t.shape) == tuple(out.shape)
    ]
    if not full:
        small = [lay for lay, d in zip(layouts, dependent, strict=True) if d]
        if all(lay is not None and not lay.is_image_like for lay in small):
            return Layout(("b",) + ("c",) * (out.dim() - 1)) if out.dim() else None
        return None
    if any(lay is None for lay in full):
        return None
    spatial = [lay for lay in full if lay.is_image_like]
    if not spatial:
        return full[0]
    if any(lay != spatial[0] for lay in spatial):
        return None
    # broadcast partners must be invariant along the spatial dims (a gate, a per-channel scale)
    for t, lay, d in zip(inputs, layouts, dependent, strict=True):
        if d and tuple(t.shape) != tuple(out.shape):
            if lay is None or (lay.is_image_like and math.prod(t.shape) > 1):
                return None
    return spatial[0]
