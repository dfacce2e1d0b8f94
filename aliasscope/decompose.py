"""Exact attribution of a Lie derivative to the ops of a network, by the chain rule.

Write the network as ops ``h_out = f_i(h_in)``. Each op's *local* Lie derivative is

    v_i = J_{f_i}(h_in) . (D h_in) - D h_out

(``D``: the generator in that tensor's layout, 0 on invariant tensors). Writing ``e_h = dh - D h``
for the equivariance error carried by an activation, ``e_out = v_i + J_{f_i} e_in``, and ``e = 0`` at
the input, so the total telescopes:

    L_X F(x) = sum_i J_{>i} . v_i

where ``J_{>i}`` is the Jacobian of the rest of the network with respect to op i's output. For a
scalar target ``T`` (a class logit or probability per image) each op's contribution is the number
``c_i = <dT/dh_out_i, v_i> = sum_inputs <J_i^T dT/dh_out_i, D h_in> - <dT/dh_out_i, D h_out_i>``. While
recording, every op gets private aliases (free views) of its inputs, so ONE backward pass yields both
``dT/dh_out_i`` and ``J_i^T dT/dh_out_i`` for every op: one forward, one backward and the generator on
each activation give all contributions, no forward-mode pass at all. The same backward gives the total
independently of the ops, as ``<dT/dx, D x> - <dT/dF, D F>``; a test checks the contributions against
the forward-mode route (``J_i D h_in`` by jvp) and against finite differences. ``completeness_error``
compares the total with the sum of contributions: zero to float precision when no computation between
input and output escaped the recording. The whole-output route (``target=None``) pushes every ``v_i``
forward by jvp instead, and there the check also covers each op's replay.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .borrow import borrowed, check_images
from .capture import KINDS, OpRecord, _tensors, record
from .checks import check_finite_output, check_model, names_nonfinite_images, output_hint, selected_ops
from .forward_mode import jvp
from .generators import apply_generator, get_generator
from .layouts import Layout, infer_layout, window_grid
from .lie import Output, _output_fn, finite_difference, lie_derivative
from .results import rows_to_csv, save_text, to_json_text
from .transforms import get_transform

__all__ = [
    "decompose",
    "Decomposition",
    "local_lie_derivative",
    "CHECKS",
    "TOLERANCES",
    "SelfCheckWarning",
]

Target = int | Sequence[int] | torch.Tensor | str | Callable[[torch.Tensor], torch.Tensor]

CHECKS: dict[str, str] = {
    "completeness": "||total - sum_i c_i|| / max(||total||, ||sum_i |c_i| ||): the ops account for the total",
    "total_vs_jvp": "||total - L_jvp|| / max(||total||, ||L_jvp||), L_jvp the Lie derivative of the same "
    "target by an independent forward-mode jvp of the model as written",
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


@dataclass
class Decomposition:
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
    maps:
        With ``keep_maps=True``: per op, the elementwise product ``dT/dh_out * v_i`` (shaped like the
        op's output), whose sum over non-batch dims is its value.
    """

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

    @property
    def passed(self) -> bool:
        """Whether every self-check ran and held (see :data:`CHECKS`); False when none ran."""
        return bool(self.checks) and all(
            math.isfinite(v) and v <= self.limit(k) for k, v in self.checks.items()
        )

    def limit(self, check: str) -> float:
        """The tolerance of one check: :attr:`tolerance`, at least :data:`FD_TOLERANCE` for finite
        differences (their own error is ~1e-8 to 1e-7 relative in float64)."""
        return max(self.tolerance, FD_TOLERANCE) if check == "total_vs_fd" else self.tolerance

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
            f"{self.completeness_error:.2e}; unattributed (mean) {self.unattributed.mean().item():+.3e}",
            "share by kind:",
        ]
        for kind, row in self.by_kind().items():
            lines.append(f"  {kind:<15} {100 * row['share']:6.2f}%  ({row['ops']} ops)")
        lines.append(f"top {k} ops:")
        for r in self.top(k):
            lines.append(f"  {100 * r['share']:6.2f}%  {r['mean']:+.3e}  {r['kind']:<13} {r['name']}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

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

    def to_csv(self, path: str | None = None) -> str:
        """:attr:`table` as CSV (written to ``path`` if given)."""
        return rows_to_csv(self.table, path)

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
            "checks": dict(self.checks),
            "tolerance": self.tolerance,
            "passed": self.passed,
            "by_kind": self.by_kind(),
            "ops": self.table,
            **self.extra,
        }

    def to_json(self, path: str | None = None) -> str:
        """:meth:`to_dict` as JSON (NaN written as null; written to ``path`` if given)."""
        return save_text(to_json_text(self.to_dict()), path)


