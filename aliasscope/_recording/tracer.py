"""The tracer: a :class:`~torch.overrides.TorchFunctionMode` and module hooks that fill a
:class:`~aliasscope._recording.ops.Recording` while the model runs.

Its state -- the module-call stack, the unit recorded whole, op-name counters, private input aliases,
the in-place-write :class:`~aliasscope._mutation.Functionalizer`, tensor births -- lives here and dies
with it; the recording gets the ops, the activation table and the alias table.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._mutation import Functionalizer, as_mutation
from ..layout_rules import func_name, propagate
from ..layouts import Layout
from .classify import _arg_training, _is_eval_batchnorm, _kind_of_call, _kind_of_unit
from .collapse import collapse
from .ops import OpRecord, Recording, _tensors

_METADATA = {
    "size",
    "dim",
    "shape",
    "numel",
    "stride",
    "is_contiguous",
    "__get__",
    "element_size",
    "nelement",
}
_FACTORIES = {
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "rand_like",
    "randn_like",
    "randint_like",
    "new_empty",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_tensor",
}
_PLAIN_BINARY = {
    torch.add,
    torch.sub,
    torch.Tensor.add,
    torch.Tensor.sub,
    torch.Tensor.__add__,
    torch.Tensor.__sub__,
}


class _Template:
    """A call's arguments with the image-dependent tensors cut out, to call it again on new ones.

    Only floating-point tensors are inputs: a mask or index computed from the image is piecewise
    constant in it (zero derivative) and stays part of the call, as recorded.
    """

    def __init__(self, args: tuple, kwargs: dict, dependent: Callable[[torch.Tensor], bool]) -> None:
        leaves, self.spec = tree_flatten((args, kwargs))
        self.leaves = list(leaves)
        self.tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]  # all, in order
        self.inputs: list[torch.Tensor] = []
        self.positions: list[int] = []
        for pos, leaf in enumerate(self.leaves):
            if isinstance(leaf, torch.Tensor) and dependent(leaf) and leaf.is_floating_point():
                k = next((i for i, t in enumerate(self.inputs) if t is leaf), None)
                if k is None:
                    self.inputs.append(leaf)
                    k = len(self.inputs) - 1
                self.positions.append(pos)
                self.leaves[pos] = k

    def fill(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        leaves = list(self.leaves)
        for pos in self.positions:
            leaves[pos] = tensors[self.leaves[pos]]
        return tree_unflatten(leaves, self.spec)


@dataclass
class _Call:
    path: str
    module: nn.Module
    parent: _Call | None
    template: _Template
    unit: bool
    first_op: int
    in_layouts: list[Layout | None] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    out_layouts: list[Layout | None] = field(default_factory=list)
    funcs: list[str] = field(default_factory=list)
    last_op: int = -1
    needs_collapse: bool = False
    mixes_tokens: bool = False
    in_writes: list[int] = field(default_factory=list)
    tick: int = 0
    log_start: int = 0
    written_inputs: list[int] = field(default_factory=list)
    extra_inputs: list[int] = field(default_factory=list)
    writes_outside: bool = False


class _EvalBatchNorm(torch.autograd.Function):
    """Eval-mode ``F.batch_norm`` with torch's own forward (the same bits) and the backward written out:
    ``y = (x - mean) * w / sqrt(var + eps) + b`` gives ``dx = g * w / sqrt(var + eps)`` per channel,
    ``dw = sum g (x - mean) / sqrt(var + eps)``, ``db = sum g``."""

    @staticmethod
    def forward(x, mean, var, weight, bias, eps):  # noqa: ANN001, ANN205
        return torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x, mean, var, weight, bias, eps = inputs
        ctx.save_for_backward(x, mean, var, weight)
        ctx.save_for_forward(x, mean, var, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None

    @staticmethod
    def _parts(ctx, x, mean, var, weight):  # noqa: ANN001, ANN205
        shape = (1, -1) + (1,) * (x.dim() - 2)
        inv = torch.rsqrt(var + ctx.eps)
        scale = inv if weight is None else inv * weight
        return shape, inv.view(shape), scale.view(shape)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, mean, var, weight = ctx.saved_tensors
        shape, inv, scale = _EvalBatchNorm._parts(ctx, x, mean, var, weight)
        dims = [0, *range(2, x.dim())]
        gx = g * scale if ctx.needs_input_grad[0] else None
        gw = (
            (g * (x - mean.view(shape)) * inv).sum(dims)
            if weight is not None and ctx.needs_input_grad[3]
            else None
        )
        gb = g.sum(dims) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return gx, None, None, gw, gb, None

    @staticmethod
    def jvp(ctx, tx, tmean, tvar, tw, tb, teps):  # noqa: ANN001, ANN205
        x, mean, var, weight = ctx.saved_tensors
        shape, inv, scale = _EvalBatchNorm._parts(ctx, x, mean, var, weight)
        out = torch.zeros_like(x) if tx is None else tx * scale
        if tw is not None:
            out = out + (x - mean.view(shape)) * inv * tw.view(shape)
        return out if tb is None else out + tb.view(shape)


def _batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm``, with eval mode on the CPU through :class:`_EvalBatchNorm`: torch's CPU kernel
    returns a wrong input gradient when the gradient reaching it is strided in some ways (eval
    BatchNorm2d, then ``flatten(2).transpose(1, 2).reshape(...)[:, ::2, ::2]`` on a batch of one:
    LeViT's subsampled queries, XCiT; torch 2.14.1, float32 and float64; forward mode, finite
    differences and CUDA are right). The forward is torch's own, bit for bit."""
    if training or running_mean is None or running_var is None or x.device.type != "cpu":
        return torch.nn.functional.batch_norm(
            x, running_mean, running_var, weight, bias, training, momentum, eps
        )
    return _EvalBatchNorm.apply(x, running_mean, running_var, weight, bias, eps)


