"""Recording every op of a forward pass, in call order, with names, kinds and layouts.

``with record(model) as rec: model(x)`` runs the model under a
:class:`~torch.overrides.TorchFunctionMode` plus forward hooks on every module, and records:

* every call of a *leaf* module (no children) as one op, named by its module path;
* every torch call made by non-leaf code between them -- residual adds, position-embedding adds,
  functional activations, pooling/means, interpolation, token concatenation and slicing, reshapes,
  attention (``scaled_dot_product_attention``, ``q @ k^T``, softmax) -- named
  ``"<module path>.<function>"``;

each with ``#k`` appended for the k-th repeat of the same name. Every activation that depends on the
input gets a :class:`~aliasscope.layouts.Layout`, propagated call by call
(:mod:`aliasscope.layout_rules`). Where a layout cannot be known (attention scores inside Swin's
windows, pixels folded into the batch by custom code), the smallest enclosing module call whose inputs
and outputs have known layouts is recorded as one op instead. Ops on constants only (parameters,
buffers) are not ops: a parameter enters the analysis where it meets an activation (a position
embedding add is where the embedding breaks equivariance).

In-place writes (``ReLU(inplace=True)``, ``x += y``, ``x.mul_(g)``, ``x[i] = v``, ``out=``, writes
through views) are recorded in functional form (:mod:`aliasscope.mutation`): the new value is computed
into a new tensor, recorded as an op, and every later read of the written tensor -- or of a view
sharing its memory, or of the base a written view belongs to -- is redirected to its current value.
Recorded activations keep their values, and the recorded program computes exactly what the model
computes. A module that writes into its own inputs is replayed on copies, and its written inputs
become extra outputs of its op. The model's parameters and flags are never touched.

Op kinds (:data:`KINDS`): ``nonlinearity``, ``downsampling``, ``upsampling``, ``normalisation``,
``attention``, ``patch_embed``, ``position_embed``, ``pooling``, ``linear`` (stride-1 convs, linear
layers, per-channel scales), ``token_mixing`` (MLPs across tokens, as in MLP-Mixer), ``residual``
(sums of activations), ``layout`` (reshapes, permutes, slicing, concatenation, dropout in eval),
``block`` (a module recorded whole) and ``other``; each is a record of the registry
:mod:`aliasscope.kinds`, which also holds the function names that mean it.
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

from .checks import check_layouts, check_model, check_units
from .kinds import KINDS, get_kind, is_zero_kind, kind_of_function, precedence_order
from .layout_rules import func_name, propagate
from .layouts import BCHW, Layout
from .mutation import Functionalizer, as_mutation

__all__ = ["KINDS", "PAPER_UNITS", "OpRecord", "Recording", "record", "select_ops"]

_LAYOUT_OPS = get_kind("layout").functions
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
# pure data movement: the layout rules give results roles that make D commute with it (indexing
# excluded: reading out one grid token does not commute)
_MOVES = (_LAYOUT_OPS - {"getitem", "select"}) | {"Identity", "Dropout"}
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
# calls that capture reads from their arguments (strides, sizes, dims, inputs): their function name
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


PAPER_UNITS: tuple[str, ...] = (
    "Attention",
    "MixerBlock",
    "Affine",
    "SpatialGatingBlock",
    "PatchEmbed",
    "Mlp",
    "DropPath",
    "BlurPool2d",
    "GatherExcite",
    "EvoNormBatch2d",
    "BatchNorm2d",
    "BatchNorm1d",
    "LayerNorm",
    "GroupNorm",
    "SEModule",
    "SqueezeExcite",
    "MHSA",
    "GPSA",
)
"""The module classes the paper's layer-wise code treats as single layers (``units="paper"``), so
per-op numbers can be set beside its per-module ones (subclasses count: timm's ``BatchNormAct2d``
is a ``BatchNorm2d``, recorded with its activation)."""


@dataclass
class OpRecord:
    """One recorded op.

    Attributes
    ----------
    index, name, kind, module, op:
        Position in call order, stable name, kind (:data:`KINDS`), module path it ran in, and the
        function or module class it is.
    layout, shape:
        Layout and shape of its (first) output.
    in_layouts:
        Layouts of its inputs that depend on the image.
    """

    index: int
    name: str
    kind: str
    module: str
    op: str
    layout: Layout
    shape: tuple[int, ...]
    in_layouts: list[Layout]
    inputs: list[torch.Tensor] = field(repr=False, default_factory=list)
    outputs: list[torch.Tensor] = field(repr=False, default_factory=list)
    out_layouts: list[Layout] = field(repr=False, default_factory=list)
    replay: Callable[..., Any] | None = field(repr=False, default=None)
    pointwise_affine: bool = field(repr=False, default=False)
    unit: nn.Module | None = field(repr=False, default=None)
    replay_args_plain: bool = field(repr=False, default=False)

    @property
    def exactly_equivariant(self) -> bool:
        """True when its local Lie derivative is 0 by construction.

        Pure data movement (reshape, permute, concatenation, splitting, dropout in eval, identity)
        only relabels which dimension is which; the layout rules give the result the roles that make
        ``D`` commute with it. Indexing is excluded (reading out one grid token does not commute).
        An op between invariant tensors has ``D = 0`` on both sides. A map applied at every position
        alike -- a Linear over the channels of a token or channels-last grid, a 1x1 convolution
        with stride 1 and no padding -- commutes with ``D`` (``D`` acts per channel, and ``D`` of its
        bias, a constant over the grid, is 0). ``completeness_error`` still checks the claim: the total
        is computed independently.
        """
        if self.op in _MOVES:
            return True
        if self.in_layouts and not any(lay.is_image_like for lay in (*self.in_layouts, *self.out_layouts)):
            return True
        if _per_position_linear(self):
            return True
        return (
            is_zero_kind(self.kind)
            and all(lay == self.layout or not lay.is_image_like for lay in self.in_layouts)
            and self.op != "getitem"
        )


def _plain_module(module: nn.Module | None, cls: type) -> bool:
    return module is not None and isinstance(module, cls) and type(module).forward is cls.forward


def _per_position_linear(op: OpRecord) -> bool:
    """A Linear on the channel (last) dim of an image-like tensor, or a 1x1, stride-1, unpadded Conv2d,
    with its output in the input's layout: the same affine map at every grid position."""
    if len(op.inputs) != 1 or len(op.outputs) != 1 or op.in_layouts[0] != op.layout:
        return False
    lay = op.layout
    if lay is None or lay.roles is None or not lay.is_image_like:
        return False
    if _plain_module(op.unit, nn.Linear):
        return lay.roles[-1] == "c"
    if _plain_module(op.unit, nn.Conv2d):
        m = op.unit
        return (
            lay.roles == ("b", "c", "h", "w")
            and tuple(m.kernel_size) == (1, 1)
            and tuple(m.stride) == (1, 1)
            and m.padding in ((0, 0), "valid")
        )
    return False


