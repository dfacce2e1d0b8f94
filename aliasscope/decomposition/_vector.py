"""The exact whole-output method: every op's contribution vector ``J_{>i} v_i`` (``target=None``).

Writing ``e_h = dh - D h`` for the equivariance error an activation carries, ``e_out = v_i + J_i e_in``
and ``e = 0`` at the input, so the Lie derivative of the whole output telescopes:

    L_X F(x) = sum_i J_{>i} . v_i

with ``J_{>i}`` the Jacobian of the rest of the network with respect to op i's output. Each ``v_i``
is pushed forward by jvp through the ops after it (groups of ops at once, :func:`propagate`); a
result reports each vector's L2 norm per image, and completeness checks every op's replay too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._forward_mode import jvp
from ..capture import OpRecord, _tensors
from ._forward import whole_output_total
from ._local import last_uses, recorded_local_lie_derivatives
from ._result import Attribution
from ._settings import Settings


def _widen(t: torch.Tensor, start: int, lo: int, hi: int) -> torch.Tensor:
    """Tangent slots ``[start, start + len(t))`` as slots ``[lo, hi)`` (zeros where it has none)."""
    before, after = start - lo, hi - start - t.shape[0]
    if before == 0 and after == 0:
        return t
    parts = [t.new_zeros((before, *t.shape[1:]))] if before else []
    parts.append(t)
    if after:
        parts.append(t.new_zeros((after, *t.shape[1:])))
    return torch.cat(parts)


def propagate(
    ops: Sequence[OpRecord],
    vs: dict[int, list[torch.Tensor]],
    group: list[int],
    out: torch.Tensor,
    last_use: dict[int, int],
) -> torch.Tensor:
    """``J_{>i} v_i`` at the output for each op i in ``group`` (ascending): (len(group), *out.shape).

    The ops' local Lie derivatives are pushed forward together through the rest of the recorded
    graph, one forward-mode jvp per later op, vectorised over the group with ``torch.func.vmap``.
    Each tangent carries only the contiguous range of slots that can be non-zero there: op k's slot
    enters at op k, so early in the graph few slots travel (about half the work of carrying all).
    """
    g = len(group)
    slot = {i: k for k, i in enumerate(group)}
    tangents: dict[int, tuple[int, torch.Tensor]] = {}  # id -> (first slot, (slots, *shape))
    for j in range(min(group), len(ops)):
        op = ops[j]
        have = [tangents.get(id(t)) for t in op.inputs]
        new: list[torch.Tensor] | None = None
        lo = hi = 0
        if any(h is not None for h in have):
            lo = min(h[0] for h in have if h is not None)
            hi = max(h[0] + h[1].shape[0] for h in have if h is not None)
            tin = tuple(
                _widen(h[1], h[0], lo, hi) if h is not None else t.new_zeros((hi - lo, *t.shape))
                for t, h in zip(op.inputs, have, strict=True)
            )
            inputs = tuple(op.inputs)

            def push(
                *ts: torch.Tensor, _op: OpRecord = op, _inputs: tuple = inputs
            ) -> tuple[torch.Tensor, ...]:
                _, jout = jvp(_op.replay, _inputs, ts)
                return tuple(t for t in _tensors(jout) if t.is_floating_point())

            new = list(torch.func.vmap(push)(*tin))
        if j in slot:
            k = slot[j]
            if new is None:
                lo, hi, fresh = k, k + 1, True
                new = [h.new_zeros((1, *h.shape)) for h in op.outputs]
            else:
                wider = min(lo, k), max(hi, k + 1)
                fresh = wider != (lo, hi)  # widened: new tensors, safe to add into
                new = [_widen(t, lo, *wider) for t in new]
                lo, hi = wider
            for m, v in enumerate(vs.get(j, [])):
                if not fresh:  # the jvp may hand back an input's tangent (identity-like ops)
                    new[m] = new[m].clone()
                new[m][k - lo] += v
        for t in op.inputs:
            if last_use.get(id(t)) == j and t is not out:
                tangents.pop(id(t), None)
        if new is not None:
            for h, t in zip(op.outputs, new, strict=True):
                tangents[id(h)] = (lo, t)
    if id(out) not in tangents:
        return out.new_zeros((g, *out.shape))
    first, t = tangents[id(out)]
    return _widen(t, first, 0, g)


def auto_group_size(ops: Sequence[OpRecord], device: torch.device) -> int:
    """Ops pushed forward together: 8 on a CPU; on a GPU up to 32 (measured fastest on an H100 for
    resnet50 and vit_small at batch 32), as many as half the free memory holds at about six
    copies of the largest activation per op (tangents are freed after their last use)."""
    if device.type != "cuda":
        return 8
    largest = max((t.numel() * t.element_size() for op in ops for t in op.outputs), default=1)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(32, 0.5 * free // (6 * largest))))


def vector_attribution(model: nn.Module, images: torch.Tensor, settings: Settings) -> Attribution:
    """The exact whole-output decomposition of one batch: the vectors ``J_{>i} v_i`` (num_ops, B,
    *output) in float64, their norms as values, the total by an end-to-end jvp."""
    s = settings
    rec, f, vs = recorded_local_lie_derivatives(model, images, s, track_grad=False)
    ops, dev = rec.ops, images.device
    total = whole_output_total(model, images, s)
    vectors = torch.zeros(len(ops), *total.shape, dtype=torch.float64, device=dev)
    order = sorted(vs)
    last_use = last_uses(ops)
    size = s.group_size or auto_group_size(ops, dev)
    groups = [order[k : k + size] for k in range(0, len(order), size)]
    with torch.no_grad():
        for group in tqdm(groups, desc="contribution vectors", disable=not s.progress):
            prop = propagate(ops, vs, group, f, last_use)
            for k, i in enumerate(group):
                vectors[i] = prop[k].double()
    vectors = vectors.cpu()
    return Attribution(
        rec=rec,
        values=vectors.flatten(2).norm(dim=2),
        total=total,
        summed=vectors.sum(0),
        target="whole output",
        vectors=vectors,
        total_is_jvp=True,
    )