def _subsampled_tokens(grid: tuple[int, int], count: int, num_prefix: int = 0) -> Layout | None:
    """Tokens subsampled by an integer stride ``s`` (LeViT's attention downsampling, MViTv2's pooled
    queries: a grid of ``ceil(H / s) x ceil(W / s)`` tokens after the same ``num_prefix`` class
    tokens), when ``count`` fits exactly one such stride."""
    fits = [
        ((grid[0] - 1) // s + 1, (grid[1] - 1) // s + 1)
        for s in range(2, max(grid) + 1)
        if ((grid[0] - 1) // s + 1) * ((grid[1] - 1) // s + 1) == count - num_prefix
    ]
    return Layout.tokens(fits[0], num_prefix) if len(set(fits)) == 1 else None


class Tracer:
    """The recording's working state while the forward runs: the module-call stack, the unit being
    recorded whole, op-name counters, the private input aliases, the in-place-write functionalizer.

    It writes what it sees into its :class:`~aliasscope._recording.ops.Recording` (ops, activations,
    aliases, input, output); :meth:`finish` collapses regions with unknown layouts and links each op's
    inputs to the ops that produced them. The recording keeps no reference to it.
    """

    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        model = rec.model
        self._slots = rec.activations  # the tracer fills the recording's activation table
        self._stack: list[_Call] = []
        self._unit: _Call | None = None
        self._calls: list[_Call] = []
        self._counts: dict[str, int] = {}
        self._module_counts: dict[int, int] = {}
        self._paths = {id(m): name for name, m in model.named_modules()}
        self._alias_parent: dict[int, torch.Tensor] = {}  # alias -> the tensor it was made from
        self._muted = False
        self.started = False
        # in-place writes run in functional form (recorded through _run); births of tensors tell
        # which writes a module made into tensors older than its call
        state = {id(t) for t in (*model.parameters(), *model.buffers())}
        self._call_aliases: set[int] = set()
        self.writes = Functionalizer(self._run, rec.depends, state, canonical=self._behind_call_alias)
        self._birth: dict[int, int] = {}
        self._tick = 0

    # -- the module hooks ------------------------------------------------------------------------
    @contextmanager
    def hooked(self) -> Iterator[None]:
        """Forward hooks on every module of the model for the block's duration (always removed)."""
        handles = []
        for m in self.rec.model.modules():
            handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            handles.append(m.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if module is self.rec.model and not self.started:
            self.started = True
            tensors = _tensors(args)
            if not tensors:
                raise ValueError("the model's forward got no tensor input to record")
            self.start(tensors[0])
        given = (args, kwargs)
        resolved = self.writes.resolve_all(given)  # inputs written in place earlier: their current values
        replaced = self.on_module_start(module, *resolved)
        return replaced if replaced is not None or resolved is given else resolved

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._stack and self._stack[-1].module is module:
            current = self.writes.resolve_all(output)  # a module may return a tensor it wrote in place
            self.on_module_end(module, current)
            return None if current is output else current
        return None

    # -- bookkeeping used by the mode and hooks -------------------------------------------------
    def _register(self, t: torch.Tensor, layout: Layout | None) -> None:
        self._slots[id(t)] = (t, layout)

    # -- in-place writes in functional form ------------------------------------------------------
    def _exec(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run a torch call as it is (not seen by the mode: the caller records it)."""
        muted, self._muted = self._muted, True
        try:
            if func is torch.nn.functional.batch_norm:
                return _batch_norm(*args, **kwargs)
            return func(*args, **kwargs)
        finally:
            self._muted = muted

    def _run(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run and record one call (with private input aliases when asked for)."""
        if self.rec.alias_inputs and self._unit is None:
            args, kwargs = self.alias_args(args, kwargs, call=True)
        out = self._exec(func, args, kwargs)
        self._tick += 1
        ins = {id(t) for t in _tensors((args, kwargs))}
        for o in _tensors(out):
            if id(o) not in ins:  # a new tensor (ids of dead ones can come back: overwrite)
                self._birth[id(o)] = self._tick
        self.on_call(func, args, kwargs, out)
        return out

    def call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """One torch call of the model, as the mode hands it over."""
        if func_name(func) in _METADATA:
            return func(*args, **kwargs)
        writes = self.writes
        if writes.active:
            args, kwargs = writes.resolve_all((args, kwargs))
        m = as_mutation(func, args, kwargs)
        if m is not None:
            return writes.mutate(m, func, args, kwargs)
        out = self._run(func, args, kwargs)
        writes.track_views(func, args, kwargs, out)
        return out

    def _behind_call_alias(self, t: torch.Tensor) -> torch.Tensor:
        """What a torch call's private alias stands for (other tensors as they are)."""
        return self.rec.original(t) if id(t) in self._call_aliases else t

    def start(self, x: torch.Tensor) -> None:
        self.rec.input = x
        self._register(x, self.rec.input_layout)

    def alias_args(self, args: tuple, kwargs: dict, call: bool = False) -> tuple[tuple, dict]:
        """Give every image-dependent argument a private alias (a free view) for this call, so that
        one backward pass yields the gradient reaching each op through each of its inputs. Aliases
        for a torch call (``call=True``) are seen by that call alone; a module's are what its code
        holds."""
        leaves, spec = tree_flatten((args, kwargs))
        made: dict[int, torch.Tensor] = {}
        for k, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and self.rec.depends(leaf) and leaf.requires_grad:
                if id(leaf) not in made:
                    self._muted = True
                    try:
                        alias = leaf.view_as(leaf)
                    finally:
                        self._muted = False
                    self._register(alias, self.rec.layout_of(leaf))
                    self.rec.alias_of[id(alias)] = self.rec.original(leaf)
                    self._alias_parent[id(alias)] = leaf
                    self.writes.alias(alias, leaf)
                    if call:
                        self._call_aliases.add(id(alias))
                    made[id(leaf)] = alias
                leaves[k] = made[id(leaf)]
        if not made:
            return args, kwargs
        return tree_unflatten(leaves, spec)

    def _unique_name(self, base: str) -> str:
        k = self._counts.get(base, 0)
        self._counts[base] = k + 1
        return base if k == 0 else f"{base}#{k}"

    def _is_unit(self, module: nn.Module, path: str) -> bool:
        if getattr(module, "aliasscope_unit", False):  # aliasscope's own layers (fixes) are one op each
            return True
        classes = {c.__name__ for c in type(module).__mro__}
        if any(fnmatch.fnmatchcase(path, p) or p in classes for p in self.rec.unit_patterns):
            return True
        return next(module.children(), None) is None

    def on_module_start(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        path = self._paths.get(id(module), type(module).__name__)
        parent = self._stack[-1] if self._stack else None
        template = _Template(args, kwargs, self.rec.depends)
        mixes = self._unit is None and self._mixes_tokens(module, template)
        unit = self._unit is None and (self._is_unit(module, path) or mixes)
        replaced = None
        # every module call gets private aliases (not only units): a call collapsed after the forward
        # must see the gradient through its own code alone, not through other readers of its inputs
        if self._unit is None and self.rec.alias_inputs and template.inputs:
            replaced = self.alias_args(args, kwargs)
            template = _Template(*replaced, self.rec.depends)
        call = _Call(path, module, parent, template, unit, len(self.rec.ops), mixes_tokens=mixes)
        call.in_layouts = [self.rec.layout_of(t) for t in template.inputs]
        call.in_writes = [self.writes.count(t) for t in template.inputs]
        call.tick, call.log_start = self._tick, len(self.writes.log)
        self._stack.append(call)
        self._calls.append(call)
        if unit:
            self._unit = call
        return replaced

    def _mixes_tokens(self, module: nn.Module, template: _Template) -> bool:
        """A container whose Linear layers act along a spatial dimension (an MLP across tokens)."""
        if not template.inputs or not any(isinstance(m, nn.Linear) for m in module.children()):
            return False
        lay = self.rec.layout_of(template.inputs[0])
        return lay is not None and lay.roles is not None and lay.roles[-1] == "n"

    def on_module_end(self, module: nn.Module, output: Any) -> None:
        call = self._stack.pop()
        if module is self.rec.model and not self._stack:
            self.rec.output = output
        outs = [t for t in _tensors(output) if self.rec.depends(t) or t.is_floating_point()]
        self._note_writes(call, outs)
        outs = outs + [self.writes.resolve(call.template.inputs[k]) for k in call.extra_inputs]
        layouts = []
        for t in outs:
            lay = self.rec.overrides.get(call.path, self.rec.layout_of(t))
            if call.mixes_tokens and lay is not None:
                lay = self._boundary_layout(call, t) or lay  # an MLP across tokens keeps its input layout
            elif lay is None:
                lay = self._boundary_layout(call, t)
                call.needs_collapse = lay is not None or call.needs_collapse
            layouts.append(lay)
            if self.rec.depends(t) or call.template.inputs:
                self._register(t, lay)
        call.outputs, call.out_layouts = outs, layouts
        call.last_op = len(self.rec.ops)
        if call is self._unit:
            self._unit = None
            if not call.template.inputs:
                return  # computed from parameters only (a position embedding): a constant, not an op
            count = self._module_counts.get(id(module), 0)
            self._module_counts[id(module)] = count + 1
            name = call.path if count == 0 else f"{call.path}#{count}"
            self._add_module_op(call, name, _kind_of_unit(call))

    def _note_writes(self, call: _Call, outs: list[torch.Tensor]) -> None:
        """Which of a module's inputs it wrote in place (those not returned become extra outputs of its
        op), and whether it wrote into any older tensor that is neither one of its inputs nor a base
        they are views of."""
        writes = self.writes
        if len(writes.log) == call.log_start:
            return
        inputs = call.template.inputs
        call.written_inputs = [k for k, t in enumerate(inputs) if writes.count(t) != call.in_writes[k]]
        call.extra_inputs = [
            k for k in call.written_inputs if not any(writes.resolve(inputs[k]) is o for o in outs)
        ]
        roots = set().union(*(writes.lineage(t) for t in inputs)) if inputs else set()
        call.writes_outside = any(
            r not in roots and self._birth.get(r, 0) <= call.tick for r in writes.log[call.log_start :]
        )
        if call.unit and call.writes_outside:
            raise NotImplementedError(
                f"module {call.path!r} ({type(call.module).__name__}) writes in place into a tensor that is "
                "neither one of its inputs nor made inside it; aliasscope records modules as functions of "
                "their inputs: pass that tensor as an argument, or return it"
            )

    def _boundary_layout(self, call: _Call, t: torch.Tensor) -> Layout | None:
        """An output layout from the module's input when the inside gave none: a module that keeps
        the shape keeps the layout; a map in, a map out (patch merging) keeps the roles; a (B, C)
        output is pooled features or logits. Only when every input layout is known."""
        if not call.in_layouts or any(lay is None for lay in call.in_layouts):
            return None
        lay, first = call.in_layouts[0], call.template.inputs[0]
        batch = self.rec.input.shape[0] if self.rec.input is not None else first.shape[0]
        if t.shape == first.shape:
            return lay
        if lay.kind in ("bchw", "bhwc") and t.dim() == 4 and t.shape[0] == batch:
            return lay
        if t.dim() == 2 and t.shape[0] == batch:
            return Layout(("b", "c"))
        if lay.kind == "tokens" and t.dim() == 3 and t.shape[0] == batch and t.shape[1] > lay.num_prefix:
            return _subsampled_tokens(lay.grid, t.shape[1], lay.num_prefix)
        return None

    def _add_module_op(self, call: _Call, name: str, kind: str) -> None:
        self.rec.ops.append(self.module_op(call, name, kind))

    def module_op(self, call: _Call, name: str, kind: str) -> OpRecord:
        """The op of a module call recorded whole (a unit, or a region collapsed after the forward)."""
        module, template = call.module, call.template
        written, extra = set(call.written_inputs), list(call.extra_inputs)

        def replay(*xs: torch.Tensor) -> Any:
            if written:  # the module writes into these inputs: give it copies, return what it wrote
                xs = tuple(x.clone() if k in written else x for k, x in enumerate(xs))
            args, kwargs = template.fill(xs)
            out = module(*args, **kwargs)
            return (out, *(xs[k] for k in extra)) if extra else out

        return self._op(
            name,
            kind,
            call.path,
            type(module).__name__,
            template.inputs,
            call.in_layouts,
            call.outputs,
            call.out_layouts,
            replay,
            affine=_is_eval_batchnorm(module),
            unit=module,
        )

    def _append(self, *args: Any, **kwargs: Any) -> None:
        self.rec.ops.append(self._op(*args, **kwargs))

    def _op(
        self,
        name,
        kind,
        module,
        op,
        inputs,
        in_layouts,
        outputs,
        out_layouts,
        replay,
        affine=False,
        unit=None,
        plain=False,
    ) -> OpRecord:
        outs = [(t, lay) for t, lay in zip(outputs, out_layouts, strict=True) if t.is_floating_point()]
        first = outs[0] if outs else (None, None)
        return OpRecord(
            index=len(self.rec.ops),
            name=name,
            kind=kind,
            module=module,
            op=op,
            layout=first[1],
            shape=tuple(first[0].shape) if first[0] is not None else (),
            in_layouts=list(in_layouts),
            inputs=list(inputs),
            outputs=[t for t, _ in outs],
            out_layouts=[lay for _, lay in outs],
            replay=replay,
            pointwise_affine=affine,
            unit=unit,
            replay_args_plain=plain,
        )

    def on_call(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if func_name(func) in _FACTORIES:
            return  # shaped like an activation, but its values do not depend on the image
        template = _Template(args, kwargs, self.rec.depends)
        if not template.inputs:
            return
        outs = _tensors(out)
        if not outs:
            return
        name = func_name(func)
        in_layouts = [self.rec.layout_of(t) for t in template.inputs]
        all_inputs = template.tensors
        deps = [self.rec.depends(t) for t in all_inputs]
        lays = [self.rec.layout_of(t) for t in all_inputs]
        out_layouts = propagate(func, args, kwargs, all_inputs, lays, deps, outs)
        for t, lay in zip(outs, out_layouts, strict=True):
            self._register(t, lay)
        if self._unit is not None:
            self._unit.funcs.append(name)
            return
        path = self._stack[-1].path if self._stack else "(output)"
        kind = _kind_of_call(name, func, args, kwargs, all_inputs, deps, lays, outs, out_layouts, path)

        def replay(*xs: torch.Tensor) -> Any:
            a, k = template.fill(xs)
            return func(*a, **k)

        affine = name == "batch_norm" and not _arg_training(args, kwargs)
        # a + b / a - b of two activations, in that order and nothing else: its tangent is u_a +- u_b
        plain = (
            func in _PLAIN_BINARY
            and not kwargs
            and len(args) == 2
            and len(template.inputs) == 2
            and args[0] is template.inputs[0]
            and args[1] is template.inputs[1]
        )
        base = f"{path}.{name}" if path else name
        self._append(
            self._unique_name(base),
            kind,
            path,
            name,
            template.inputs,
            in_layouts,
            outs,
            out_layouts,
            replay,
            affine=affine,
            plain=plain,
        )

    # -- after the forward -----------------------------------------------------------------------
    def finish(self, output: Any) -> None:
        """Hand the final op list over: regions with unknown layouts collapsed into one op each
        (:func:`~aliasscope._recording.collapse.collapse`), then every op's producer links."""
        self.rec.output = output
        ops = collapse(self)
        if ops is not None:
            self.rec.ops = ops
        self._link_producers()

    def _link_producers(self) -> None:
        """``op.producers``: for each input, the ``(op, output)`` it is, in the final op list. A tensor
        several ops list as an output (an op returning its input) counts as the latest one's; an alias
        stands for the tensor it was made from."""
        made: dict[int, tuple[int, int]] = {}
        for i, op in enumerate(self.rec.ops):
            op.producers = [self._producer(t, made) for t in op.inputs]
            for k, t in enumerate(op.outputs):
                made[id(t)] = (i, k)

    def _producer(self, t: torch.Tensor, made: dict[int, tuple[int, int]]) -> tuple[int, int] | None:
        while id(t) not in made:
            parent = self._alias_parent.get(id(t))
            if parent is None:
                return None  # the model's input, or a tensor made outside any recorded op
            t = parent
        return made[id(t)]


class _RecordMode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.tracer._muted:
            return func(*args, **kwargs)
        return self.tracer.call(func, args, kwargs)
