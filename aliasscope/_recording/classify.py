"""The kind classifiers: which kind (:data:`aliasscope.kinds.KINDS`) a recorded torch call, module call
or collapsed region is. Function names come from the registry :mod:`aliasscope.kinds`; the calls whose
kind depends on their arguments (strides, dims, sizes) are decided here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..kinds import KINDS, get_kind, kind_of_function, precedence_order
from ..layout_rules import PERMUTES, RESHAPES
from ..layouts import Layout, coarsens_grid

if TYPE_CHECKING:
    from .ops import OpRecord
    from .tracer import _Call

_POOL_REDUCE = {
    "mean",
    "sum",
    "amax",
    "amin",
    "logsumexp",
    "nanmean",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
}
# calls whose kind is read from their arguments (strides, sizes, dims, inputs): their function name
# alone does not say their kind (for the others, Kind.functions does)
_ARGUMENT_RULES = (
    frozenset(
        {
            "matmul",
            "bmm",
            "einsum",
            "softmax",
            "log_softmax",
            "conv1d",
            "conv2d",
            "conv3d",
            "avg_pool2d",
            "max_pool2d",
            "lp_pool2d",
            "max_pool2d_with_indices",
            "interpolate",
            "upsample",
            "upsample_bilinear",
            "upsample_nearest",
            "conv_transpose2d",
            "pixel_shuffle",
            "pixel_unshuffle",
            "getitem",
            "add",
            "sub",
            "mul",
            "div",
            "true_divide",
        }
    )
    | _POOL_REDUCE
)


_REARRANGES = RESHAPES | PERMUTES  # a crop (indexing, narrow) also shrinks the grid, but keeps its spacing


def _is_eval_batchnorm(module: nn.Module) -> bool:
    """A plain BatchNorm in eval mode: affine per channel. Subclasses with their own forward (timm's
    ``BatchNormAct2d`` adds an activation) are not."""
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and type(module).forward is nn.modules.batchnorm._BatchNorm.forward
        and not module.training
        and module.track_running_stats
        and module.running_mean is not None
    )


def _arg_training(args: tuple, kwargs: dict) -> bool:
    """The ``training`` flag of an ``F.batch_norm`` call."""
    return bool(kwargs.get("training", args[5] if len(args) > 5 else False))


def _stride_gt_one(args: tuple, kwargs: dict, index: int, default: Any = 1) -> bool:
    stride = kwargs.get("stride", args[index] if len(args) > index else default)
    if stride is None or (isinstance(stride, list | tuple) and not stride):
        stride = kwargs.get("kernel_size", args[1] if len(args) > 1 else 1)  # pooling: stride = kernel
    stride = (stride,) if isinstance(stride, int) else tuple(stride)
    return any(s > 1 for s in stride)


def _kind_of_call(name, func, args, kwargs, inputs, deps, layouts, outs, out_layouts, path) -> str:
    if "patch_embed" in path:
        return "patch_embed"
    named = kind_of_function(name)
    if name in _REARRANGES and _coarsens_grid(layouts, deps, inputs, out_layouts, outs):
        # a reshape that patchifies (space-to-depth): in an embedding module (NaFlexViT's ``embeds``)
        # it embeds patches, elsewhere it subsamples (TResNet's SpaceToDepth, Qwen3-ViT's merger)
        return "patch_embed" if "embed" in path else "downsampling"
    if named is not None and name not in _ARGUMENT_RULES:
        return named  # nonlinearities, norms, attention, linear, layout ops: the registry's functions
    if name in ("matmul", "bmm", "einsum") and sum(deps) > 1:
        return "attention"
    if name in ("softmax", "log_softmax"):
        lay = next((lay for lay, d in zip(layouts, deps, strict=True) if d), None)
        dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
        if lay is not None and lay.roles is not None and lay.roles[dim] == "n":
            return "attention"
        return "nonlinearity" if path != "(output)" else "other"
    if name in ("conv1d", "conv2d", "conv3d"):
        return "downsampling" if _stride_gt_one(args, kwargs, 3) else "linear"
    if name in ("avg_pool2d", "max_pool2d", "lp_pool2d", "max_pool2d_with_indices"):
        return "downsampling" if _stride_gt_one(args, kwargs, 2, default=None) else "pooling"
    if name in ("interpolate", "upsample", "upsample_bilinear", "upsample_nearest"):
        return "upsampling" if outs[0].shape[-1] > inputs[0].shape[-1] else "downsampling"
    if name in ("conv_transpose2d", "pixel_shuffle"):
        return "upsampling"
    if name == "pixel_unshuffle":
        return "downsampling"
    in_lay = next((lay for lay, d in zip(layouts, deps, strict=True) if d), None)
    if name in _POOL_REDUCE:
        return (
            "pooling"
            if in_lay is not None
            and in_lay.is_image_like
            and not (out_layouts[0] is not None and out_layouts[0].is_image_like)
            else "other"
        )
    if name == "getitem":
        if (
            in_lay is not None
            and in_lay.is_image_like
            and out_layouts[0] is not None
            and (not out_layouts[0].is_image_like)
        ):
            return "pooling"
        if _strided_index(args[1] if len(args) > 1 else None, in_lay):
            return "downsampling"
        return "layout"
    if name in ("add", "sub"):
        if sum(deps) > 1:
            return "residual"
        const = [t for t, d in zip(inputs, deps, strict=True) if not d]
        if (
            in_lay is not None
            and in_lay.is_image_like
            and any(_spatial_extent(c, in_lay, outs[0]) for c in const)
        ):
            return "position_embed"
        return "linear"
    if name in ("mul", "div", "true_divide"):
        return "nonlinearity" if sum(deps) > 1 else "linear"
    return "other"


def _coarsens_grid(layouts, deps, inputs, out_layouts, outs) -> bool:
    """Does a data move put its output on a coarser grid than its input's (a patchify)?"""
    src = next(((lay, x) for lay, x, d in zip(layouts, inputs, deps, strict=True) if d), None)
    return bool(src and out_layouts and outs) and coarsens_grid(src[0], src[1], out_layouts[0], outs[0])


