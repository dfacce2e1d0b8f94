"""The recorded data: :class:`OpRecord` (one op) and :class:`Recording` (the ops of a forward pass and
the queries on them). Plain data: the tracer that fills them in keeps its state elsewhere."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..kinds import get_kind, is_zero_kind
from ..layouts import Layout, coarsens_grid

__all__ = ["OpRecord", "Recording", "select_ops"]

_LAYOUT_OPS = get_kind("layout").functions
# pure data movement: the layout rules give results roles that make D commute with it (indexing
# excluded: reading out one grid token does not commute)
_MOVES = (_LAYOUT_OPS - {"getitem", "select"}) | {"Identity", "Dropout"}


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
    producers:
        For each of ``inputs``, ``(op index, output index)`` of the op whose output it is (a private
        input alias stands for the activation it aliases), or None for the model's input and for
        tensors no recorded op produced.
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
    producers: list[tuple[int, int] | None] = field(repr=False, default_factory=list)

    @property
    def patchifies(self) -> bool:
        """True when its output lies on a grid of fewer positions than its input's: a patchify
        (space-to-depth, a patch's pixels become channels of one position, which aliases like a
        strided op) or a crop (whose new border does not commute with the generator's stencil)."""
        return bool(self.inputs and self.outputs) and coarsens_grid(
            self.in_layouts[0], self.inputs[0], self.out_layouts[0], self.outputs[0]
        )

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
            return not self.patchifies
        if self.in_layouts and not any(lay.is_image_like for lay in (*self.in_layouts, *self.out_layouts)):
            return True
        if _per_position_linear(self):
            return True
        return (
            is_zero_kind(self.kind)
            and all(lay == self.layout or not lay.is_image_like for lay in self.in_layouts)
            and self.op != "getitem"
            and not self.patchifies  # the same layout on a coarser grid (TResNet's SpaceToDepth unit)
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


def _tensors(obj: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


class Recording:
    """What :func:`~aliasscope.record` saw: the ops in call order, with their layouts and activations.

    Plain data, filled in by the tracer (:mod:`aliasscope._recording.tracer`) while the forward runs and
    final once the ``with`` block ends; the tracer's working state is not kept here.

    Attributes
    ----------
    model, input_layout, overrides, unit_patterns, alias_inputs:
        What was recorded and how (the arguments of :func:`~aliasscope.record`).
    ops:
        The :class:`OpRecord` list, in call order.
    input, output:
        The model's input (its first tensor argument) and output.
    activations:
        ``id(tensor) -> (tensor, layout)`` for every activation that depends on the input (layout
        None where unknown): what :meth:`layout_of` and :meth:`depends` answer from.
    alias_of:
        ``id(alias) -> activation`` for the private input aliases (``alias_inputs=True``).
    """

    __slots__ = (
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
    )

    def __init__(
        self,
        model: nn.Module,
        input_layout: Layout,
        layouts: dict[str, Layout],
        units: Sequence[str],
        alias_inputs: bool = False,
    ):
        self.model = model
        self.input_layout = input_layout
        self.overrides = dict(layouts)
        self.unit_patterns = list(units)
        self.alias_inputs = alias_inputs
        self.ops: list[OpRecord] = []
        self.input: torch.Tensor | None = None
        self.output: Any = None
        self.activations: dict[int, tuple[torch.Tensor, Layout | None]] = {}
        self.alias_of: dict[int, torch.Tensor] = {}

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
        slot = self.activations.get(id(t))
        return None if slot is None else slot[1]

    def depends(self, t: torch.Tensor) -> bool:
        """True for activations that depend on the recorded input."""
        return id(t) in self.activations

    def original(self, t: torch.Tensor) -> torch.Tensor:
        """The activation a per-op input alias stands for (the tensor itself if not an alias)."""
        return self.alias_of.get(id(t), t)

    def select(self, select: str | Sequence[str] | Callable[[OpRecord], bool] | None) -> list[int]:
        """Indices of ops matching ``select``: glob patterns on names or kind names, or a predicate."""
        return select_ops(self.ops, select)

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[OpRecord]:
        return iter(self.ops)

    def __repr__(self) -> str:
        return f"Recording({len(self.ops)} ops)"
