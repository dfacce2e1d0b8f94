"""The result of a decomposition: :class:`Decomposition`, and how one batch's numbers become one.

A method (:mod:`.scalar`, :mod:`.vector`, :mod:`.probe`) computes an :class:`Attribution` of every
recorded op; :func:`make_result` keeps the selected ops' rows and puts what the others contribute
into ``unattributed = total - sum_(selected i) c_i``, with the completeness error
``||total - sum_(all i) c_i|| / ||total||`` and, for totals that cancel (an exactly invariant net has
total 0 while its contributions do not), the same residual relative to
``max(||total||, || sum_i |c_i| ||)`` (:attr:`Decomposition.completeness_error_mass`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._checks import selected_ops
from ..capture import KINDS, Recording
from ..layouts import Layout, window_grid
from ..results import Result
from ._self_checks import CHECKS, FD_TOLERANCE, LEAK_TOLERANCE, can_leak
from ._settings import Settings


@dataclass
class Decomposition(Result):
    """Per-op contributions to the Lie derivative of a scalar target, with a completeness check.

    Attributes
    ----------
    names, kinds, layouts, shapes:
        Per op, in call order (see :mod:`aliasscope.capture`).
    values:
        (num_ops, B): the signed contribution ``<dT/dh_out, v_i>`` of each op, per image.
    total:
        (B,): the Lie derivative of the target, computed from the input and output alone.
    unattributed:
        (B,): ``total - values.sum(0)``: what the listed ops do not account for (ops left out by
        ``select``, and any error).
    completeness_error:
        ``||total - sum over all recorded ops|| / ||total||``: 0 to float precision when exact.
    residual_norm, mass_norm:
        ``||total - sum_i c_i||`` and ``|| sum_i |c_i| ||`` (norms over images, all recorded ops):
        :attr:`completeness_error_mass` is their ratio to ``max(||total||, mass_norm)``, meaningful
        when the total cancels; the summary shows both, the self-check tests the second.
    maps:
        With ``keep_maps=True``: per op, the elementwise product ``dT/dh_out * v_i`` (shaped like the
        op's output), whose sum over non-batch dims is its value.

    :meth:`plot` draws :func:`aliasscope._plots.plot_layer_attribution`.
    """

    default_figure = "plot_layer_attribution"

    names: list[str]
    kinds: list[str]
    layouts: list[str]
    shapes: list[tuple[int, ...]]
    values: torch.Tensor
    total: torch.Tensor
    unattributed: torch.Tensor
    completeness_error: float
    transform: str
    generator: str
    output: str
    target: str
    maps: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    layout_objects: list[Layout] = field(default_factory=list, repr=False)
    checks: dict[str, float] = field(default_factory=dict)
    tolerance: float = math.nan
    residual_norm: float = math.nan
    mass_norm: float = math.nan
    leak_ops: list[str] = field(default_factory=list, repr=False)

    @property
    def leak(self) -> float:
        """Share of ``sum_i |c_i|`` on ops that contribute exactly 0 when every layout is known
        (:attr:`leak_ops`: data movement other than indexing, and residual adds, ``D(a + b) = D a +
        D b``). Above rounding it means a layout was lost and some op's error is booked on the wrong op."""
        mass = self.values.abs().sum()
        if not mass > 0:
            return 0.0
        names = set(self.leak_ops)
        rows = [i for i, name in enumerate(self.names) if name in names]
        return (self.values[rows].abs().sum() / mass).item() if rows else 0.0

    @property
    def completeness_error_mass(self) -> float:
        """``||total - sum_i c_i|| / max(||total||, || sum_i |c_i| ||)`` (NaN for the probe estimator)."""
        scale = max(self.total.double().norm().item(), self.mass_norm)
        return self.residual_norm / scale if scale > 0 else (0.0 if self.residual_norm == 0 else math.inf)

    @property
    def passed(self) -> bool:
        """Whether every self-check ran and held (see :data:`CHECKS`); False when none ran."""
        return bool(self.checks) and all(
            math.isfinite(v) and v <= self.limit(k) for k, v in self.checks.items()
        )

    def limit(self, check: str) -> float:
        """The tolerance of one check: :attr:`tolerance`, at least :data:`FD_TOLERANCE` for finite
        differences (their own error is ~1e-8 to 1e-7 relative in float64)."""
        if check == "total_vs_fd":
            return max(self.tolerance, FD_TOLERANCE)
        return max(self.tolerance, LEAK_TOLERANCE) if check == "leak" else self.tolerance

    def failures(self) -> list[str]:
        """One line per failed self-check (empty when all passed)."""
        if not self.checks:
            return [f"{self.transform}: no self-check ran"]
        return [
            f"{self.transform}: {name} = {value:.2e} > tolerance {self.limit(name):.0e} ({CHECKS[name]})"
            for name, value in self.checks.items()
            if not (math.isfinite(value) and value <= self.limit(name))
        ]

    def spatial_map(self, name: str) -> torch.Tensor:
        """(B, H, W): the contribution map of op ``name`` (``keep_maps=True``) summed over channels, on
        the op's own grid (prefix tokens dropped; their part is in :attr:`values`, not in the map)."""
        if not self.maps or name not in self.maps:
            raise KeyError(
                f"no contribution map for {name!r}: decompose with keep_maps=True and a scalar target"
            )
        layout = self.layout_objects[self.names.index(name)] if self.layout_objects else None
        if layout is not None and layout.windowed:
            return window_grid(self.maps[name], layout).sum(1)
        if layout is None or layout.kind not in ("bchw", "bhwc", "tokens"):
            raise ValueError(f"op {name!r} has layout {layout}: no single image grid to map")
        return layout.to_bchw(self.maps[name])[0].sum(1)

    @property
    def num_ops(self) -> int:
        """Number of listed ops."""
        return len(self.names)

    def shares(self) -> torch.Tensor:
        """Per op, its share of the attribution: ``sum_images |c_i| / sum_ops sum_images |c|``."""
        mag = self.values.abs().sum(1)
        return mag / mag.sum().clamp_min(1e-300)

    @property
    def table(self) -> list[dict[str, Any]]:
        """One row per op: order, name, kind, layout, shape, mean over images, share."""
        shares = self.shares().tolist()
        means = self.values.mean(1).tolist()
        return [
            {
                "order": i,
                "name": n,
                "kind": k,
                "layout": lay,
                "shape": "x".join(map(str, s)),
                "mean": m,
                "share": sh,
            }
            for i, (n, k, lay, s, m, sh) in enumerate(
                zip(self.names, self.kinds, self.layouts, self.shapes, means, shares, strict=True)
            )
        ]

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Per op kind: summed signed contribution (mean over images), share, and op count."""
        shares = self.shares()
        out: dict[str, dict[str, float]] = {}
        for i, kind in enumerate(self.kinds):
            row = out.setdefault(kind, {"mean": 0.0, "share": 0.0, "ops": 0})
            row["mean"] += self.values[i].mean().item()
            row["share"] += shares[i].item()
            row["ops"] += 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["share"]))

    def top(self, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` ops with the largest share."""
        return sorted(self.table, key=lambda r: -r["share"])[:k]

    def summary(self, k: int = 10) -> str:
        """A text table: completeness, shares by kind and the top ``k`` ops."""
        checks = ", ".join(f"{k} {v:.1e}" for k, v in self.checks.items())
        verdict = (
            f"self-checks passed ({checks}; tolerance {self.tolerance:.0e})"
            if self.passed
            else "SELF-CHECK FAILED, these numbers are not a finding: " + "; ".join(self.failures())
        )
        lines = [
            verdict,
            f"Lie derivative decomposition: {self.transform}, {self.generator} generator, "
            f"target {self.target}, {self.values.shape[1]} images, {self.num_ops} ops",
            f"total (mean over images) {self.total.mean().item():+.4e}; completeness error "
            f"{self.completeness_error:.2e} of |total| ({self.completeness_error_mass:.2e} of sum |c_i|); "
            f"unattributed (mean) {self.unattributed.mean().item():+.3e}",
            "share by kind:",
        ]
        for kind, row in self.by_kind().items():
            lines.append(f"  {kind:<15} {100 * row['share']:6.2f}%  ({row['ops']} ops)")
        lines.append(f"top {k} ops:")
        for r in self.top(k):
            lines.append(f"  {100 * r['share']:6.2f}%  {r['mean']:+.3e}  {r['kind']:<13} {r['name']}")
        return "\n".join(lines)

    @staticmethod
    def concat(parts: Sequence[Decomposition]) -> Decomposition:
        """Join decompositions of the same model and settings over several image batches."""
        first = parts[0]
        if any(p.names != first.names for p in parts):
            raise ValueError(
                "cannot join decompositions with different ops (different models or image sizes)"
            )
        total = torch.cat([p.total for p in parts])
        summed_err = [p.completeness_error * p.total.norm().item() for p in parts]
        err = math.sqrt(sum(e * e for e in summed_err)) / max(total.norm().item(), 1e-300)
        return Decomposition(
            names=first.names,
            kinds=first.kinds,
            layouts=first.layouts,
            shapes=first.shapes,
            values=torch.cat([p.values for p in parts], dim=1),
            total=total,
            unattributed=torch.cat([p.unattributed for p in parts]),
            completeness_error=err,
            residual_norm=math.sqrt(sum(p.residual_norm**2 for p in parts)),
            mass_norm=math.sqrt(sum(p.mass_norm**2 for p in parts)),
            leak_ops=first.leak_ops,
            transform=first.transform,
            generator=first.generator,
            output=first.output,
            target=first.target,
            maps={k: torch.cat([p.maps[k] for p in parts]) for k in first.maps}
            if all(p.maps for p in parts)
            else None,
            extra=dict(first.extra),
            layout_objects=list(first.layout_objects),
            checks={k: _worst([p.checks.get(k, math.nan) for p in parts]) for k in first.checks},
            tolerance=first.tolerance,
        )

    def to_dict(self) -> dict[str, Any]:
        """Settings, checks, shares by kind and per-op rows as plain Python types."""
        return {
            "transform": self.transform,
            "generator": self.generator,
            "output": self.output,
            "target": self.target,
            "num_images": int(self.values.shape[1]),
            "num_ops": self.num_ops,
            "total": self.total.tolist(),
            "unattributed": self.unattributed.tolist(),
            "completeness_error": self.completeness_error,
            "completeness_error_mass": self.completeness_error_mass,
            "checks": dict(self.checks),
            "tolerance": self.tolerance,
            "passed": self.passed,
            "by_kind": self.by_kind(),
            "ops": self.table,
            **self.extra,
        }


def _worst(values: Sequence[float]) -> float:
    """The largest value, NaN if any is NaN (a check that did not run on a part did not run)."""
    return math.nan if any(not math.isfinite(v) for v in values) else max(values)


@dataclass
class Attribution:
    """One batch's numbers as a method computed them, for every recorded op (before ``select``).

    Attributes
    ----------
    rec:
        The recording (ops in call order; ``rec.output`` the model's output).
    values:
        (num_ops, B): per op, its contribution: ``c_i = <dT/dh_out_i, v_i>`` (scalar target), the L2
        norm of ``J_{>i} v_i`` (whole output), or the probe estimate of that norm.
    total:
        ``L_X T`` (B,) or ``L_X F`` (B, *output), from the input and output alone.
    summed:
        ``sum_i`` of the contributions, shaped like ``total``; None for the probe estimator (norms
        do not add up to the total).
    target:
        How the result names the target ("pred", a class, "per-image classes", "whole output", ...).
    pick:
        Output -> attributed scalar per image, classes fixed as in this batch, for the independent
        checks of the total; None: the whole output.
    maps, vectors:
        Scalar target: per op name, ``dT/dh_out * v_i`` (``keep_maps``). Whole output, exact: the
        vectors ``J_{>i} v_i`` (num_ops, B, *output).
    extra:
        Entries for :attr:`Decomposition.extra`.
    total_is_jvp:
        The total already is an end-to-end jvp (whole output): no separate jvp check.
    """

    rec: Recording
    values: torch.Tensor
    total: torch.Tensor
    summed: torch.Tensor | None
    target: str
    pick: Callable[[torch.Tensor], torch.Tensor] | None = None
    maps: dict[str, torch.Tensor] | None = None
    vectors: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    total_is_jvp: bool = False

    @property
    def estimator(self) -> bool:
        """Whether the values are estimates of norms, which cannot be summed back to the total."""
        return self.summed is None


def make_result(
    att: Attribution, settings: Settings, checks: dict[str, float], tolerance: float
) -> Decomposition:
    """The :class:`Decomposition` of one batch: the selected ops' rows, completeness and remainder."""
    s = settings
    ops = att.rec.ops
    if att.summed is not None:
        err = ((att.total - att.summed).norm() / att.total.norm().clamp_min(1e-300)).item()
        residual = (att.total - att.summed).double().norm().item()
        mass = att.values.abs().sum(0).double().norm().item()
    else:  # an estimator of norms cannot be summed back to the total
        err = residual = mass = float("nan")
    keep = selected_ops(ops, s.select)
    kept = att.values[keep]
    extra = dict(att.extra)
    if att.vectors is not None:
        unattributed = att.total - att.vectors[keep].sum(0)
        if s.keep_maps:
            extra["vectors"] = att.vectors[keep]
    elif att.estimator:
        unattributed = torch.full_like(att.total, float("nan"))
    else:
        unattributed = att.total - kept.sum(0)
    names = [ops[i].name for i in keep]
    maps = att.maps if s.keep_maps else None
    return Decomposition(
        names=names,
        kinds=[ops[i].kind for i in keep],
        layouts=[str(ops[i].layout) for i in keep],
        layout_objects=[ops[i].layout for i in keep],
        shapes=[ops[i].shape for i in keep],
        values=kept,
        total=att.total,
        unattributed=unattributed,
        completeness_error=err if math.isfinite(err) else float("nan"),
        residual_norm=residual,
        mass_norm=mass,
        leak_ops=[ops[i].name for i in keep if can_leak(ops[i])],
        transform=s.transform,
        generator=s.generator,
        output=s.output if isinstance(s.output, str) else "custom",
        target=att.target,
        maps={k: v for k, v in maps.items() if k in set(names)} if maps else None,
        extra={"method": s.method, "kinds_doc": {k: KINDS[k] for k in sorted(set(att.rec.kinds))}, **extra},
        checks=dict(checks or {}),
        tolerance=tolerance,
    )