def _strided_index(index: Any, layout: Layout | None) -> bool:
    """Does a ``tensor[index]`` subsample a spatial dim of ``layout`` (a slice with step > 1)?"""
    if layout is None or layout.roles is None or not layout.is_image_like:
        return False
    index = index if isinstance(index, tuple) else (index,)
    at = next((k for k, ix in enumerate(index) if ix is Ellipsis), None)
    if at is not None:
        real = sum(1 for ix in index if ix is not None and ix is not Ellipsis)
        index = index[:at] + (slice(None),) * (len(layout.roles) - real) + index[at + 1 :]
    dims = [ix for ix in index if ix is not None]
    return any(
        isinstance(ix, slice) and (ix.step or 1) > 1 and r in ("h", "w")
        for ix, r in zip(dims, layout.roles, strict=False)
    )


def _spatial_extent(const: torch.Tensor, layout: Layout, out: torch.Tensor) -> bool:
    """Does a constant vary along the activation's spatial dims (a position embedding)?"""
    nd = out.dim()
    shape = (1,) * (nd - const.dim()) + tuple(const.shape)
    return any(r in ("h", "w", "n") and shape[d] > 1 for d, r in enumerate(layout.roles or ()))


_PLAIN_LAYERS = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)


def _kind_of_unit(call: _Call) -> str:
    path, cls = call.path, type(call.module).__name__.lower()
    declared = getattr(call.module, "aliasscope_kind", None)
    if declared in KINDS:
        return declared
    if "blurpool" in cls:  # a binomial blur: downsampling when strided, else a stride-1 linear filter
        stride = getattr(call.module, "stride", 1)
        return (
            "downsampling"
            if any(s > 1 for s in ((stride,) if isinstance(stride, int) else stride))
            else "linear"
        )
    if "patch_embed" in path or "patchembed" in cls:
        return "patch_embed"
    by_name = "attn" in path.rsplit(".", 1)[-1] or "attention" in cls
    if by_name and not isinstance(call.module, _PLAIN_LAYERS):
        return "attention"  # by name, except a plain layer on the way (MViTv2's shortcut_pool_attn)
    if call.mixes_tokens:
        return "token_mixing"
    if isinstance(call.module, nn.modules.conv._ConvNd) or "conv" in cls:
        stride = getattr(call.module, "stride", 1)
        stride = (stride,) if isinstance(stride, int) else stride
        return "downsampling" if any(s > 1 for s in stride) else "linear"
    if isinstance(call.module, nn.modules.pooling._MaxPoolNd | nn.modules.pooling._AvgPoolNd):
        stride = call.module.stride
        stride = (stride,) if isinstance(stride, int) else stride
        return "downsampling" if any(s > 1 for s in stride) else "pooling"
    if isinstance(call.module, nn.modules.pooling._AdaptiveAvgPoolNd | nn.modules.pooling._AdaptiveMaxPoolNd):
        return "pooling"
    if "merg" in cls or "downsample" in path.rsplit(".", 1)[-1]:
        return "downsampling"
    if "pool" in cls:
        return "pooling"
    if "norm" in cls or any(_kind_of_name(f) == "normalisation" for f in call.funcs):
        return "normalisation"
    if isinstance(call.module, nn.Linear):
        return "linear"
    kinds = {_kind_of_name(f) for f in call.funcs}
    if kinds <= {"layout"} and call.template.inputs and call.outputs and call.in_layouts and call.out_layouts:
        if coarsens_grid(call.in_layouts[0], call.template.inputs[0], call.out_layouts[0], call.outputs[0]):
            return "downsampling"  # data moved onto a coarser grid: a space-to-depth module (TResNet)
    for k in precedence_order():
        if k in kinds:
            return k
    return "layout" if not call.funcs or all(_kind_of_name(f) == "layout" for f in call.funcs) else "other"


def _kind_of_name(name: str) -> str:
    """The kind a function name means among a module's inner calls (``Kind.functions``)."""
    return kind_of_function(name) or "other"


def _kind_of_collapsed(call: _Call, ops: Sequence[OpRecord]) -> str:
    kind = _kind_of_unit(call)
    if kind not in ("layout", "other", "nonlinearity", "normalisation", "linear"):
        return kind
    kinds = {op.kind for op in ops}
    for k in precedence_order():  # a region with attention in it is that attention (Swin's windows)
        if k in kinds and get_kind(k).names_region:
            return k
    # a short region around a strided op (Swin's patch merging: pad, fold 2x2, norm, linear) is that
    # downsampling step; a long one is a whole block that merely contains one
    if "downsampling" in kinds and len(ops) < _SHORT_REGION:
        return "downsampling"
    return "block"


_SHORT_REGION = 12
