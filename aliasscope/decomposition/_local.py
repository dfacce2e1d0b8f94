"""Local Lie derivatives: how much one op, on its own, breaks the symmetry.

For an op ``h_out = f(h_in)`` (several inputs or outputs alike),

    v = J_f(h_in) . D h_in - D h_out

with ``D`` the generator in each tensor's layout (0 on invariant tensors): zero exactly when the op
commutes with the transformation at first order. ``J_f . D h_in`` is one forward-mode jvp of the
op's replay, or a cheaper exact rule for the commonest ops (:func:`fast_tangent`); ops whose ``v``
vanishes identically are skipped (:func:`is_zero_by_construction`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._forward_mode import jvp
from ..capture import OpRecord, Recording, _tensors
from ..generators import apply_generator
from ..layouts import Layout
from ._forward import record_forward
from ._settings import Settings


class DCache:
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
        self.last_use = last_uses(ops, original)

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


def fast_tangent(op: OpRecord, us: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
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
    op: OpRecord, transform: str, generator: str, cache: DCache | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(J_f(h_in) . D h_in, D h_out)`` for each output of a recorded op (their difference is v)."""
    cache = cache or DCache(transform, generator)
    with torch.no_grad():
        tangents = tuple(cache.get(h, lay) for h, lay in zip(op.inputs, op.in_layouts, strict=True))
        fast = fast_tangent(op, tangents) if tangents else None
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
    op: OpRecord, transform: str, generator: str, cache: DCache | None = None
) -> list[torch.Tensor]:
    """``v = J_f(h_in) . D h_in - D h_out`` for each output of a recorded op."""
    return [j - d for j, d in local_terms(op, transform, generator, cache)]


def is_zero_by_construction(op: OpRecord) -> bool:
    """Ops whose local Lie derivative vanishes identically: pure layout changes, eval-mode BatchNorm
    (a per-channel affine map commutes with D, and D of its constant bias is 0)."""
    return op.exactly_equivariant or (op.pointwise_affine and all(lay == op.layout for lay in op.in_layouts))


def last_uses(
    ops: Sequence[OpRecord], key: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
) -> dict[int, int]:
    """Index of the last op reading each activation (``key`` maps an input alias to what it stands for)."""
    last: dict[int, int] = {}
    for j, op in enumerate(ops):
        for t in op.inputs:
            last[id(key(t))] = j
    return last


def recorded_local_lie_derivatives(
    model: nn.Module, images: torch.Tensor, settings: Settings, *, track_grad: bool
) -> tuple[Recording, torch.Tensor, dict[int, list[torch.Tensor]]]:
    """Record ``output(model(images))`` and compute every op's ``v_i`` (the whole-output methods).

    Returns the recording, the output ``F`` and ``{op index: [v per output]}`` for the ops not zero
    by construction. ``track_grad``: record with the autograd graph kept (the probe estimator
    backpropagates through it), else under ``no_grad``.
    """
    s = settings
    x = images.detach().clone().requires_grad_(track_grad)
    with torch.enable_grad() if x.requires_grad else torch.no_grad():
        rec, f = record_forward(model, x, s)
    ops = rec.ops
    vs: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        cache = DCache(s.transform, s.generator, ops)
        for i, op in enumerate(tqdm(ops, desc="local Lie derivatives", disable=not s.progress)):
            if not is_zero_by_construction(op):
                vs[i] = local_lie_derivative(op, s.transform, s.generator, cache)
            cache.release(i, op)
        del cache
    return rec, f, vs
