"""The probe estimator of the paper (``method="probe"``, ``target=None``): the norm of each op's
contribution vector from random projections of the output.

For Gaussian probes ``z ~ N(0, I)`` on the output, ``E_z (z^T J_{>i} v_i)^2 = ||J_{>i} v_i||^2``,
and ``z^T J_{>i} v_i = <J_{>i}^T z, v_i>`` needs only ``J_{>i}^T z`` at op i's output: ONE backward
per probe serves every op (each ``v_i`` computed once). A result reports
``sqrt(mean_z (z^T J_{>i} v_i)^2)`` over ``num_probes`` probes; estimates of norms do not add up to
the total, so there is no completeness check.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ._forward import bdot, whole_output_total
from ._local import recorded_local_lie_derivatives
from ._result import Attribution
from ._settings import Settings


def probe_attribution(model: nn.Module, images: torch.Tensor, settings: Settings) -> Attribution:
    """The probe estimate of every op's ``||J_{>i} v_i||`` for one batch (probes drawn from a
    generator seeded with ``settings.seed`` on the output's device)."""
    s = settings
    rec, f, vs = recorded_local_lie_derivatives(model, images, s, track_grad=True)
    ops, b, dev = rec.ops, images.shape[0], images.device
    total = whole_output_total(model, images, s)
    outs = [(i, k, h) for i, v_list in vs.items() for k, h in enumerate(ops[i].outputs[: len(v_list)])]
    need = [h for _, _, h in outs if h.requires_grad]
    gen = torch.Generator(device=f.device).manual_seed(s.seed)
    sq = torch.zeros(len(ops), b, dtype=torch.float64, device=dev)
    for _ in tqdm(range(s.num_probes), desc="probes", disable=not s.progress):
        z = torch.randn(f.shape, generator=gen, device=f.device, dtype=f.dtype)
        with torch.enable_grad():
            grads = torch.autograd.grad(f, need, grad_outputs=z, retain_graph=True, allow_unused=True)
        by_id = {id(h): gr for h, gr in zip(need, grads, strict=True)}
        with torch.no_grad():
            proj = torch.zeros(len(ops), b, dtype=torch.float64, device=dev)
            for i, k, h in outs:
                gr = by_id.get(id(h))
                if gr is not None:
                    proj[i] += bdot(gr, vs[i][k], ops[i].out_layouts[k]).double()
            sq += proj**2
    return Attribution(
        rec=rec,
        values=(sq / s.num_probes).sqrt().cpu(),
        total=total,
        summed=None,
        target="whole output",
        extra={"num_probes": s.num_probes},
        total_is_jvp=True,
    )
