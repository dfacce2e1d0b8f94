"""Anti-aliasing fixes: model surgery that returns a NEW model.

Every fix deep-copies the model (weights are copied: fine-tuning the fixed model never touches the
original, and the original keeps its train/eval flag and hooks), finds the ops to change by recording
one forward pass of an example input (:func:`aliasscope.capture.record`), replaces the modules that run
them, checks that each replacement keeps the op's output shape, and appends a :class:`Change` per
module to the record that :func:`changes` reads back. Fixes compose: ``polyphase(circular_padding(m))``.

``where`` selects ops like :meth:`aliasscope.capture.Recording.select`: glob patterns on op names
(module paths), op kind names (:data:`aliasscope.KINDS`), or a predicate on the
:class:`~aliasscope.capture.OpRecord`; each fix has a default. Functional ops (``F.relu`` inside a
``forward``) cannot be swapped module by module: they are left alone and listed with ``changed=False``.

* :func:`blurpool`: Zhang 2019. Strided conv -> binomial blur (stride 1) then the strided conv; strided
  max-pool -> max-pool at stride 1 then blur-pool; avg-pool -> blur-pool (timm's ``BlurPool2d``).
* :func:`filtered_activation`: upsample -> nonlinearity -> low-pass -> downsample around each pointwise
  nonlinearity module (:class:`~aliasscope._antialias.FilteredActivation`).
* :func:`circular_padding`: convolutions, pools and blurs pad circularly.
* :func:`polyphase`: adaptive polyphase sampling for strided ops
  (:class:`~aliasscope._antialias.PolyphaseDown`).
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ._antialias import (
    CircularAvgPool2d,
    CircularConv2d,
    CircularMaxPool2d,
    FilteredActivation,
    PhaseBook,
    PolyphaseDown,
    shallow_copy,
)
from ._checks import check_model
from .capture import OpRecord, select_ops

__all__ = [
    "Change",
    "changes",
    "apply_fixes",
    "parse_chain",
    "blurpool",
    "filtered_activation",
    "circular_padding",
    "polyphase",
    "FIXES",
]

Where = str | Sequence[str] | Callable[[OpRecord], bool] | None
_CHANGES_ATTR = "aliasscope_changes"


@dataclass(frozen=True)
class Change:
    """What a fix did to one module: ``changed=False`` with the reason where it left a selected op alone."""

    fix: str
    name: str
    kind: str
    before: str
    after: str
    changed: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def changes(model: nn.Module) -> list[Change]:
    """The changes every fix applied to ``model`` made, in order (empty for an unfixed model)."""
    return list(getattr(model, _CHANGES_ATTR, []))


# -- shared machinery -----------------------------------------------------------------------------


def _example_input(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        return example
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, *size, generator=gen, dtype=dtype).to(device)


def _recorded_ops(model: nn.Module, example: torch.Tensor) -> list[OpRecord]:
    """The ops of one recorded forward pass (under :func:`borrowed`: modes and hooks restored)."""
    from ._borrow import borrowed, check_images
    from .capture import record

    example = check_images(example, model)
    with borrowed(model), torch.no_grad():
        with record(model) as rec:
            model(example)
    return rec.ops


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def _summary(module: nn.Module) -> str:
    return " ".join(repr(module).split())[:200]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _apply(
    model: nn.Module,
    fix: str,
    where: Where,
    default: Where,
    example: torch.Tensor | None,
    make: Callable[[OpRecord, nn.Module | None], nn.Module | str | None],
) -> nn.Module:
    """Copy the model, and replace the module of every selected op by ``make(op, module)`` (module
    None for a functional op): a module, a reason (str) to leave it, or None when the op is not of the
    kind this fix changes."""
    model = check_model(model)
    fixed = copy.deepcopy(model)
    log = changes(model)
    ops = _recorded_ops(fixed, _example_input(fixed, example))
    done: set[str] = set()
    for op in (ops[i] for i in select_ops(ops, where if where is not None else default)):
        key = op.module if op.unit is not None else op.name
        if key in done:
            continue
        done.add(key)
        module = (fixed.get_submodule(op.module) if op.module else fixed) if op.unit is not None else None
        before = _summary(module) if module is not None else f"{op.op} (functional)"
        new = make(op, module)
        if new is None:
            continue
        if isinstance(new, nn.Module) and op.inputs:
            new = new.to(device=op.inputs[0].device, dtype=op.inputs[0].dtype)  # new filters' buffers
        problem = new if isinstance(new, str) else _check_shape(new, op)
        if problem:
            log.append(Change(fix, key, op.kind, before, problem, changed=False))
            continue
        if op.module:
            _set_module(fixed, op.module, new)
        else:
            fixed = new
        log.append(Change(fix, key, op.kind, before, _summary(new)))
    object.__setattr__(fixed, _CHANGES_ATTR, log)
    if not any(c.changed and c.fix == fix for c in log[len(changes(model)) :]):
        warnings.warn(f"{fix} changed no op of the model (see aliasscope.fixes.changes)", stacklevel=3)
    return fixed


def _check_shape(new: nn.Module, op: OpRecord) -> str | None:
    """None when the replacement gives the recorded output shape on the recorded input."""
    if len(op.inputs) != 1 or not op.outputs:
        return None
    was = new.training
    new.eval()
    try:
        with torch.no_grad():
            got = new(op.inputs[0])
    except (RuntimeError, ValueError) as err:
        return f"left unchanged: the replacement fails on this input ({err})"
    finally:
        new.train(was)
    if tuple(got.shape) != tuple(op.outputs[0].shape):
        shapes = f"{tuple(op.outputs[0].shape)} -> {tuple(got.shape)}"
        return f"left unchanged: the replacement would change the output shape {shapes}"
    return None


def _stride(module: nn.Module) -> int | None:
    """The stride of a conv/pool/blur with the same stride > 1 on both axes (None otherwise)."""
    stride = getattr(module, "stride", None)
    if stride is None:
        return None
    sy, sx = _pair(stride)
    return sy if sy == sx and sy > 1 else None


def _is_blur(module: nn.Module) -> bool:
    return "blurpool" in type(module).__name__.lower()


def _with_stride_one(module: nn.Module) -> nn.Module:
    """A copy of a conv/pool/blur at stride 1 (same weights, shared)."""
    new = shallow_copy(module, stride=(1, 1) if isinstance(module, nn.Conv2d) else 1)
    if _is_blur(module):
        from timm.layers import get_padding

        new.padding = [get_padding(module.filt_size, 1, dilation=1)] * 4
    return new


# -- the fixes ------------------------------------------------------------------------------------


def blurpool(
    model: nn.Module, filter_size: int = 3, *, where: Where = None, example: torch.Tensor | None = None
) -> nn.Module:
    """Anti-aliased downsampling (Zhang 2019, "Making convolutional networks shift-invariant again").

    * strided conv -> ``BlurPool2d(stride=1)`` then the same strided conv. Zhang writes it as the conv
      at stride 1, then blur, then subsample; both are linear and shift-equivariant, so the two orders
      give the same result away from the borders, and blurring first costs ``stride**2`` times less;
    * strided max-pool -> max-pool at stride 1, then ``BlurPool2d(stride)`` (MaxBlurPool);
    * strided avg-pool -> ``BlurPool2d(stride)``.

    Binomial filters of ``filter_size`` (3, 5 or 7), reflect padding. Default ``where``: every
    downsampling op. A constant image gives exactly the original outputs (a blur keeps a constant).
    """
    from timm.layers import BlurPool2d

    if filter_size not in (3, 5, 7):
        raise ValueError(f"filter_size must be 3, 5 or 7, got {filter_size}")
    blurred = [c.name for c in changes(model) if c.fix == "blurpool" and c.changed]

    def make(op: OpRecord, m: nn.Module | None) -> nn.Module | str | None:
        s = _stride(m) if m is not None else None
        if s is None or _is_blur(m) or isinstance(m, PolyphaseDown):
            return None
        done = next((b for b in blurred if op.module == b or op.module.startswith(b + ".")), None)
        if done is not None:
            raise ValueError(
                f"blurpool was already applied to {done!r} of this model (aliasscope.changes(model) lists "
                "it): a second blurpool would stack a second blur before the same op. Apply it once, to "
                "the original model (or select other ops with where=)"
            )
        if isinstance(m, nn.Conv2d):
            return nn.Sequential(OrderedDict(blur=BlurPool2d(None, filter_size, stride=1), conv=m))
        if isinstance(m, nn.MaxPool2d):
            return nn.Sequential(
                OrderedDict(pool=_with_stride_one(m), blur=BlurPool2d(None, filter_size, stride=s))
            )
        if isinstance(m, nn.AvgPool2d):
            return BlurPool2d(None, filter_size, stride=s)
        return f"left unchanged: no blur-pool rule for {type(m).__name__}"

    return _apply(model, "blurpool", where, "downsampling", example, make)


def filtered_activation(
    model: nn.Module,
    up: int = 2,
    filter: str = "ideal",
    *,
    where: Where = None,
    example: torch.Tensor | None = None,
) -> nn.Module:
    """Evaluate each pointwise nonlinearity module at ``up`` times the resolution with band-limited
    resampling around it (:class:`~aliasscope._antialias.FilteredActivation`; ``filter="ideal"`` or
    ``"kaiser"``). The layout of each activation (BCHW, BHWC or a token grid) comes from the recorded
    example. Default ``where``: every nonlinearity."""
    FilteredActivation(nn.Identity(), up, filter)  # validates the arguments before any copying

    layouts: dict[str, set[str]] = {}

    def make(op: OpRecord, m: nn.Module | None) -> nn.Module | str | None:
        if m is None:
            return "left unchanged: a functional op (not a module) cannot be swapped"
        if isinstance(m, FilteredActivation):
            return None
        if next(m.children(), None) is not None:
            return None  # a container recorded whole (a gated block, an MLP): not one pointwise op
        lay = op.in_layouts[0] if len(op.in_layouts) == 1 else None
        if (
            lay is None
            or lay.kind not in ("bchw", "bhwc", "tokens")
            or op.inputs[0].shape != op.outputs[0].shape
        ):
            return "left unchanged: not a pointwise op on one image-like tensor"
        layouts.setdefault(op.module, set()).add(str(lay))
        return FilteredActivation(m, up, filter, lay)

    fixed = _apply(model, "filtered_activation", where, "nonlinearity", example, make)
    reused = [p for p, lays in layouts.items() if len(lays) > 1]
    if reused:
        raise ValueError(
            f"activation modules {reused} run on tensors of different layouts; select their calls with where="
        )
    return fixed


def circular_padding(
    model: nn.Module, *, where: Where = None, example: torch.Tensor | None = None
) -> nn.Module:
    """Convolutions, pools and blurs pad circularly (a circular shift of the input then shifts every
    feature map of a stride-1 network exactly). ``nn.Conv2d`` switches ``padding_mode``; timm's
    dynamic TF-"same" convs and pools and padded pools become
    :class:`~aliasscope._antialias.CircularConv2d` / ``CircularMaxPool2d`` / ``CircularAvgPool2d``.
    Default ``where``: every op."""
    from timm.layers import Conv2dSame

    def make(op: OpRecord, m: nn.Module | None) -> nn.Module | str | None:
        if m is None:
            return None
        if isinstance(m, FilteredActivation):
            if m.filter != "kaiser" or m.pad_mode == "circular":
                return None
            return shallow_copy(m, pad_mode="circular")
        if _is_blur(m):
            if m.pad_mode == "circular":
                return None
            return shallow_copy(m, pad_mode="circular")
        if isinstance(m, CircularConv2d | CircularMaxPool2d | CircularAvgPool2d):
            return None
        if isinstance(m, Conv2dSame):  # timm's dynamic TF "same" padding, now circular
            return CircularConv2d.like(m, same=True)
        if isinstance(m, nn.Conv2d):
            if m.padding_mode == "circular" or (m.padding != "same" and not any(_pair(m.padding))):
                return None
            if m.padding == "same":
                return "left unchanged: torch has no circular mode for padding='same'"
            return shallow_copy(m, padding_mode="circular")
        if isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
            cls = CircularMaxPool2d if isinstance(m, nn.MaxPool2d) else CircularAvgPool2d
            if type(m).__name__.endswith("Same"):  # timm MaxPool2dSame / AvgPool2dSame pad dynamically
                return cls.like(m, same=True)
            return cls.like(m, same=False) if any(_pair(m.padding)) else None
        return None

    return _apply(model, "circular_padding", where, None, example, make)


def polyphase(model: nn.Module, *, where: Where = None, example: torch.Tensor | None = None) -> nn.Module:
    """Adaptive polyphase sampling (Chaman & Dokmanic 2021, "Truly shift-invariant convolutional neural
    networks"): each strided conv, pool or blur runs at stride 1 and a
    :class:`~aliasscope._antialias.PolyphaseDown` keeps the polyphase component of largest norm. All
    APS layers of the model share one :class:`~aliasscope._antialias.PhaseBook`, cleared by a forward
    pre-hook on the model, so a residual block's strided shortcut keeps the component its main path
    chose. With :func:`circular_padding` as well, a CNN's output is exactly invariant to circular
    shifts of the input by any integer (grid sizes must stay divisible by the strides). Default
    ``where``: every downsampling op."""

    def make(op: OpRecord, m: nn.Module | None) -> nn.Module | str | None:
        s = _stride(m) if m is not None else None
        if s is None or isinstance(m, PolyphaseDown):
            return None
        if not (isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d) or _is_blur(m)):
            return f"left unchanged: no polyphase rule for {type(m).__name__}"
        return nn.Sequential(OrderedDict(full=_with_stride_one(m), aps=PolyphaseDown(s)))

    fixed = _apply(model, "polyphase", where, "downsampling", example, make)
    # one book for every APS layer of the copy (layers from an earlier polyphase keep theirs)
    aps = [m for m in fixed.modules() if isinstance(m, PolyphaseDown)]
    book = next((m.book for m in aps if m.book is not None), None) or PhaseBook()
    for m in aps:
        m.book = book
    if aps and not any(getattr(h, "__self__", None) is book for h in fixed._forward_pre_hooks.values()):
        fixed.register_forward_pre_hook(book.reset)
    return fixed


def parse_chain(chain: str | Sequence[str]) -> list[str]:
    """Fix names of a chain, ``"circular_padding+polyphase"`` or a list, checked against :data:`FIXES`."""
    names = [p.strip() for p in chain.split("+") if p.strip()] if isinstance(chain, str) else list(chain)
    if not names or any(n not in FIXES for n in names):
        spec = chain if isinstance(chain, str) else "+".join(names)
        raise ValueError(f"unknown fix {spec!r}; valid fixes: {', '.join(FIXES)} (chain them with '+')")
    return names


def apply_fixes(
    model: nn.Module,
    chain: str | Sequence[str],
    *,
    example: torch.Tensor | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> nn.Module:
    """Apply a chain of fixes (:func:`parse_chain`) in order; ``options`` maps a fix name to its
    keyword arguments."""
    fixed = model
    for name in parse_chain(chain):
        fixed = FIXES[name](fixed, example=example, **(options or {}).get(name, {}))
    return fixed


FIXES: dict[str, Callable[..., nn.Module]] = {
    "blurpool": blurpool,
    "filtered_activation": filtered_activation,
    "circular_padding": circular_padding,
    "polyphase": polyphase,
}
"""The fixes by name (what ``aliasscope fix --fix NAME`` applies)."""
