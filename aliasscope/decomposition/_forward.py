"""What every method needs of the forward pass: the recorded forward, the end-to-end total, and
per-image inner products ``<a, b>`` of two activations of one layout.

A contribution ``c_i = <dT/dh_out_i, v_i>`` is such an inner product, summed over every dim but the
batch (for Swin windows folded into the batch: over the windows of each image too).
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import output_hint
from ..capture import Recording, record
from ..layouts import Layout
from ..lie import lie_derivative
from ._settings import Settings


def bdot(a: torch.Tensor, b: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Per-image inner product of two tensors of one layout (on CPU without an elementwise
    temporary; on a GPU as a product and a reduction, which is memory-bound and far faster there than
    a (1, N) x (N, 1) batched matmul)."""
    p = _batch_dim(layout)
    if layout.roles is not None and "bw" in layout.roles:  # windows folded into the batch, batch-major
        (gh, gw), (wh, ww) = layout.grid, layout.window
        windows = (gh // wh) * (gw // ww)
        a, b = a.unflatten(p, (-1, windows)), b.unflatten(p, (-1, windows))
    if a.is_cuda:
        return (a * b.to(a.dtype)).sum(dim=[d for d in range(a.dim()) if d != p])
    a2 = a.movedim(p, 0).reshape(a.shape[p], 1, -1)
    b2 = b.movedim(p, 0).reshape(b.shape[p], -1, 1)
    return torch.bmm(a2, b2.to(a2.dtype)).reshape(-1)


def _batch_dim(layout: Layout) -> int:
    roles = layout.roles
    if roles is not None and "bw" in roles:
        return roles.index("bw")
    return 0 if roles is None or "b" not in roles else roles.index("b")


def record_forward(
    model: nn.Module, x: torch.Tensor, settings: Settings, *, alias_inputs: bool = False
) -> tuple[Recording, torch.Tensor]:
    """Run ``output(model(x))`` while recording every op (``settings.layouts``, ``settings.units``);
    ``alias_inputs``: each op reads private aliases of its inputs (the scalar pass's one backward
    then gives ``J_i^T dT/dh_out_i`` per op). Returns the recording and the output ``F``."""
    head = settings.head
    with record(model, layouts=settings.layouts, units=settings.units, alias_inputs=alias_inputs) as rec:
        y = model(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(output_hint(y))
        f = head(y) if head is not None else y
    return rec, f


def whole_output_total(model: nn.Module, images: torch.Tensor, settings: Settings) -> torch.Tensor:
    """``L_X F`` of the whole output (B, *output) by an end-to-end forward-mode jvp of the model as
    written, in float64 on the CPU: the total of the whole-output methods."""
    s = settings
    return lie_derivative(model, images, s.transform, output=s.output, generator=s.generator).double().cpu()
