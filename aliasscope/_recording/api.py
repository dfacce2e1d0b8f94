"""``record(model)``: the entry point of :mod:`aliasscope._recording` (see its docstring)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .._checks import check_layouts, check_model, check_units
from ..layouts import BCHW, Layout
from .ops import Recording
from .tracer import Tracer, _RecordMode

__all__ = ["PAPER_UNITS", "record"]

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
    rec = Recording(model, input_layout, layouts or {}, units, alias_inputs=alias_inputs)
    tracer = Tracer(rec)
    with tracer.hooked(), _RecordMode(tracer):
        yield rec
    if not tracer.started:
        raise ValueError("nothing was recorded: call the model inside the `with record(model)` block")
    tracer.finish(rec.output)
