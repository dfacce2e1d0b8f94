"""Forward-mode Jacobian-vector products through whole models, with cheap exact rules.

:func:`jvp` is :func:`torch.func.jvp` run under a :class:`~torch.overrides.TorchFunctionMode` that
routes a few ops to :class:`torch.autograd.Function` s whose forward-mode rule is the textbook one:

* ``conv1d/2d/3d`` and ``linear``: the tangent is the same op applied to the input tangent without
  the bias (PyTorch's generic rule also convolves with a zero weight tangent: ~3 convolutions
  instead of 2);
* eval-mode ``batch_norm``: the tangent is ``dx * weight / sqrt(running_var + eps)`` (the generic
  rule recomputes batch statistics' terms);
* ``scaled_dot_product_attention``: decomposed into ``softmax(q k^T * scale + mask) v``, because
  the fused CPU/GPU kernels have no forward-mode rule at all;
* ``out=`` calls (no forward-mode rule) run as the plain call copied into ``out``.

In-place ops (``F.relu(x, inplace=True)``, ``x += y``, ``x.mul_(g)``, ``x[i] = v``) run as written:
forward-mode AD updates the tangent of the mutated tensor and of every view of it, so the program
differentiated is exactly the model's.

Every other op keeps PyTorch's own forward-mode rule. Values are the same as plain autodiff (the
rules are exact, not approximations); the mode is forward-only and meant for inference.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._mutation import FunctionalMode, without_out

__all__ = ["jvp"]


class _Const:
    """Hides a constant tensor from functorch, which would otherwise build a zero tangent for it."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor | None) -> None:
        self.value = value


class _ConvLinear(torch.autograd.Function):
    """conv*/linear whose tangent is the op on the input tangent, without bias."""

    generate_vmap_rule = True

    @staticmethod
    def forward(op, x, weight, bias, *rest):
        return op(x, weight.value, bias.value, *rest)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, _, weight, _, *rest = inputs
        ctx.op, ctx.weight, ctx.rest = op, weight.value, rest

    @staticmethod
    def jvp(ctx, _dop, dx, *_):
        # weight and bias are constants inside :func:`jvp` (wrapped in _Const): no tangent terms
        return ctx.op(dx, ctx.weight, None, *ctx.rest)


class _EvalBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm: an affine map per channel."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, running_mean, running_var, weight, bias, eps):
        return F.batch_norm(
            x, running_mean.value, running_var.value, weight.value, bias.value, False, 0.0, eps
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, running_var, weight, _, eps = inputs
        running_var, weight = running_var.value, weight.value
        scale = torch.rsqrt(running_var + eps)
        if weight is not None:
            scale = scale * weight
        ctx.scale = scale.reshape(1, -1, *([1] * (x.dim() - 2)))

    @staticmethod
    def jvp(ctx, dx, *_):
        return dx * ctx.scale


def _sdpa_math(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Reference attention ``softmax(q k^T * scale + mask) v`` (differentiable in forward mode)."""
    if dropout_p:
        raise NotImplementedError("attention dropout is active: put the model in eval mode")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        n, s = query.shape[-2], key.shape[-2]
        causal = torch.ones(n, s, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores.softmax(dim=-1) @ value


_CONV_SIGNATURE = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVS = {F.conv1d, F.conv2d, F.conv3d}
_BN_SIGNATURE = inspect.signature(F.batch_norm)


def _bind(names: tuple[str, ...], defaults: tuple, args: tuple, kwargs: dict) -> list:
    values = list(args) + list(defaults[len(args) :])
    for k, v in kwargs.items():
        values[names.index(k)] = v
    return values


class _FastJvpMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS:
            x, w, b, *rest = _bind(_CONV_SIGNATURE, (None, None, None, 1, 0, 1, 1), args, kwargs)
            return _ConvLinear.apply(func, x, _Const(w), _Const(b), *rest)
        if func is F.linear:
            x, w, b = _bind(("input", "weight", "bias"), (None, None, None), args, kwargs)
            return _ConvLinear.apply(func, x, _Const(w), _Const(b))
        if func is F.batch_norm:
            a = _BN_SIGNATURE.bind(*args, **kwargs)
            a.apply_defaults()
            p = a.arguments
            if not p["training"] and p["running_mean"] is not None:
                return _EvalBatchNorm.apply(
                    p["input"],
                    *(_Const(p[k]) for k in ("running_mean", "running_var", "weight", "bias")),
                    p["eps"],
                )
        if func is F.scaled_dot_product_attention:
            return _sdpa_math(*args, **kwargs)
        rewritten = without_out(func, args, kwargs)
        if rewritten is not None:
            func, args, kwargs = rewritten
        return func(*args, **kwargs)


def jvp(fn: Callable[..., Any], primal: Any, tangent: Any) -> tuple[Any, Any]:
    """``(fn(primal), J_fn(primal) . tangent)`` by forward-mode AD with the fast rules above.

    ``primal`` and ``tangent`` are a tensor each, or tuples of tensors for a function of several
    inputs. Parameters of modules called inside ``fn`` are treated as constants.
    """
    primals = primal if isinstance(primal, tuple) else (primal,)
    tangents = tangent if isinstance(tangent, tuple) else (tangent,)
    with _FastJvpMode(), warnings.catch_warnings():
        # torch's first forward-mode call loads decompositions through torch.jit.script, which is
        # deprecated upstream; the warning says nothing about the user's code
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        try:
            return torch.func.jvp(fn, primals, tangents)
        except RuntimeError as err:
            if not _refused_write(err):
                raise
        # forward-mode AD refused an in-place write (into a view made by split/chunk/unbind, or
        # into a tensor captured from outside): run every write in functional form instead
        functional = FunctionalMode()

        def pure(*xs: Any) -> Any:
            with functional:
                return functional.result(fn(*xs))

        return torch.func.jvp(pure, primals, tangents)


def _refused_write(err: RuntimeError) -> bool:
    """Is this forward-mode AD's refusal of an in-place write (not an error of the model)?"""
    text = str(err)
    return any(
        s in text
        for s in (
            "is a view and is being modified inplace",
            "is being modified inplace",
            "mutate a captured Tensor",
            "in-place operation",
            "inplace operation",
        )
    )
