"""In-place calls as functions: which tensor a call writes into, and the value it writes.

A call that mutates a tensor (``x.relu_()``, ``x += y``, ``F.relu(x, inplace=True)``, ``x[i] = v``,
``torch.sigmoid(x, out=buf)``) is described by a :class:`Mutation`: its *target* (the tensor written
into) and a pure function of the same arguments that returns the target's new value. The recorder
(:mod:`aliasscope.capture`) runs that function instead, records it as an op with its own output
tensor, and redirects later reads of the target (and of views that share its memory) to the new
value: the recorded program is the functional form of the model's, with every activation kept, and
computes exactly what the in-place program computes.

:func:`without_out` rewrites ``out=`` calls for forward-mode AD (which has no rule for them) as the
plain call followed by a copy into ``out``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = [
    "Mutation",
    "as_mutation",
    "without_out",
    "setitem",
    "view_scatter",
    "SHAPE_INPLACE",
    "Functionalizer",
    "FunctionalMode",
]

_INPLACE_ACTIVATIONS = {
    f: inspect.signature(f)
    for f in (
        F.relu,
        F.relu6,
        F.hardtanh,
        F.elu,
        F.selu,
        F.celu,
        F.leaky_relu,
        F.silu,
        F.mish,
        F.hardswish,
        F.hardsigmoid,
        F.threshold,
        F.rrelu,
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
    )
}
_INPLACE_DUNDERS = {
    "__iadd__": "__add__",
    "__isub__": "__sub__",
    "__imul__": "__mul__",
    "__itruediv__": "__truediv__",
    "__ifloordiv__": "__floordiv__",
    "__imod__": "__mod__",
    "__ipow__": "__pow__",
    "__imatmul__": "__matmul__",
    "__iand__": "__and__",
    "__ior__": "__or__",
    "__ixor__": "__xor__",
    "__ilshift__": "__lshift__",
    "__irshift__": "__rshift__",
}
# names ending in "_" that do not write a tensor's values
_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "record_stream", "set_", "_fix_weakref"}
SHAPE_INPLACE = frozenset(
    {
        "unsqueeze_",
        "squeeze_",
        "t_",
        "transpose_",
        "swapaxes_",
        "swapdims_",
        "as_strided_",
        "resize_",
        "resize_as_",
        "detach_",
    }
)
"""In-place calls that change a tensor's shape or strides rather than its values."""


@dataclass
class Mutation:
    """A call that writes into ``target``: ``func(*args, **kwargs)`` returns the new value of
    ``target`` (same shape and dtype) without writing anything; ``returns`` says what the original
    call returns: ``"target"`` (in-place methods, ``out=``) or ``"none"`` (``x[i] = v``)."""

    target: torch.Tensor
    func: Callable[..., torch.Tensor]
    args: tuple
    kwargs: dict
    returns: str = "target"


