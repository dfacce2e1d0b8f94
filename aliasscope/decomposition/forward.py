"""forward"""

from __future__ import annotations

import torch

from ..capture import record
from ..checks import output_hint
from ..layouts import Layout


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


def record_forward(model, x, head, layouts, units, alias_inputs=False):
    with record(model, layouts=layouts, units=units, alias_inputs=alias_inputs) as rec:
        y = model(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(output_hint(y))
        f = head(y) if head is not None else y
    return rec, f