def _worst(values: Sequence[float]) -> float:
    """The largest value, NaN if any is NaN (a check that did not run on a part did not run)."""
    return math.nan if any(not math.isfinite(v) for v in values) else max(values)


class _DCache:
    """``D h`` of each activation, computed once and dropped after its last use."""

    def __init__(
        self,
        transform: str,
        generator: str,
        ops: Sequence[OpRecord] = (),
        original: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ) -> None:
        self.transform, self.generator, self.original = transform, generator, original
        self.values: dict[int, torch.Tensor] = {}
        self.last_use = _last_uses(ops, original)

    def get(self, t: torch.Tensor, layout: Layout) -> torch.Tensor:
        t = self.original(t)
        d = self.values.get(id(t))
        if d is None:
            d = apply_generator(t.detach(), self.transform, self.generator, layout)
            self.values[id(t)] = d
        return d

    def release(self, op_index: int, op: OpRecord) -> None:
        for t in op.inputs:
            key = id(self.original(t))
            if self.last_use.get(key, -1) <= op_index:
                self.values.pop(key, None)


def _fast_tangent(op: OpRecord, us: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """``J u`` without a forward-mode pass for the commonest ops (same values, less overhead):
    plain conv/linear modules (the op on ``u`` without bias), ReLU/ReLU6/Hardtanh (``u`` masked
    where the input is inside the linear range) and sums of activations."""
    m = op.unit
    if m is not None and len(us) == 1:
        (u,), (h,) = us, op.inputs
        if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return m._conv_forward(u, m.weight, None)
        if type(m) is nn.Linear:
            return torch.nn.functional.linear(u, m.weight)
        if type(m) is nn.ReLU:
            return u * (h > 0)
        if type(m) in (nn.ReLU6, nn.Hardtanh):
            return u * ((h > m.min_val) & (h < m.max_val))
    if (
        m is None
        and op.op in ("add", "sub")
        and len(us) == 2
        and op.outputs[0].shape == us[0].shape == us[1].shape
    ):
        if op.replay_args_plain:
            return us[0] + us[1] if op.op == "add" else us[0] - us[1]
    return None


def local_terms(
    op: OpRecord, transform: str, generator: str, cache: _DCache | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(J_f(h_in) . D h_in, D h_out)`` for each output of a recorded op (their difference is v)."""
    cache = cache or _DCache(transform, generator)
    with torch.no_grad():
        tangents = tuple(cache.get(h, lay) for h, lay in zip(op.inputs, op.in_layouts, strict=True))
        fast = _fast_tangent(op, tangents) if tangents else None
        if fast is not None:
            flat = [fast]
        else:
            _, jout = jvp(op.replay, tuple(op.inputs), tangents)
            flat = [t for t in _tensors(jout) if t.is_floating_point()]
        if len(flat) != len(op.outputs):
            raise RuntimeError(
                f"op {op.name!r} gave {len(flat)} outputs on replay, {len(op.outputs)} when recorded"
            )
        return [(j, cache.get(h, lay)) for j, h, lay in zip(flat, op.outputs, op.out_layouts, strict=True)]


def local_lie_derivative(
    op: OpRecord, transform: str, generator: str, cache: _DCache | None = None
) -> list[torch.Tensor]:
    """``v = J_f(h_in) . D h_in - D h_out`` for each output of a recorded op."""
    return [j - d for j, d in local_terms(op, transform, generator, cache)]


def _bdot(a: torch.Tensor, b: torch.Tensor, layout: Layout) -> torch.Tensor:
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


def _is_zero_by_construction(op: OpRecord) -> bool:
    """Ops whose local Lie derivative vanishes identically: pure layout changes, eval-mode BatchNorm
    (a per-channel affine map commutes with D, and D of its constant bias is 0)."""
    return op.exactly_equivariant or (op.pointwise_affine and all(lay == op.layout for lay in op.in_layouts))


def _class_indices(target: Target, n: int, classes: int) -> torch.Tensor | None:
    """A class target as (n,) indices on the CPU, checked against ``classes``; None for "pred" or a
    callable (they need no per-batch input)."""
    if isinstance(target, str) or (callable(target) and not isinstance(target, torch.Tensor)):
        return None
    idx = torch.as_tensor(target)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(
            f"target must be an integer class index (or one per image), 'pred', None or a callable, got "
            f"{target!r} of dtype {idx.dtype}: a float or bool is not a class index"
        )
    idx = idx.long().cpu()
    idx = idx.expand(n) if idx.dim() == 0 else idx
    if idx.shape != (n,) or (idx < 0).any() or (idx >= classes).any():
        raise ValueError(f"target must be a class index in [0, {classes}) or one per image, got {target!r}")
    return idx


def _describe(idx: torch.Tensor) -> str:
    return str(int(idx[0])) if (idx == idx[0]).all() else "per-image classes"


def _picker(f: torch.Tensor, target: Target) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from the output to the attributed scalar per image, classes fixed as chosen on ``f``
    (``"pred"``: each image's top class here), for the independent checks of the total."""
    if callable(target) and not isinstance(target, torch.Tensor):
        return target
    if isinstance(target, str):
        idx = f.detach().argmax(1)
    elif isinstance(target, torch.Tensor) and target.dim() == 1 and target.device == f.device:
        idx = target
    else:
        idx = _class_indices(target, f.shape[0], f.shape[1]).to(f.device)
    return lambda out: out.gather(1, idx.to(out.device)[:, None])[:, 0]


def _target_values(f: torch.Tensor, target: Target, check: bool = True) -> tuple[torch.Tensor, str]:
    """The scalar per image that is attributed, and a description. ``check=False`` (a class-index
    tensor already validated on this output) runs no host-device synchronisation (CUDA graphs)."""
    if not check and isinstance(target, torch.Tensor):
        return f.gather(1, target[:, None])[:, 0], "per-image classes"
    if callable(target) and not isinstance(target, torch.Tensor):
        t = target(f)
        if not isinstance(t, torch.Tensor) or t.shape != (f.shape[0],):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            why = " (a reduction over the batch: reduce over the other dims only)" if got == () else ""
            raise ValueError(
                f"a target callable must return one scalar per image, a tensor of shape ({f.shape[0]},), "
                f"got {got}{why}; e.g. lambda f: f[:, 3] or lambda f: f.flatten(1).sum(1)"
            )
        return t, getattr(target, "__name__", "callable")
    if f.dim() != 2:
        raise ValueError(f"a class target needs (B, classes) outputs, got {tuple(f.shape)}; pass a callable")
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(f"unknown target {target!r}: use a class index, 'pred' or a callable")
        idx = f.detach().argmax(1)
        return f.gather(1, idx[:, None])[:, 0], "pred"
    idx = _class_indices(target, f.shape[0], f.shape[1])
    return f.gather(1, idx.to(f.device)[:, None])[:, 0], _describe(idx)


def _last_uses(
    ops: Sequence[OpRecord], key: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
) -> dict[int, int]:
    """Index of the last op reading each activation (``key`` maps an input alias to what it stands for)."""
    last: dict[int, int] = {}
    for j, op in enumerate(ops):
        for t in op.inputs:
            last[id(key(t))] = j
    return last


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


def _propagate(
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


def _auto_group_size(ops: Sequence[OpRecord], device: torch.device) -> int:
    """Ops pushed forward together: 8 on a CPU; on a GPU up to 32 (measured fastest on an H100 for
    resnet50 and vit_small at batch 32), as many as half the free memory holds at about six
    copies of the largest activation per op (tangents are freed after their last use)."""
    if device.type != "cuda":
        return 8
    largest = max((t.numel() * t.element_size() for op in ops for t in op.outputs), default=1)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(32, 0.5 * free // (6 * largest))))


def _record(model, x, head, layouts, units, alias_inputs=False):
    with record(model, layouts=layouts, units=units, alias_inputs=alias_inputs) as rec:
        y = model(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(output_hint(y))
        f = head(y) if head is not None else y
    return rec, f


@dataclass
class _ScalarPass:
    """One exact scalar decomposition of one batch, before it is read back from the device.

    ``dots`` (terms, B) holds every inner product ``<dT/dh, D h>`` of the pass in one tensor (one
    device-to-host copy, and a fixed output for CUDA graph replay); term ``k`` adds ``signs[k]`` times
    its row to op ``rows[k]`` (-1: the end-to-end total).
    """

    rec: Any
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


def _scalar_pass(
    model: nn.Module,
    images: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor] | None,
    target: Target,
    transform: str,
    generator: str,
    layouts: dict[str, Layout] | None,
    units: Sequence[str] | str,
    keep_maps: bool,
    progress: bool = False,
    check_target: bool = True,
) -> _ScalarPass:
    """Exact scalar contributions of every op from one recorded forward and ONE backward.

    c_i = <dT/dh_out, J D h_in - D h_out> = sum_in <J^T dT/dh_out, D h_in> - <dT/dh_out, D h_out>: every
    op sees private aliases of its inputs, so one backward gives ``J^T dT/dh_out`` per input. The
    total ``<dT/dx, D x>`` (minus ``<dT/df, D f>`` for an image-like output) comes from the same
    backward, independently of the ops. No host-device synchronisation once ``check_target`` is off.
    """
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        rec, f = _record(model, x, head, layouts, units, alias_inputs=True)
        tvals, tdesc = _target_values(f, target, check=check_target)
    f_layout = rec.layout_of(f) or infer_layout(f, model)
    ops = rec.ops
    active = [i for i, op in enumerate(ops) if not _is_zero_by_construction(op)]
    wanted = [x, f, *(t for i in active for t in (*ops[i].inputs, *ops[i].outputs))]
    need = list({id(t): t for t in wanted if t.requires_grad}.values())
    with torch.enable_grad():
        grads = torch.autograd.grad(tvals.sum(), need, allow_unused=True)
    by_id = {id(t): gr for t, gr in zip(need, grads, strict=True) if gr is not None}
    dots: list[torch.Tensor] = []
    rows: list[int] = []
    signs: list[float] = []
    maps: dict[str, torch.Tensor] = {}

    def term(row: int, sign: float, h: torch.Tensor, lay: Layout, cache: _DCache) -> None:
        gr = by_id.get(id(h))
        if gr is not None:  # no gradient reaches h: the term is 0
            dots.append(_bdot(gr, cache.get(h, lay), lay))
            rows.append(row)
            signs.append(sign)

    with torch.no_grad():
        cache = _DCache(transform, generator, ops, original=rec.original)
        term(-1, 1.0, x, rec.input_layout, cache)
        if f_layout.is_image_like:
            term(-1, -1.0, f, f_layout, cache)
        for i, op in enumerate(tqdm(ops, desc="local Lie derivatives", disable=not progress)):
            if not _is_zero_by_construction(op):
                for h, lay in zip(op.inputs, op.in_layouts, strict=True):
                    term(i, 1.0, h, lay, cache)
                for h, lay in zip(op.outputs, op.out_layouts, strict=True):
                    term(i, -1.0, h, lay, cache)
                if keep_maps and op.outputs:
                    (j, d), *_ = local_terms(op, transform, generator, cache)
                    gr = by_id.get(id(op.outputs[0]))
                    maps[op.name] = torch.zeros_like(j) if gr is None else gr * (j - d)
            cache.release(i, op)
        del cache
        b = x.shape[0]
        stacked = torch.stack(dots) if dots else x.new_zeros((0, b))
    return _ScalarPass(rec, stacked, rows, signs, maps, tdesc, f.detach())


def _use_cuda_graph(
    cuda_graph: bool | None, images: torch.Tensor, target: Target | None, method: str, batch_size: int
) -> bool:
    """Whether the batched scalar decomposition runs as a replayed CUDA graph (see ``decompose``)."""
    if cuda_graph is False:
        return False
    reasons = [
        why
        for bad, why in (
            (not images.is_cuda, "the images are not on a CUDA device"),
            (target is None or method != "exact", "only the exact scalar decomposition is graphed"),
            (images.shape[0] < 2 * batch_size, "fewer than two full batches of batch_size images"),
        )
        if bad
    ]
    if reasons and cuda_graph:
        raise ValueError(f"cuda_graph=True cannot apply: {'; '.join(reasons)}")
    return not reasons


def _decompose_graphed(
    model: nn.Module,
    images: torch.Tensor,
    transform: str,
    *,
    target: Target,
    per_image: bool,
    head: Callable[[torch.Tensor], torch.Tensor] | None,
    output: Output,
    generator: str,
    select: str | Sequence[str] | Callable[[OpRecord], bool] | None,
    layouts: dict[str, Layout] | None,
    units: Sequence[str] | str,
    keep_maps: bool,
    batch_size: int,
    progress: bool,
    verify: str | None,
) -> list[Decomposition]:
    """Exact scalar decompositions of every full batch by one captured CUDA graph (see
    ``decompose(cuda_graph=)``); an empty list when capture fails or its replay disagrees with the
    eager pass (the caller then decomposes eagerly). Each batch is checked eagerly (``verify``)."""
    bs = batch_size
    n_full = images.shape[0] // bs
    settings = {"transform": transform, "generator": generator, "output": output, "method": "exact"}

    def finish(sp: _ScalarPass, values: torch.Tensor, total: torch.Tensor, desc: str, maps, k: int):
        sl = slice(k * bs, (k + 1) * bs)
        batch_target = idx[sl].to(images.device) if idx is not None else target
        checks, tolerance = _self_checks(
            model, images[sl], transform, output=output, generator=generator, total=total,
            summed=values.sum(0), magnitude=values.abs().sum(0), pick=_picker(sp.f, batch_target),
            independent_total=False, verify=verify,
        )  # fmt: skip
        return _result(
            sp.rec, select, values, total, values.sum(0), vectors=None, estimator=False,
            keep_vectors=False, target=desc, maps=maps, extra={"cuda_graph": True}, checks=checks,
            tolerance=tolerance, **settings,
        )  # fmt: skip

    with borrowed(model):
        static_x = images[:bs].clone()
        side = torch.cuda.Stream(device=images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):  # warm-up (eager, every check) on a side stream, as capture needs
            first = target[:bs] if per_image else target
            eager = _scalar_pass(
                model, static_x, head, first, transform, generator, layouts, units, keep_maps
            )
            eager_values, eager_total = eager.read()
            classes = eager.rec.output.shape[-1] if isinstance(eager.rec.output, torch.Tensor) else 0
            idx = _class_indices(target, images.shape[0], classes)
            eager_maps = {k: v.clone() for k, v in eager.maps.items()}
            first_desc = eager.target
            del eager
        torch.cuda.current_stream(images.device).wait_stream(side)
        static_t = idx[:bs].to(images.device) if idx is not None else target
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static = _scalar_pass(
                    model, static_x, head, static_t, transform, generator, layouts, units, keep_maps,
                    check_target=idx is None,
                )  # fmt: skip
            graph.replay()
        except RuntimeError as err:
            warnings.warn(f"CUDA graph capture failed, decomposing eagerly: {err}", stacklevel=3)
            return []
        values, total = static.read()
        scale = max(eager_values.abs().max().item(), eager_total.abs().max().item(), 1e-30)
        if not (
            torch.allclose(values, eager_values, rtol=1e-4, atol=1e-6 * scale)
            and torch.allclose(total, eager_total, rtol=1e-4, atol=1e-6 * scale)
        ):
            warnings.warn(
                "the CUDA graph replay differs from the eager decomposition (does the model's graph "
                "depend on the data?); decomposing eagerly",
                stacklevel=3,
            )
            return []
        parts = [finish(static, eager_values, eager_total, first_desc, eager_maps if keep_maps else None, 0)]
        for k in tqdm(range(1, n_full), desc="batches (CUDA graph)", disable=not progress):
            sl = slice(k * bs, (k + 1) * bs)
            static_x.copy_(images[sl])
            if idx is not None:
                static_t.copy_(idx[sl].to(images.device))
            graph.replay()
            values, total = static.read()
            maps = {name: m.clone() for name, m in static.maps.items()} if keep_maps else None
            desc = _describe(idx[sl]) if idx is not None else first_desc
            parts.append(finish(static, values, total, desc, maps, k))
        del graph, static
    return parts


def _relative(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float | None = None) -> float:
    """``||a - b|| / max(||a||, ||b||, scale)`` in float64 (0 when all vanish)."""
    a, b = a.double().cpu(), b.double().cpu()
    den = max(a.norm().item(), b.norm().item(), float(scale) if scale is not None else 0.0)
    return 0.0 if den == 0 else (a - b).norm().item() / den


def _self_checks(
    model: nn.Module,
    images: torch.Tensor,
    transform: str,
    *,
    output: Output,
    generator: str,
    total: torch.Tensor,
    summed: torch.Tensor | None,
    magnitude: torch.Tensor | None,
    pick: Callable[[torch.Tensor], torch.Tensor] | None,
    independent_total: bool,
    verify: str | None,
) -> tuple[dict[str, float], float]:
    """The checks of one batch (see :data:`CHECKS`) and their tolerance.

    ``total`` came from the decomposition's own pass; ``independent_total`` says it already is an
    end-to-end jvp (the whole-output route), else one is computed here. ``pick`` maps the output to
    the attributed scalar (None: the whole output).
    """
    checks: dict[str, float] = {}
    tolerance = TOLERANCES.get(images.dtype, 1e-3)
    if summed is not None:
        scale = magnitude.double().norm().item() if magnitude is not None else None
        checks["completeness"] = _relative(total, summed, scale)
    if verify is None:
        return checks, tolerance

    def reference(net: nn.Module, x: torch.Tensor, how: str) -> torch.Tensor:
        head = _output_fn(output)
        if how == "jvp":
            whole = lie_derivative(net, x, transform, output=output, generator=generator)
        else:
            whole = finite_difference(net, x, transform, output=output, generator=generator)
        if pick is None:
            return whole
        with torch.no_grad():
            y = net(x)
            f = head(y) if head is not None else y
            _, lin = torch.func.jvp(pick, (f,), (whole.to(f.dtype),))  # dT/dF . L_X F
        return lin

    if not independent_total:
        checks["total_vs_jvp"] = _relative(total, reference(model, images, "jvp"))
    if verify == "fd":
        net64 = model if images.dtype == torch.float64 else copy.deepcopy(model).double()
        checks["total_vs_fd"] = _relative(total, reference(net64, images.double(), "fd"))
    return checks, tolerance


def _warn_failed(dec: Decomposition) -> None:
    if not dec.passed:
        warnings.warn(
            "decomposition failed its self-check, its numbers are not a finding: "
            + "; ".join(dec.failures()),
            SelfCheckWarning,
            stacklevel=3,
        )


@names_nonfinite_images
def decompose(
    model: nn.Module,
    images: torch.Tensor,
    transform: str,
    *,
    target: Target | None = "pred",
    output: Output = "logits",
    method: str = "exact",
    generator: str = "central",
    select: str | Sequence[str] | Callable[[OpRecord], bool] | None = None,
    layouts: dict[str, Layout] | None = None,
    units: Sequence[str] | str = (),
    keep_maps: bool = False,
    num_probes: int = 100,
    group_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    batch_size: int | None = None,
    cuda_graph: bool | None = None,
    verify: str | None = "jvp",
    _warn: bool = True,
) -> Decomposition:
    """Attribute the Lie derivative of ``output(model(x))`` to every op of the model.

    Parameters
    ----------
    model, images, transform, output, generator:
        As in :func:`aliasscope.lie.lie_derivative`.
    target:
        A scalar per image -- a class index (int, or one per image), ``"pred"`` (each image's top
        class, the default) or a callable mapping the (B, ...) output to (B,) -- gives signed exact
        contributions from one backward pass. ``None`` takes the whole output vector (the paper's
        setting with ``output="softmax"``): each op's contribution is the vector ``J_{>i} v_i``,
        reported as its L2 norm per image.
    method:
        ``"exact"`` (the chain rule above), or ``"probe"`` with ``target=None``: the paper's
        estimator ``mean_z (z^T J_{>i} v_i)^2`` over ``num_probes`` Gaussian probes ``z`` on the
        output, reported as its square root (each ``v_i`` computed once, one backward per probe).
    select:
        Which ops to list (glob patterns on names or kind names, or a predicate); the others are
        still computed and their sum is reported in ``unattributed``.
    layouts, units:
        Passed to :func:`aliasscope.capture.record`: layouts for custom models, modules to record
        whole (``units="paper"`` groups ops as the paper's layer-wise code does; its per-layer number
        is the square of ``values`` for ``target=None``).
    keep_maps:
        Scalar target: keep each op's elementwise contribution map ``dT/dh_out * v_i``. Vector
        target: keep the contribution vectors (num_ops, B, *output).
    num_probes, seed:
        For ``method="probe"``.
    group_size:
        Vector target: ops pushed forward together; memory grows with it, speed too (fewer passes).
        ``None``: 8 on CPU; on a GPU, as many as half the free memory holds at six copies of the
        largest activation per op (at most 32).
    progress:
        Show a tqdm bar over ops.
    batch_size:
        Decompose at most this many images at a time (every activation of a batch is kept alive) and
        join the parts (:meth:`Decomposition.concat`); ``None``: all at once. Per-image targets are
        split with the images.
    cuda_graph:
        Scalar target on a CUDA device, with ``batch_size``: record the first batch's whole
        decomposition (forward, backward, generators, inner products) as a CUDA graph and replay it
        for every further full batch, which removes the per-op Python and kernel-launch overhead
        (the dominant cost on a GPU at moderate batch sizes). The replay of the first batch is
        checked against its eager decomposition; if capture fails or they differ (a model whose
        graph depends on the data), it warns and decomposes eagerly. ``None`` (default): on when it
        applies (at least two full batches); ``False``: never. Holds one extra batch's activations.
    verify:
        The self-checks beyond completeness (:data:`CHECKS`, tolerances :data:`TOLERANCES`):
        ``"jvp"`` (default) compares the total with an independent forward-mode jvp of the model as
        written (about two more forward passes); ``"fd"`` adds float64 finite differences on a float64
        copy of the model (slow; meant for checking a model once); ``None`` only completeness. A failed
        check warns (:class:`SelfCheckWarning`) and :attr:`Decomposition.passed` is False.
    """
    get_transform(transform)
    get_generator(generator)
    if method not in ("exact", "probe"):
        raise ValueError(f"unknown method {method!r}; valid: 'exact', 'probe'")
    if method == "probe" and target is not None:
        raise ValueError("method='probe' estimates the norm of the whole output vector: use target=None")
    if verify not in ("jvp", "fd", None):
        raise ValueError(f"verify must be 'jvp', 'fd' or None, got {verify!r}")
    model = check_model(model)
    images = check_images(images, model)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
    if batch_size is not None and images.shape[0] > batch_size:
        one_d = isinstance(target, list | tuple) or (isinstance(target, torch.Tensor) and target.dim() == 1)
        per_image = one_d and len(target) == images.shape[0]
        graphed: list[Decomposition] = []
        if _use_cuda_graph(cuda_graph, images, target, method, batch_size):
            graphed = _decompose_graphed(
                model,
                images,
                transform,
                target=target,
                per_image=per_image,
                head=_output_fn(output),
                output=output,
                generator=generator,
                select=select,
                layouts=layouts,
                units=units,
                keep_maps=keep_maps,
                batch_size=batch_size,
                progress=progress,
                verify=verify,
            )
        done = len(graphed) * batch_size
        joined = Decomposition.concat(
            graphed
            + [
                decompose(
                    model,
                    images[i : i + batch_size],
                    transform,
                    target=target[i : i + batch_size] if per_image else target,
                    output=output,
                    method=method,
                    generator=generator,
                    select=select,
                    layouts=layouts,
                    units=units,
                    keep_maps=keep_maps,
                    num_probes=num_probes,
                    group_size=group_size,
                    seed=seed,
                    progress=progress,
                    cuda_graph=False,
                    verify=verify,
                    _warn=False,
                )
                for i in range(done, images.shape[0], batch_size)
            ]
        )
        _warn_failed(joined)
        return joined
    head = _output_fn(output)
    vector = target is None
    with borrowed(model):
        maps: dict[str, torch.Tensor] = {}
        extra: dict[str, Any] = {}
        if not vector:
            scalar = _scalar_pass(
                model, images, head, target, transform, generator, layouts, units, keep_maps, progress
            )
            rec, maps, tdesc, scalar_f = scalar.rec, scalar.maps, scalar.target, scalar.f
            values, total = scalar.read()
            summed = values.sum(0)
            del scalar
        else:
            x = images.detach().clone().requires_grad_(method == "probe")
            with torch.enable_grad() if x.requires_grad else torch.no_grad():
                rec, f = _record(model, x, head, layouts, units)
            tdesc = "whole output"
            ops = rec.ops
            vs: dict[int, list[torch.Tensor]] = {}
            with torch.no_grad():
                cache = _DCache(transform, generator, ops)
                for i, op in enumerate(tqdm(ops, desc="local Lie derivatives", disable=not progress)):
                    if not _is_zero_by_construction(op):
                        vs[i] = local_lie_derivative(op, transform, generator, cache)
                    cache.release(i, op)
                del cache
            b = x.shape[0]
            dev = x.device
        if vector and method == "exact":
            total = (
                lie_derivative(model, images, transform, output=output, generator=generator).double().cpu()
            )
            vectors = torch.zeros(len(ops), *total.shape, dtype=torch.float64, device=dev)
            order = sorted(vs)
            last_use = _last_uses(ops)
            size = group_size or _auto_group_size(ops, dev)
            groups = [order[k : k + size] for k in range(0, len(order), size)]
            with torch.no_grad():
                for group in tqdm(groups, desc="contribution vectors", disable=not progress):
                    prop = _propagate(ops, vs, group, f, last_use)
                    for k, i in enumerate(group):
                        vectors[i] = prop[k].double()
            vectors = vectors.cpu()
            values = vectors.flatten(2).norm(dim=2)
            summed = vectors.sum(0)
        elif vector:
            total = (
                lie_derivative(model, images, transform, output=output, generator=generator).double().cpu()
            )
            outs = [
                (i, k, h) for i, v_list in vs.items() for k, h in enumerate(ops[i].outputs[: len(v_list)])
            ]
            need = [h for _, _, h in outs if h.requires_grad]
            gen = torch.Generator(device=f.device).manual_seed(seed)
            sq = torch.zeros(len(ops), b, dtype=torch.float64, device=dev)
            for _ in tqdm(range(num_probes), desc="probes", disable=not progress):
                z = torch.randn(f.shape, generator=gen, device=f.device, dtype=f.dtype)
                with torch.enable_grad():
                    grads = torch.autograd.grad(f, need, grad_outputs=z, retain_graph=True, allow_unused=True)
                by_id = {id(h): gr for h, gr in zip(need, grads, strict=True)}
                with torch.no_grad():
                    proj = torch.zeros(len(ops), b, dtype=torch.float64, device=dev)
                    for i, k, h in outs:
                        gr = by_id.get(id(h))
                        if gr is not None:
                            proj[i] += _bdot(gr, vs[i][k], ops[i].out_layouts[k]).double()
                    sq += proj**2
            values = (sq / num_probes).sqrt().cpu()
            summed = None
            extra["num_probes"] = num_probes
    check_finite_output(model, images, rec.output)
    checks, tolerance = _self_checks(
        model,
        images,
        transform,
        output=output,
        generator=generator,
        total=total,
        summed=summed,
        magnitude=values.abs().sum(0) if summed is not None else None,
        pick=None if vector else _picker(scalar_f, target),
        independent_total=vector,
        verify=verify,
    )
    dec = _result(
        rec,
        select,
        values,
        total,
        summed,
        checks=checks,
        tolerance=tolerance,
        vectors=vectors if vector and method == "exact" else None,
        estimator=vector and method == "probe",
        keep_vectors=keep_maps,
        transform=transform,
        generator=generator,
        output=output,
        target=tdesc,
        method=method,
        maps=maps if keep_maps else None,
        extra=extra,
    )
    if _warn and method != "probe":  # an estimator has no check to run (passed stays False)
        _warn_failed(dec)
    return dec


def _result(
    rec: Any,
    select: str | Sequence[str] | Callable[[OpRecord], bool] | None,
    values: torch.Tensor,
    total: torch.Tensor,
    summed: torch.Tensor | None,
    *,
    vectors: torch.Tensor | None,
    estimator: bool,
    keep_vectors: bool,
    transform: str,
    generator: str,
    output: Output,
    target: str,
    method: str,
    maps: dict[str, torch.Tensor] | None,
    extra: dict[str, Any],
    checks: dict[str, float] | None = None,
    tolerance: float = math.nan,
) -> Decomposition:
    """The :class:`Decomposition` of one batch: the selected ops' rows, completeness and remainder."""
    ops = rec.ops
    if summed is not None:
        err = ((total - summed).norm() / total.norm().clamp_min(1e-300)).item()
    else:
        err = float("nan")  # an estimator of norms cannot be summed back to the total
    keep = selected_ops(ops, select)
    kept = values[keep]
    extra = dict(extra)
    if vectors is not None:
        unattributed = total - vectors[keep].sum(0)
        if keep_vectors:
            extra["vectors"] = vectors[keep]
    elif estimator:
        unattributed = torch.full_like(total, float("nan"))
    else:
        unattributed = total - kept.sum(0)
    names = [ops[i].name for i in keep]
    return Decomposition(
        names=names,
        kinds=[ops[i].kind for i in keep],
        layouts=[str(ops[i].layout) for i in keep],
        layout_objects=[ops[i].layout for i in keep],
        shapes=[ops[i].shape for i in keep],
        values=kept,
        total=total,
        unattributed=unattributed,
        completeness_error=err if math.isfinite(err) else float("nan"),
        transform=transform,
        generator=generator,
        output=output if isinstance(output, str) else "custom",
        target=target,
        maps={k: v for k, v in maps.items() if k in set(names)} if maps else None,
        extra={"method": method, "kinds_doc": {k: KINDS[k] for k in sorted(set(rec.kinds))}, **extra},
        checks=dict(checks or {}),
        tolerance=tolerance,
    )