def _cast_like(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` as ``target`` holds it after an in-place write: target's dtype, broadcast to its shape."""
    if value.dtype != target.dtype:
        value = value.to(target.dtype)
    if value.shape != target.shape:
        value = value.expand(target.shape).clone()
    return value


def setitem(target: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """The value of ``target`` after ``target[index] = value``, as a new tensor."""
    out = target.clone()
    out[index] = value
    return out


def view_scatter(
    base: torch.Tensor, value: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The value of ``base`` after its view ``view(base)`` was overwritten with ``value``."""
    out = base.clone()
    part = view(out)
    if part._is_view() and part._base is not None and _multi_view(part):
        # views made by split/chunk/unbind may not be written (autograd): the same memory as one view
        part = out.as_strided(part.size(), part.stride(), part.storage_offset())
    part.copy_(value)
    return out


def _multi_view(t: torch.Tensor) -> bool:
    """A view made by a function returning several views (split, chunk, unbind)."""
    fn = t.grad_fn
    name = type(fn).__name__ if fn is not None else ""
    return any(k in name for k in ("Split", "Unbind", "Chunk"))


def _copy(target: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """The value of ``target`` after ``target.copy_(src)``."""
    return _cast_like(target, src.to(target.device))


_copy.__name__ = "copy"


def _clone_then(func: Callable) -> Callable:
    """``func`` applied to a copy of its first argument (any in-place method without a twin)."""

    def functional(target: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = target.clone()
        func(out, *args, **kwargs)
        return out

    functional.__name__ = getattr(func, "__name__", "inplace").rstrip("_")
    return functional


def _twin(func: Callable, name: str) -> Callable | None:
    """The out-of-place twin of an in-place ``Tensor`` method or ``torch`` function (``add_`` -> ``add``)."""
    for owner in (torch.Tensor, torch):
        if getattr(owner, name, None) is func:
            twin = getattr(owner, name[:-1], None)
            return twin if callable(twin) else None
    return None


def _cast_result(func: Callable, dtype: torch.dtype | None = None) -> Callable:
    """``func`` whose result is held as its first argument holds it after the in-place twin (that
    argument's dtype and shape), or in ``dtype`` (an ``out=`` tensor, resized to the result)."""

    def functional(*args: Any, **kwargs: Any) -> torch.Tensor:
        value = func(*args, **kwargs)
        if dtype is not None:
            return value if value.dtype == dtype else value.to(dtype)
        return _cast_like(args[0], value)

    functional.__name__ = getattr(func, "__name__", "inplace")
    return functional


def as_mutation(func: Any, args: tuple, kwargs: dict) -> Mutation | None:
    """The :class:`Mutation` a call performs, or None for a call that writes into no tensor."""
    if func in _INPLACE_ACTIVATIONS:
        bound = _INPLACE_ACTIVATIONS[func].bind(*args, **kwargs)
        if not bound.arguments.get("inplace"):
            return None
        bound.arguments["inplace"] = False
        target = bound.args[0] if bound.args else bound.arguments["input"]
        return Mutation(target, func, bound.args, bound.kwargs)
    out = kwargs.get("out") if kwargs else None
    if isinstance(out, torch.Tensor):
        rest = {k: v for k, v in kwargs.items() if k != "out"}
        return Mutation(out, _cast_result(func, out.dtype), args, rest)
    if isinstance(out, tuple | list) and any(isinstance(o, torch.Tensor) for o in out):
        raise NotImplementedError(
            f"{getattr(func, '__name__', func)}(..., out=(...)) with several output tensors cannot be "
            "recorded: call it without out= and assign its results"
        )
    name = getattr(func, "__name__", "")
    if name == "__setitem__" and func is torch.Tensor.__setitem__:
        return Mutation(args[0], setitem, tuple(args), dict(kwargs), returns="none")
    if name in _INPLACE_DUNDERS and getattr(torch.Tensor, name, None) is func:
        twin = getattr(torch.Tensor, _INPLACE_DUNDERS[name])
        return Mutation(args[0], _cast_result(twin), args, kwargs)
    if not name.endswith("_") or name.startswith("_") or name in _NOT_WRITES:
        return None
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    if name in SHAPE_INPLACE:
        raise NotImplementedError(
            f"the in-place shape change .{name}() on an activation cannot be recorded: write "
            f"x = x.{name[:-1]}(...) instead"
        )
    if name == "copy_":
        return Mutation(args[0], _copy, args, kwargs)
    twin = _twin(func, name)
    target = args[0]
    if twin is None:
        if getattr(torch.Tensor, name, None) is not func and getattr(torch, name, None) is not func:
            return None  # not a torch in-place op (a user function whose name ends with "_")
        return Mutation(target, _clone_then(func), args, kwargs)
    return Mutation(target, _cast_result(twin), args, kwargs)


def without_out(func: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict] | None:
    """``func(*args, out=o)`` as a call without ``out`` whose result is copied into ``o`` (forward-mode
    AD has no rule for ``out=`` variants); None for calls without a tensor ``out``."""
    out = kwargs.get("out") if kwargs else None
    if not isinstance(out, torch.Tensor):
        return None
    rest = {k: v for k, v in kwargs.items() if k != "out"}

    def call(*a: Any, **k: Any) -> torch.Tensor:
        value = func(*a, **k)
        if out.shape != value.shape:
            out.resize_(value.shape)
        return out.copy_(value)

    return call, args, rest


@dataclass
class _View:
    """How a view was made from its base: ``func`` on the call's arguments (``arg`` among them, the
    base as the call got it), output ``index``; ``base`` is the tensor ``arg`` stands for."""

    obj: torch.Tensor
    base: torch.Tensor
    arg: torch.Tensor
    func: Any
    args: tuple
    kwargs: dict
    index: int
    seen: int  # the base's write count when the view's value was last computed

    def on(self, base: torch.Tensor) -> tuple[tuple, dict]:
        """The call's arguments with ``base`` in place of the original base."""
        leaves, spec = tree_flatten((self.args, self.kwargs))
        return tree_unflatten([base if leaf is self.arg else leaf for leaf in leaves], spec)

    def take(self, out: Any) -> torch.Tensor:
        return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)][self.index]

    def of(self, base: torch.Tensor) -> torch.Tensor:
        """The same view of another base."""
        args, kwargs = self.on(base)
        return self.take(self.func(*args, **kwargs))


def _scatter_into(view: _View) -> Callable[..., torch.Tensor]:
    def view_scatter_(base: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return view_scatter(base, value, view.of)

    view_scatter_.__name__ = "view_scatter"
    return view_scatter_


Run = Callable[[Any, tuple, dict], Any]


class Functionalizer:
    """In-place writes of a program, run in functional form.

    Every tensor object belongs to a logical tensor (its *root*). A write computes the new value into
    a new tensor (through ``run``, which may record it) and makes it the root's current value;
    :meth:`resolve` maps any object to the tensor holding its current value. Views are remembered
    with the call that made them: a written view writes its base (``view_scatter``), and a view whose
    base was written since is recomputed from the base on its next read. Nothing is written in place,
    so every tensor made along the way keeps its value.
    """

    def __init__(
        self,
        run: Run,
        depends: Callable[[torch.Tensor], bool],
        protected: set[int] = frozenset(),
        canonical: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ) -> None:
        """``run(func, args, kwargs)`` runs (and may record) the functional calls; ``depends`` says
        which tensors the writes must be tracked for; writes into ``protected`` ids are refused;
        ``canonical`` maps a caller's private alias of a tensor to the tensor (views are remembered
        against it, so recomputing them never reuses another call's private input)."""
        self.run, self.depends, self.protected, self.canonical = run, depends, protected, canonical
        self._root: dict[int, int] = {}
        self._value: dict[int, torch.Tensor] = {}
        self._count: dict[int, int] = {}
        self._fresh: dict[int, int] = {}  # id -> its root's write count when it held the value
        self._views: dict[int, _View] = {}
        self._keep: list[torch.Tensor] = []  # written objects stay alive: their ids stay theirs
        self.log: list[int] = []  # the root of every write, in order

    @property
    def active(self) -> bool:
        """Whether anything was written yet (until then every tensor is its own current value)."""
        return bool(self._count)

    def root(self, t: torch.Tensor) -> int:
        return self._root.get(id(t), id(t))

    def count(self, t: torch.Tensor) -> int:
        """How often the logical tensor of ``t`` was written."""
        return self._count.get(self.root(t), 0)

    def lineage(self, t: torch.Tensor) -> set[int]:
        """The roots of ``t`` and of every base it is a view of (a write into ``t`` writes them all)."""
        roots, r = set(), self.root(t)
        while r not in roots:
            roots.add(r)
            view = self._views.get(r)
            if view is None:
                break
            r = self.root(view.base)
        return roots

    def alias(self, alias: torch.Tensor, of: torch.Tensor) -> None:
        """``alias`` stands for ``of`` (a private view made by the caller)."""
        self._root[id(alias)] = self.root(of)
        if id(of) in self._fresh:
            self._fresh[id(alias)] = self._fresh[id(of)]

    def resolve(self, t: torch.Tensor) -> torch.Tensor:
        """The current value of ``t``: a view is recomputed from its base's current value when the base
        was written since."""
        r = self.root(t)
        view = self._views.get(r)
        if view is not None:
            base = self.resolve(view.base)
            seen = self._count.get(self.root(view.base), 0)
            if seen != view.seen:  # the base was written since: recompute the view from it
                args, kwargs = view.on(base)
                new = view.take(self.run(view.func, args, kwargs))
                view.seen = seen
                self._set(r, new)
        if self._fresh.get(id(t), 0) == self._count.get(r, 0):
            return t
        return self._value[r]

    def resolve_all(self, obj: Any) -> Any:
        """``obj`` (a pytree) with every tensor replaced by its current value; ``obj`` itself if none
        changed."""
        if not self._count:
            return obj
        leaves, spec = tree_flatten(obj)
        new = [self.resolve(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        if all(a is b for a, b in zip(leaves, new, strict=True)):
            return obj
        return tree_unflatten(new, spec)

    def _set(self, r: int, value: torch.Tensor) -> None:
        self._value[r] = value
        self._root[id(value)] = r
        self._count[r] = self._count.get(r, 0) + 1
        self._fresh[id(value)] = self._count[r]
        self.log.append(r)
        self._keep.append(value)

    def assign(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """``target`` now holds ``value``; a written view writes its base too."""
        base_of_target = target._base if target._base is not None else target
        if id(target) in self.protected or id(base_of_target) in self.protected:
            raise NotImplementedError(
                "the model writes image-dependent values into one of its own parameters or buffers in "
                "place; aliasscope analyses models whose forward keeps no state between calls"
            )
        r = self.root(target)
        self._keep.append(target)
        self._set(r, value)
        view = self._views.get(r)
        if view is None:
            return
        new_base = self.run(_scatter_into(view), (self.resolve(view.base), value), {})
        self.assign(view.base, new_base)
        view.seen = self._count.get(self.root(view.base), 0)

    def mutate(self, m: Mutation, func: Any, args: tuple, kwargs: dict) -> Any:
        """An in-place call (``args`` already resolved): as written when it touches only constants,
        else in functional form."""
        leaves = [t for t in tree_flatten((m.args, m.kwargs))[0] if isinstance(t, torch.Tensor)]
        if not (self.depends(m.target) or any(self.depends(t) for t in leaves)):
            return func(*args, **kwargs)
        new = self.run(m.func, m.args, m.kwargs)
        self.assign(m.target, new)
        return new if m.returns == "target" else None

    def track_views(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Remember how each output that views an argument's memory was made from it."""
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs or all(o._base is None for o in outs):
            return
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        for k, o in enumerate(outs):
            if o._base is None or any(o is t for t in ins):
                continue
            base = next((t for t in ins if (t if t._base is None else t._base) is o._base), None)
            r = self.root(o)
            if base is None or r in self._views:
                continue
            source = self.canonical(base)
            if r not in self.lineage(source):  # a view of itself (through aliases) is no view to recompute
                seen = self._count.get(self.root(source), 0)
                self._views[r] = _View(o, source, base, func, args, kwargs, k, seen)


class FunctionalMode(TorchFunctionMode):
    """Runs every in-place write of the code inside it in functional form (see :class:`Functionalizer`).

    For code whose writes the mode below it cannot handle (forward-mode AD refuses in-place writes
    into views made by ``split``/``chunk``/``unbind``); :meth:`result` maps the code's return value to
    current values.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes = Functionalizer(lambda f, a, k: f(*a, **k), depends=lambda t: True)

    def result(self, out: Any) -> Any:
        return self.writes.resolve_all(out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.writes.active:
            args, kwargs = self.writes.resolve_all((args, kwargs))
        m = as_mutation(func, args, kwargs)
        if m is not None:
            return self.writes.mutate(m, func, args, kwargs)
        out = func(*args, **kwargs)
        self.writes.track_views(func, args, kwargs, out)
        return out
