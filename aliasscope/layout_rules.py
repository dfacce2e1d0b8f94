"""Propagating layouts through torch calls: given the layouts of a call's inputs, those of its outputs.

Used by :mod:`aliasscope.capture` to know, for every activation of a network, which dimensions are
the batch, channels, the pixel grid, the token sequence or window-partitioned grids (Swin). A rule
returns ``None`` when it cannot tell (attention scores inside windows, pixels folded into the batch
by custom code); the capture then treats the smallest enclosing module with known boundary layouts as
one op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
            out.append("c")
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
    if ("b" in roles or "bw" in roles) and not {"b", "bw"} & set(out) and out_shape[0] == 1:
        out[0] = "b"  # a batch of one: its size-1 dim was matched to nothing (windows unfolded)
    if WINDOW_ROLES & set(out):
        geometry = _window_geometry(layout, in_shape, out, out_shape)
        if geometry is None:
            return None
        try:
            return Layout(tuple(out), geometry[0], 0, geometry[1])
        except ValueError:
            return None
    if "h" in out and "n" in roles and layout.num_prefix == 0:
        return Layout(tuple(out))
    if "n" in out and "h" in roles:
        hs = in_shape[roles.index("h")], in_shape[roles.index("w")]
        return Layout(tuple(out), (int(hs[0]), int(hs[1])), 0)
    return _make(tuple(out), layout)


# window partition (Swin) and its reverse: split an axis into (window index, position in window),
# fold the window indices into the batch and the in-window positions into one token dim, and back
_WINDOW_SPLIT = {("h",): ("ho", "hi"), ("w",): ("wo", "wi")}
_WINDOW_MERGE = {
    ("b", "ho", "wo"): "bw",
    ("ho", "wo"): "bw",  # a batch of one (its size-1 dim is dropped before matching)
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
    result: list[Layout | None]
    if lay is not None and lay.windowed and name not in _WINDOW_OK:
        return [None] * len(outputs)  # window-partitioned tensors: only moves and elementwise maps
    if name in SAME_LAYOUT and len(outputs) == 1 and outputs[0].shape == x.shape and sum(dependent) == 1:
        result = [lay]
    elif name in BINARY or (name in SAME_LAYOUT and sum(dependent) > 1):
        result = [_binary(inputs, layouts, dependent, outputs[0])]
    elif name == "pad" and lay is not None and lay.roles is not None and "n" not in lay.roles:
        result = [lay]  # zero/reflect/replicate padding keeps every dimension's role (BHWC too)
    elif name in GRID_OPS:
        result = [_grid_op(name, lay, o) if o.is_floating_point() else None for o in outputs]
    elif lay is None:
        result = [None] * len(outputs)
    elif name == "linear":
        result = [_make(lay.roles[:-1] + ("c",), lay)]
    elif name in ("matmul", "bmm", "mm"):
        j = 1 if len(inputs) > 1 else 0
        result = [_matmul(layouts[0], layouts[j], dependent[0], dependent[j], inputs[0], inputs[j])]
    elif name == "scaled_dot_product_attention":
        result = [None if layouts[0] is None else _make(layouts[0].roles, layouts[0])]
    elif name in ("transpose", "swapaxes", "swapdims"):
        d0 = _norm_dim(_arg(args, kwargs, 1, "dim0"), x.dim())
        d1 = _norm_dim(_arg(args, kwargs, 2, "dim1"), x.dim())
        roles = list(lay.roles)
        roles[d0], roles[d1] = roles[d1], roles[d0]
        result = [_make(tuple(roles), lay)]
    elif name in ("t", "mT") and x.dim() >= 2:
        result = [_make(lay.roles[:-2] + (lay.roles[-1], lay.roles[-2]), lay)]
    elif name == "permute":
        dims = (
            args[1:]
            if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int))
            else (_arg(args, kwargs, 1, "dims"))
        )
        dims = [_norm_dim(d, x.dim()) for d in dims]
        result = [_make(tuple(lay.roles[d] for d in dims), lay)]
    elif name == "movedim":
        src, dst = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
        perm = list(range(x.dim()))
        perm.pop(_norm_dim(src, x.dim()))
        perm.insert(_norm_dim(dst, x.dim()), _norm_dim(src, x.dim()))
        result = [_make(tuple(lay.roles[d] for d in perm), lay)]
    elif name in RESHAPES:
        result = [_reshape(lay, x.shape, outputs[0].shape)]
    elif name in ("getitem",):
        result = [_getitem(lay, x.shape, args[1])]
    elif name in ("cat", "concat", "concatenate"):
        tensors = list(args[0]) if args else list(kwargs.get("tensors"))
        dim = _arg(args, kwargs, 1, "dim", 0)
        lays = [layouts[_index(inputs, t)] for t in tensors]
        deps = [dependent[_index(inputs, t)] for t in tensors]
        result = [_cat(lays, tensors, dim, deps)]
    elif name == "stack":
        dim = _norm_dim(_arg(args, kwargs, 1, "dim", 0), x.dim() + 1)
        roles = list(lay.roles)
        roles.insert(dim, "c")
        result = [_make(tuple(roles), lay)]
    elif name in ("unbind", "select"):
        dim = _norm_dim(_arg(args, kwargs, 1, "dim", 0), x.dim())
        roles = tuple(r for d, r in enumerate(lay.roles) if d != dim)
        ok = lay.roles[dim] in ("b", "c")
        result = [_make(roles, lay) if ok else None for _ in outputs]
    elif name in ("split", "chunk", "tensor_split", "split_with_sizes"):
        dim = _norm_dim(_arg(args, kwargs, 2, "dim", 0), x.dim())
        ok = lay.roles[dim] in ("b", "c")
        result = [lay if ok else None for _ in outputs]
    elif name in REDUCTIONS:
        dims = _arg(args, kwargs, 1, "dim")
        keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
        result = [_reduce(lay, x.dim(), dims, keepdim)]
    elif name in ("expand", "repeat", "broadcast_to", "tile", "expand_as"):
        result = [lay if outputs[0].dim() == x.dim() else None]
    elif outputs and all(o.shape == x.shape for o in outputs):
        result = [lay] * len(outputs)  # unknown op that keeps the shape: assume it keeps the layout
    else:
        result = [None] * len(outputs)
    return [_size_fix(r, o) for r, o in zip(result, outputs, strict=True)]


_WINDOW_OK = SAME_LAYOUT | BINARY | RESHAPES | PERMUTES | {"linear"}


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
    if "n" in roles and out.shape[roles.index("n")] != layout.num_tokens:
        return None
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
