"""The exact scalar method: every op's contribution to ``L_X T`` from one forward and ONE backward.

For a scalar target ``T`` per image each op's contribution is the number

    c_i = <dT/dh_out_i, v_i> = sum_inputs <J_i^T dT/dh_out_i, D h_in> - <dT/dh_out_i, D h_out_i>.

While recording, every op gets private aliases (free views) of its inputs, so one backward pass
yields both ``dT/dh_out_i`` and ``J_i^T dT/dh_out_i`` for every op: the generator on each activation
and inner products give all contributions, no forward-mode pass at all. The same backward gives the
total independently of the ops, ``<dT/dx, D x> - <dT/dF, D F>`` (the second term for an image-like
output only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..capture import Recording
from ..layouts import Layout, infer_layout
from ._forward import bdot, record_forward
from ._local import DCache, is_zero_by_construction, local_terms
from ._result import Attribution
from ._settings import Settings
from ._targets import picker, target_values


@dataclass
class ScalarPass:
    """One exact scalar decomposition of one batch, before it is read back from the device.

    ``dots`` (terms, B) holds every inner product ``<dT/dh, D h>`` of the pass in one tensor (one
    device-to-host copy, and a fixed output for CUDA graph replay); term ``k`` adds ``signs[k]`` times
    its row to op ``rows[k]`` (-1: the end-to-end total).
    """

    rec: Recording
    dots: torch.Tensor
    rows: list[int]
    signs: list[float]
    maps: dict[str, torch.Tensor]
    target: str
    f: torch.Tensor | None = None  # the output (detached): picks the attributed scalar for the checks

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values (ops, B), total (B,))`` in float64 on the CPU, summed in float64."""
        d = self.dots.double().cpu()
        rows = torch.tensor(self.rows, dtype=torch.long)
        signed = d * torch.tensor(self.signs, dtype=torch.float64)[:, None]
        values = torch.zeros(len(self.rec.ops), d.shape[1], dtype=torch.float64)
        op_terms = rows >= 0
        values.index_add_(0, rows[op_terms], signed[op_terms])
        return values, signed[~op_terms].sum(0)


def scalar_pass(
    model: nn.Module, images: torch.Tensor, settings: Settings, *, check_target: bool = True
) -> ScalarPass:
    """Exact scalar contributions of every op from one recorded forward and ONE backward.

    c_i = <dT/dh_out, J D h_in - D h_out> = sum_in <J^T dT/dh_out, D h_in> - <dT/dh_out, D h_out>: every
    op sees private aliases of its inputs, so one backward gives ``J^T dT/dh_out`` per input. The
    total ``<dT/dx, D x>`` (minus ``<dT/df, D f>`` for an image-like output) comes from the same
    backward, independently of the ops. No host-device synchronisation once ``check_target`` is off.
    ``settings.target`` is this batch's target; ``keep_maps`` keeps ``dT/dh_out * v_i`` per op.
    """
    s = settings
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        rec, f = record_forward(model, x, s, alias_inputs=True)
        tvals, tdesc = target_values(f, s.target, check=check_target)
    f_layout = rec.layout_of(f) or infer_layout(f, model)
    ops = rec.ops
    active = [i for i, op in enumerate(ops) if not is_zero_by_construction(op)]
    wanted = [x, f, *(t for i in active for t in (*ops[i].inputs, *ops[i].outputs))]
    need = list({id(t): t for t in wanted if t.requires_grad}.values())
    with torch.enable_grad():
        grads = torch.autograd.grad(tvals.sum(), need, allow_unused=True)
    by_id = {id(t): gr for t, gr in zip(need, grads, strict=True) if gr is not None}
    dots: list[torch.Tensor] = []
    rows: list[int] = []
    signs: list[float] = []
    maps: dict[str, torch.Tensor] = {}

    def term(row: int, sign: float, h: torch.Tensor, lay: Layout, cache: DCache) -> None:
        gr = by_id.get(id(h))
        if gr is not None:  # no gradient reaches h: the term is 0
            dots.append(bdot(gr, cache.get(h, lay), lay))
            rows.append(row)
            signs.append(sign)

    with torch.no_grad():
        cache = DCache(s.transform, s.generator, ops, original=rec.original)
        term(-1, 1.0, x, rec.input_layout, cache)
        if f_layout.is_image_like:
            term(-1, -1.0, f, f_layout, cache)
        for i, op in enumerate(tqdm(ops, desc="local Lie derivatives", disable=not s.progress)):
            if not is_zero_by_construction(op):
                for h, lay in zip(op.inputs, op.in_layouts, strict=True):
                    term(i, 1.0, h, lay, cache)
                for h, lay in zip(op.outputs, op.out_layouts, strict=True):
                    term(i, -1.0, h, lay, cache)
                if s.keep_maps and op.outputs:
                    (j, d), *_ = local_terms(op, s.transform, s.generator, cache)
                    gr = by_id.get(id(op.outputs[0]))
                    maps[op.name] = torch.zeros_like(j) if gr is None else gr * (j - d)
            cache.release(i, op)
        del cache
        b = x.shape[0]
        stacked = torch.stack(dots) if dots else x.new_zeros((0, b))
    return ScalarPass(rec, stacked, rows, signs, maps, tdesc, f.detach())


def scalar_attribution(model: nn.Module, images: torch.Tensor, settings: Settings) -> Attribution:
    """The exact scalar decomposition of one batch (``settings.target`` not None)."""
    sp = scalar_pass(model, images, settings)
    values, total = sp.read()
    return Attribution(
        rec=sp.rec,
        values=values,
        total=total,
        summed=values.sum(0),
        target=sp.target,
        pick=picker(sp.f, settings.target),
        maps=sp.maps,
    )
