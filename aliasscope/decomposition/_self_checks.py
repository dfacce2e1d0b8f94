"""The self-checks every result carries: the ops account for the total, the total is the truth.

``completeness`` compares the total with the sum of the contributions (zero to float precision when
no computation between input and output escaped the recording). ``total_vs_jvp`` compares the total,
which the exact scalar pass reads off its own backward, with ``dT/dF . L_X F`` from an independent
forward-mode jvp of the model as written; ``total_vs_fd`` with float64 finite differences. ``leak``
is the share booked on ops that contribute exactly 0 when every layout is known (a lost layout
mis-attributes, which completeness cannot see). A result that fails one warns
(:class:`SelfCheckWarning`): its numbers are not a finding.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._forward_mode import jvp  # torch.func.jvp, without torch's first-use jit.script warnings
from ..lie import finite_difference, lie_derivative
from ._settings import Settings

if TYPE_CHECKING:
    from ..capture import OpRecord
    from ._result import Attribution, Decomposition

CHECKS: dict[str, str] = {
    "completeness": "||total - sum_i c_i|| / max(||total||, ||sum_i |c_i| ||): the ops account for the total",
    "total_vs_jvp": "||total - L_jvp|| / max(||total||, ||L_jvp||), L_jvp the Lie derivative of the same "
    "target by an independent forward-mode jvp of the model as written",
    "leak": "share of sum_i |c_i| on data movement and residual adds, which contribute exactly 0 when "
    "every layout is known: above rounding, a layout was lost and some error is booked on the wrong op",
    "total_vs_fd": "||total - L_fd|| / max(||total||, ||L_fd||), L_fd by float64 finite differences "
    "(Richardson-extrapolated) of the model as written, on a float64 copy (verify='fd')",
}
"""The self-checks every :class:`Decomposition` carries, by name."""

TOLERANCES: dict[torch.dtype, float] = {torch.float64: 1e-7, torch.float32: 1e-3}
"""Largest value of every check that passes, by the dtype the decomposition ran in (float32 without
TF32: contributions of ~1e-7 relative rounding summed over hundreds of ops, and two independent
routes to the total; a wrong program is off by O(1))."""

FD_TOLERANCE = 1e-5
"""Smallest tolerance of the finite-difference check (``verify="fd"``)."""


class SelfCheckWarning(UserWarning):
    """A result failed one of its own checks: its numbers are not a finding."""


def _relative(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float | None = None) -> float:
    """``||a - b|| / max(||a||, ||b||, scale)`` in float64 (0 when all vanish)."""
    a, b = a.double().cpu(), b.double().cpu()
    den = max(a.norm().item(), b.norm().item(), float(scale) if scale is not None else 0.0)
    return 0.0 if den == 0 else (a - b).norm().item() / den


LEAK_KINDS = ("layout", "residual")
"""Kinds whose ops contribute exactly 0 when their inputs' layouts are known."""

LEAK_TOLERANCE = 1e-6
"""Smallest tolerance of the leak check (in float64 a leak-free net measures ~1e-16 to 1e-14)."""


def can_leak(op: OpRecord) -> bool:
    """Ops that contribute exactly 0 when every layout is known: data movement and residual adds,
    indexing excluded (a crop of the grid has a border of its own: its contribution is real)."""
    return op.kind in LEAK_KINDS and op.op not in ("getitem", "narrow")


def leak_share(att: Attribution) -> float:
    """``sum_(i that can leak) |c_i| / sum_i |c_i|`` over all recorded ops and images."""
    values = att.values.double().abs()
    mass = values.sum().item()
    rows = [i for i, op in enumerate(att.rec.ops) if can_leak(op)]
    return values[rows].sum().item() / mass if rows and mass > 0 else 0.0


def self_checks(
    model: nn.Module, images: torch.Tensor, settings: Settings, att: Attribution
) -> tuple[dict[str, float], float]:
    """The checks of one batch (see :data:`CHECKS`) and their tolerance.

    ``att.total`` came from the decomposition's own pass; ``att.total_is_jvp`` says it already is an
    end-to-end jvp (the whole-output route), else one is computed here (``verify``). ``att.pick``
    maps the output to the attributed scalar (None: the whole output).
    """
    s = settings
    checks: dict[str, float] = {}
    tolerance = TOLERANCES.get(images.dtype, 1e-3)
    if att.summed is not None:
        scale = att.values.abs().sum(0).double().norm().item()
        checks["completeness"] = _relative(att.total, att.summed, scale)
    if not att.estimator:
        checks["leak"] = leak_share(att)
    if s.verify is None:
        return checks, tolerance

    def reference(net: nn.Module, x: torch.Tensor, how: str) -> torch.Tensor:
        head = s.head
        if how == "jvp":
            whole = lie_derivative(net, x, s.transform, output=s.output, generator=s.generator)
        else:
            whole = finite_difference(net, x, s.transform, output=s.output, generator=s.generator)
        if att.pick is None:
            return whole
        with torch.no_grad():
            y = net(x)
            f = head(y) if head is not None else y
            _, lin = jvp(att.pick, f, whole.to(f.dtype))  # dT/dF . L_X F
        return lin

    if not att.total_is_jvp:
        checks["total_vs_jvp"] = _relative(att.total, reference(model, images, "jvp"))
    if s.verify == "fd":
        net64 = model if images.dtype == torch.float64 else copy.deepcopy(model).double()
        checks["total_vs_fd"] = _relative(att.total, reference(net64, images.double(), "fd"))
    return checks, tolerance


def warn_failed(dec: Decomposition) -> None:
    """Warn (:class:`SelfCheckWarning`) when ``dec`` failed a self-check. Called from ``decompose``
    itself (``stacklevel=3``: the frame above it, its ``names_nonfinite_images`` wrapper)."""
    if not dec.passed:
        warnings.warn(
            "decomposition failed its self-check, its numbers are not a finding: "
            + "; ".join(dec.failures()),
            SelfCheckWarning,
            stacklevel=3,
        )
