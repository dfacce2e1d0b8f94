"""The paper's own recipe for the end-to-end Lie derivative (Gruver et al. 2023), re-derived: the
reference that ``generator="paper"`` is checked against (tests, ``analyses/paper_reference_check.py``)
and timed against (``benchmarks/bench_lie.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._resampling import resample

__all__ = ["reference_lie_derivative"]


def reference_lie_derivative(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """``d/dt softmax(model(T_t x))`` at ``t = 0`` by the reference code's double-backward jvp trick
    through its float32 resampler: the model sees ``T_0 x`` (about 1e-6 px from ``x``), not ``x``."""
    t = torch.zeros((), requires_grad=True, device=x.device)
    with torch.enable_grad():
        y = F.softmax(model(resample(x, name, t, "paper")), dim=-1)
        v = torch.ones_like(y, requires_grad=True)
        (vjp,) = torch.autograd.grad(y, [t], [v], create_graph=True)
        (jv,) = torch.autograd.grad(vjp, [v], [torch.ones_like(vjp)])
    return jv