def select_ops(
    ops: Sequence[OpRecord], select: str | Sequence[str] | Callable[[OpRecord], bool] | None
) -> list[int]:
    """Indices of ``ops`` matching ``select``: glob patterns on op names or kind names, a predicate on
    the :class:`OpRecord`, or None for all."""
    if select is None:
        return list(range(len(ops)))
    if callable(select):
        return [i for i, op in enumerate(ops) if select(op)]
    pats = [select] if isinstance(select, str) else list(select)
    return [
        i for i, op in enumerate(ops) if any(op.kind == p or fnmatch.fnmatchcase(op.name, p) for p in pats)
    ]


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


def _tensors(obj: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


class Recording:
    """What :func:`record` saw: the ops in call order, with their layouts and activations."""

    def __init__(
        self, model: nn.Module, input_layout: Layout, layouts: dict[str, Layout], units: Sequence[str]
    ):
        self.model = model
        self.input_layout = input_layout
        self.overrides = dict(layouts)
        self.unit_patterns = list(units)
        self.ops: list[OpRecord] = []
        self.input: torch.Tensor | None = None
        self.output: Any = None
        self._slots: dict[int, tuple[torch.Tensor, Layout | None]] = {}
        self._stack: list[_Call] = []
        self._unit: _Call | None = None
        self._calls: list[_Call] = []
        self._counts: dict[str, int] = {}
        self._module_counts: dict[int, int] = {}
        self._paths = {id(m): name for name, m in model.named_modules()}
        self.alias_inputs = False
        self.alias_of: dict[int, torch.Tensor] = {}
        self._muted = False
        # in-place writes run in functional form (recorded through _run); births of tensors tell
        # which writes a module made into tensors older than its call
        state = {id(t) for t in (*model.parameters(), *model.buffers())}
        self._call_aliases: set[int] = set()
        self.writes = Functionalizer(self._run, self.depends, state, canonical=self._behind_call_alias)
        self._birth: dict[int, int] = {}
        self._tick = 0

    # -- queries --------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Op names in call order."""
        return [op.name for op in self.ops]

    @property
    def kinds(self) -> list[str]:
        """Op kinds in call order."""
        return [op.kind for op in self.ops]

    def layout_of(self, t: torch.Tensor) -> Layout | None:
        """Layout of an activation seen during the recording (None: constant or unknown)."""
        slot = self._slots.get(id(t))
        return None if slot is None else slot[1]

    def depends(self, t: torch.Tensor) -> bool:
        """True for activations that depend on the recorded input."""
        return id(t) in self._slots

    def select(self, select: str | Sequence[str] | Callable[[OpRecord], bool] | None) -> list[int]:
        """Indices of ops matching ``select``: glob patterns on names or kind names, or a predicate."""
        return select_ops(self.ops, select)

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[OpRecord]:
        return iter(self.ops)

    def __repr__(self) -> str:
        return f"Recording({len(self.ops)} ops)"

    # -- bookkeeping used by the mode and hooks -------------------------------------------------
    def _register(self, t: torch.Tensor, layout: Layout | None) -> None:
        self._slots[id(t)] = (t, layout)

    # -- in-place writes in functional form ------------------------------------------------------
    def _exec(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run a torch call as it is (not seen by the mode: the caller records it)."""
        muted, self._muted = self._muted, True
        try:
            return func(*args, **kwargs)
        finally:
            self._muted = muted

    def _run(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run and record one call (with private input aliases when asked for)."""
        if self.alias_inputs and self._unit is None:
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
        return self.original(t) if id(t) in self._call_aliases else t

    def start(self, x: torch.Tensor) -> None:
        self.input = x
        self._register(x, self.input_layout)

    def original(self, t: torch.Tensor) -> torch.Tensor:
        """The activation a per-op input alias stands for (the tensor itself if not an alias)."""
        return self.alias_of.get(id(t), t)

    def alias_args(self, args: tuple, kwargs: dict, call: bool = False) -> tuple[tuple, dict]:
        """Give every image-dependent argument a private alias (a free view) for this call, so that
        one backward pass yields the gradient reaching each op through each of its inputs. Aliases
        for a torch call (``call=True``) are seen by that call alone; a module's are what its code
        holds."""
        leaves, spec = tree_flatten((args, kwargs))
        made: dict[int, torch.Tensor] = {}
        for k, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and self.depends(leaf) and leaf.requires_grad:
                if id(leaf) not in made:
                    self._muted = True
                    try:
                        alias = leaf.view_as(leaf)
                    finally:
                        self._muted = False
                    self._register(alias, self.layout_of(leaf))
                    self.alias_of[id(alias)] = self.original(leaf)
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
        if any(fnmatch.fnmatchcase(path, p) or p in classes for p in self.unit_patterns):
            return True
        return next(module.children(), None) is None

    def on_module_start(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        path = self._paths.get(id(module), type(module).__name__)
        parent = self._stack[-1] if self._stack else None
        template = _Template(args, kwargs, self.depends)
        mixes = self._unit is None and self._mixes_tokens(module, template)
        unit = self._unit is None and (self._is_unit(module, path) or mixes)
        replaced = None
        if unit and self.alias_inputs and template.inputs:
            replaced = self.alias_args(args, kwargs)
            template = _Template(*replaced, self.depends)
        call = _Call(path, module, parent, template, unit, len(self.ops), mixes_tokens=mixes)
        call.in_layouts = [self.layout_of(t) for t in template.inputs]
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
        lay = self.layout_of(template.inputs[0])
        return lay is not None and lay.roles is not None and lay.roles[-1] == "n"

    def on_module_end(self, module: nn.Module, output: Any) -> None:
        call = self._stack.pop()
        if module is self.model and not self._stack:
            self.output = output
        outs = [t for t in _tensors(output) if self.depends(t) or t.is_floating_point()]
        self._note_writes(call, outs)
        outs = outs + [self.writes.resolve(call.template.inputs[k]) for k in call.extra_inputs]
        layouts = []
        for t in outs:
            lay = self.overrides.get(call.path, self.layout_of(t))
            if call.mixes_tokens and lay is not None:
                lay = self._boundary_layout(call, t) or lay  # an MLP across tokens keeps its input layout
            elif lay is None:
                lay = self._boundary_layout(call, t)
                call.needs_collapse = lay is not None or call.needs_collapse
            layouts.append(lay)
            if self.depends(t) or call.template.inputs:
                self._register(t, lay)
        call.outputs, call.out_layouts = outs, layouts
        call.last_op = len(self.ops)
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
        batch = self.input.shape[0] if self.input is not None else first.shape[0]
        if t.shape == first.shape:
            return lay
        if lay.kind in ("bchw", "bhwc") and t.dim() == 4 and t.shape[0] == batch:
            return lay
        if t.dim() == 2 and t.shape[0] == batch:
            return Layout(("b", "c"))
        return None

    def _add_module_op(self, call: _Call, name: str, kind: str) -> None:
        module, template = call.module, call.template
        written, extra = set(call.written_inputs), list(call.extra_inputs)

        def replay(*xs: torch.Tensor) -> Any:
            if written:  # the module writes into these inputs: give it copies, return what it wrote
                xs = tuple(x.clone() if k in written else x for k, x in enumerate(xs))
            args, kwargs = template.fill(xs)
            out = module(*args, **kwargs)
            return (out, *(xs[k] for k in extra)) if extra else out

        self._append(
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

    def _append(
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
    ) -> None:
        outs = [(t, lay) for t, lay in zip(outputs, out_layouts, strict=True) if t.is_floating_point()]
        first = outs[0] if outs else (None, None)
        self.ops.append(
            OpRecord(
                index=len(self.ops),
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
        )

    def on_call(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if func_name(func) in _FACTORIES:
            return  # shaped like an activation, but its values do not depend on the image
        template = _Template(args, kwargs, self.depends)
        if not template.inputs:
            return
        outs = _tensors(out)
        if not outs:
            return
        name = func_name(func)
        in_layouts = [self.layout_of(t) for t in template.inputs]
        all_inputs = template.tensors
        deps = [self.depends(t) for t in all_inputs]
        lays = [self.layout_of(t) for t in all_inputs]
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

    # -- after the forward: collapse regions whose layouts are unknown ---------------------------
    def finish(self, output: Any) -> None:
        self.output = output
        bad_ops = [op for op in self.ops if _unknown(op)]
        collapse: dict[int, _Call] = {}
        for call in self._calls:
            if call.needs_collapse and not call.unit:
                collapse[id(call)] = call
        for op in bad_ops:
            call = self._innermost_call(op.index)
            while call is not None and (
                any(lay is None for lay in call.in_layouts) or any(lay is None for lay in call.out_layouts)
            ):
                call = call.parent
            if call is None or call.parent is None:
                raise ValueError(
                    f"cannot infer the layout of the tensors of op {op.name!r} ({op.op}, output shape "
                    f"{op.shape}) nor of any module around it; pass layouts={{'<module path>': Layout(...)}} "
                    "for the module that produces it, or units=['<module path>'] to record a module whole"
                )
            collapse[id(call)] = call
        if not collapse:
            return
        # keep only outermost collapsed calls, then rebuild the op list
        chosen = [c for c in collapse.values() if not any(id(a) in collapse for a in _ancestors(c))]
        chosen.sort(key=lambda c: c.first_op)
        for call in chosen:
            if call.writes_outside:
                raise NotImplementedError(
                    f"module {call.path!r} must be recorded whole (its layouts are unknown), but it writes "
                    "in place into a tensor that is neither one of its inputs nor made inside it; pass "
                    "layouts={...} for its tensors so that its ops can be recorded one by one"
                )
        new_ops: list[OpRecord] = []
        i = 0
        for call in chosen:
            new_ops.extend(self.ops[i : call.first_op])
            count = self._module_counts.get(id(call.module), 0)
            self._module_counts[id(call.module)] = count + 1
            name = call.path if count == 0 else f"{call.path}#{count}"
            saved, self.ops = self.ops, new_ops
            self._add_module_op(call, name, _kind_of_collapsed(call, saved[call.first_op : call.last_op]))
            self.ops = saved
            i = call.last_op
        new_ops.extend(self.ops[i:])
        for k, op in enumerate(new_ops):
            op.index = k
        self.ops = new_ops

    def _innermost_call(self, op_index: int) -> _Call | None:
        best = None
        for call in self._calls:
            if call.first_op <= op_index < call.last_op and not call.unit:
                if best is None or call.first_op >= best.first_op and call.last_op <= best.last_op:
                    best = call
        return best


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


def _ancestors(call: _Call) -> Iterator[_Call]:
    p = call.parent
    while p is not None:
        yield p
        p = p.parent


def _unknown(op: OpRecord) -> bool:
    return any(lay is None for lay in op.in_layouts) or any(lay is None for lay in op.out_layouts)


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
    if "attn" in path.rsplit(".", 1)[-1] or "attention" in cls:
        return "attention"
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


class _RecordMode(TorchFunctionMode):
    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.rec._muted:
            return func(*args, **kwargs)
        return self.rec.call(func, args, kwargs)


@contextmanager
def record(
    model: nn.Module,
    *,
    input_layout: Layout = BCHW,
    layouts: dict[str, Layout] | None = None,
    units: Sequence[str] | str = (),
    alias_inputs: bool = False,
) -> Iterator[Recording]:
    """Record every op of the forward passes run inside the block.

    Parameters
    ----------
    model:
        The model; hooks are added to its modules for the block's duration and always removed.
    input_layout:
        Layout of the first tensor argument of the model's forward.
    layouts:
        Override the output layout of modules, by module path (for custom models whose layouts
        cannot be inferred).
    units:
        Module paths (glob patterns) or class names (subclasses included) to record as a single op
        each; ``"paper"`` uses :data:`PAPER_UNITS`, the reference code's layer list.
    alias_inputs:
        Give each op private views of its inputs (while recording with gradients), so that one
        backward pass gives the gradient reaching every op through every input: what
        :func:`aliasscope.decomposition.decompose` uses for exact scalar contributions.

    Examples
    --------
    >>> with record(model) as rec:            # doctest: +SKIP
    ...     model(x)
    >>> [(op.name, op.kind, str(op.layout)) for op in rec][:3]  # doctest: +SKIP
    """
    model = check_model(model, unwrap_compiled=False)
    if isinstance(units, str):
        if units != "paper":
            raise ValueError(f"units must be a list of module paths/class names or 'paper', got {units!r}")
        units = PAPER_UNITS
    else:
        check_units(model, units)
    check_layouts(model, layouts)
    rec = Recording(model, input_layout, layouts or {}, units)
    rec.alias_inputs = alias_inputs
    handles = []
    started = [False]

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if module is model and not started[0]:
            started[0] = True
            tensors = _tensors(args)
            if not tensors:
                raise ValueError("the model's forward got no tensor input to record")
            rec.start(tensors[0])
        given = (args, kwargs)
        resolved = rec.writes.resolve_all(given)  # inputs written in place earlier: their current values
        replaced = rec.on_module_start(module, *resolved)
        return replaced if replaced is not None or resolved is given else resolved

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if rec._stack and rec._stack[-1].module is module:
            current = rec.writes.resolve_all(output)  # a module may return a tensor it wrote in place
            rec.on_module_end(module, current)
            return None if current is output else current
        return None

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
    try:
        with _RecordMode(rec):
            yield rec
    finally:
        for h in handles:
            h.remove()
    if not started[0]:
        raise ValueError("nothing was recorded: call the model inside the `with record(model)` block")
    rec.finish(rec.output)
