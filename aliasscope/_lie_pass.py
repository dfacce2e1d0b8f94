"""Several transforms in one pass: the primal once, the K tangents through the network together.

``jvp_many(fn, x, T)`` returns ``(fn(x), [J_fn(x) T_k]_k)`` by :func:`torch.func.vmap` over the
tangent of one forward-mode jvp (:func:`aliasscope._forward_mode.jvp`). The primal is not batched,
so it is computed once; every tangent op runs on the K stacked tangents (convolutions and matmuls on
K * B rows, pointwise ops broadcasting ``f'(h)``): about ``1 + K`` forwards of arithmetic for K
transforms instead of ``2 K``, and one launch per op instead of K. The rules are those of K separate
jvps, so the result is the same to rounding (a test checks float64 agreement to 1e-12). Where vmap
has no batching rule for an op of the model it falls back to K separate jvps.

:class:`MetricPass` is the per-batch computation of :func:`aliasscope.lie.equivariance_metrics`
(generators, the K-tangent jvp, the output's own generator for image-like outputs, the mean of
``|L_X F|`` per image) with no host synchronisation, so that on CUDA it can be captured once as a
CUDA graph and replayed for every further batch of the same shape (:class:`GraphedMetricPass`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from ._forward_mode import jvp
from .generators import apply_generator
from .layouts import Layout

__all__ = ["jvp_many", "transforms_per_pass", "MetricPass", "GraphedMetricPass"]

CPU_ROWS = 32
"""Tangent rows (transforms x images) per pass on the CPU. Measured on 2 cores, lite0 at 16 images
of 224 px, 10 transforms, forwards per transform (two runs): 16 rows a pass 2.6-3.0, 32 rows
2.4-2.8, 64 rows 3.0-3.1, all 160 at once 3.9-4.2 (its activations outgrow the caches). On a GPU
every transform goes in one pass (more rows, fewer launches)."""


def transforms_per_pass(device: torch.device, batch: int, transforms: int) -> int:
    """How many transforms share one pass of ``batch`` images: all on a GPU, about
    :data:`CPU_ROWS` tangent rows on the CPU (at least one transform)."""
    if device.type == "cuda":
        return transforms
    return max(1, min(transforms, CPU_ROWS // max(batch, 1)))


def jvp_many(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tangents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(x), J_fn(x) . tangents[k] for every k)``: tangents (K, *x.shape) -> (K, *fn(x).shape).

    ``x`` is copied before the call (a model may write into its input). One vmapped jvp when vmap
    can batch every op of ``fn``, else K jvps (same values).
    """
    if tangents.shape[0] == 1:
        y, dy = jvp(fn, x.clone(), tangents[0])
        return y, dy[None]
    try:
        return torch.func.vmap(lambda t: jvp(fn, x.clone(), t), out_dims=(None, 0))(tangents)
    except torch.OutOfMemoryError:
        raise  # the caller splits the work
    except (RuntimeError, NotImplementedError, ValueError):
        pass  # an op with no batching rule (or a model error, which the loop raises again)
    outs = [jvp(fn, x.clone(), t) for t in tangents]
    return outs[0][0], torch.stack([d for _, d in outs])


class MetricPass:
    """``x -> (y, values)`` for one batch: ``values[i, k] = mean over entries |L_{X_k} F(x_i)|``.

    ``fn``: the model composed with its output head; ``layout_of``: the output's layout from the
    output (shapes only; for image-like outputs ``D F(x)`` is subtracted). No host synchronisation
    (CUDA-graph safe) as long as ``fn`` has none.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        transforms: Sequence[str],
        generator: str,
        layout_of: Callable[[torch.Tensor], Layout],
    ) -> None:
        self.fn, self.transforms, self.generator, self.layout_of = fn, list(transforms), generator, layout_of

    def lie(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F(x), L)``: L (K, *F(x).shape), ``L[k] = J_F(x) D_k x - D_k F(x)`` (the second term
        only for image-like outputs)."""
        tangents = torch.stack([apply_generator(x, t, self.generator) for t in self.transforms])
        y, dy = jvp_many(self.fn, x, tangents)
        layout = self.layout_of(y)
        if layout.is_image_like:
            dy = dy - torch.stack([apply_generator(y, t, self.generator, layout) for t in self.transforms])
        return y, dy

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, dy = self.lie(x)
        return y, dy.abs().flatten(2).mean(2).T


class GraphedMetricPass:
    """A :class:`MetricPass` captured as one CUDA graph for batches of one shape, replayed per batch.

    The capture runs after an eager pass on the first batch (on a side stream, as capture needs);
    the graph's replay of that batch must match the eager values (``rtol`` 1e-4 of the largest value)
    or :meth:`capture` returns None and the caller stays eager.
    """

    def __init__(self, first: torch.Tensor) -> None:
        self.static_x = first.clone()
        self.graph = torch.cuda.CUDAGraph()
        self.y: torch.Tensor
        self.values: torch.Tensor

    @classmethod
    def capture(
        cls, step: MetricPass, first: torch.Tensor
    ) -> tuple[GraphedMetricPass | None, torch.Tensor, torch.Tensor]:
        """``(graphed pass or None, eager output and values of first)``."""
        self = cls(first)
        side = torch.cuda.Stream(device=first.device)
        side.wait_stream(torch.cuda.current_stream(first.device))
        with torch.cuda.stream(side):  # warm-up: eager, and the reference the replay must match
            y, eager = step(self.static_x)
        torch.cuda.current_stream(first.device).wait_stream(side)
        try:
            with torch.cuda.graph(self.graph):
                self.y, self.values = step(self.static_x)
            self.graph.replay()
        except RuntimeError as err:
            warnings.warn(f"CUDA graph capture failed, running eagerly: {err}", stacklevel=3)
            return None, y, eager
        scale = max(eager.abs().max().item(), 1e-30)
        if not torch.allclose(self.values, eager, rtol=1e-4, atol=1e-6 * scale):
            warnings.warn(
                "the CUDA graph replay differs from the eager pass (does the model's graph depend on "
                "the data?); running eagerly",
                stacklevel=3,
            )
            return None, y, eager
        return self, y, eager

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay on ``x`` (same shape as the first batch); the outputs are the graph's own buffers."""
        self.static_x.copy_(x)
        self.graph.replay()
        return self.y, self.values
