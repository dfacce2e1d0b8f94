"""The collapse pass: after the forward, each region whose layouts are unknown (attention scores inside
Swin's windows, pixels folded into the batch by custom code) becomes one op, the smallest enclosing
module call whose inputs and outputs have known layouts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from .classify import _kind_of_collapsed

if TYPE_CHECKING:
    from .ops import OpRecord
    from .tracer import Tracer, _Call


def collapse(tracer: Tracer) -> list[OpRecord] | None:
    """The op list with the regions to collapse recorded whole, renumbered; None when there are none.
    Module-op names are counted on in ``tracer``."""
    ops, calls = tracer.rec.ops, tracer._calls
    bad_ops = [op for op in ops if _unknown(op)]
    collapse: dict[int, _Call] = {}
    for call in calls:
        if call.needs_collapse and not call.unit:
            collapse[id(call)] = call
    for op in bad_ops:
        call = _innermost_call(calls, op.index)
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
        return None
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
    counts = tracer._module_counts
    for call in chosen:
        new_ops.extend(ops[i : call.first_op])
        count = counts.get(id(call.module), 0)
        counts[id(call.module)] = count + 1
        name = call.path if count == 0 else f"{call.path}#{count}"
        kind = _kind_of_collapsed(call, ops[call.first_op : call.last_op])
        new_ops.append(tracer.module_op(call, name, kind))
        i = call.last_op
    new_ops.extend(ops[i:])
    for k, op in enumerate(new_ops):
        op.index = k
    return new_ops


def _innermost_call(calls: Sequence[_Call], op_index: int) -> _Call | None:
    best = None
    for call in calls:
        if call.first_op <= op_index < call.last_op and not call.unit:
            if best is None or call.first_op >= best.first_op and call.last_op <= best.last_op:
                best = call
    return best


def _ancestors(call: _Call) -> Iterator[_Call]:
    p = call.parent
    while p is not None:
        yield p
        p = p.parent


def _unknown(op: OpRecord) -> bool:
    return any(lay is None for lay in op.in_layouts) or any(lay is None for lay in op.out_layouts)
