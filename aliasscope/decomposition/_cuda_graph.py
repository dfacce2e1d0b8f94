"""CUDA-graph replay of the exact scalar method over many batches (``decompose(cuda_graph=)``).

The first batch's whole scalar pass (forward, backward, generators, inner products) is captured as
one CUDA graph and replayed for every further full batch, which removes the per-op Python and
kernel-launch overhead. The numbers are those of :func:`~.scalar.scalar_pass` on each batch: the
graph's first replay is compared with an eager pass before it is trusted.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from .._borrow import borrowed
from ._result import Attribution, Decomposition, make_result
from ._scalar import ScalarPass, scalar_pass
from ._self_checks import self_checks
from ._settings import Settings
from ._targets import class_indices, describe, per_image, picker


def use_cuda_graph(settings: Settings, images: torch.Tensor) -> bool:
    """Whether the batched scalar decomposition runs as a replayed CUDA graph (see ``decompose``);
    ``cuda_graph=True`` where it cannot apply raises a ValueError naming why."""
    s = settings
    if s.cuda_graph is False:
        return False
    reasons = [
        why
        for bad, why in (
            (not images.is_cuda, "the images are not on a CUDA device"),
            (s.target is None or s.method != "exact", "only the exact scalar decomposition is graphed"),
            (images.shape[0] < 2 * s.batch_size, "fewer than two full batches of batch_size images"),
        )
        if bad
    ]
    if reasons and s.cuda_graph:
        raise ValueError(f"cuda_graph=True cannot apply: {'; '.join(reasons)}")
    return not reasons


def decompose_graphed(model: nn.Module, images: torch.Tensor, settings: Settings) -> list[Decomposition]:
    """Exact scalar decompositions of every full batch by one captured CUDA graph (see
    ``decompose(cuda_graph=)``); an empty list when capture fails or its replay disagrees with the
    eager pass (the caller then decomposes eagerly). Each batch is checked eagerly (``verify``).

    Its warnings point at the frame they pointed at before the split into a package (``stacklevel=4``
    above this function, ``decompose_in_batches`` and ``decompose``: the decorator's wrapper).
    """
    s = settings
    target = s.target
    bs = s.batch_size
    n_full = images.shape[0] // bs

    def finish(sp: ScalarPass, values: torch.Tensor, total: torch.Tensor, desc: str, maps, k: int):
        sl = slice(k * bs, (k + 1) * bs)
        batch_target = idx[sl].to(images.device) if idx is not None else target
        att = Attribution(
            rec=sp.rec, values=values, total=total, summed=values.sum(0), target=desc,
            pick=picker(sp.f, batch_target), maps=maps, extra={"cuda_graph": True},
        )  # fmt: skip
        checks, tolerance = self_checks(model, images[sl], s, att)
        return make_result(att, s, checks, tolerance)

    with borrowed(model):
        static_x = images[:bs].clone()
        side = torch.cuda.Stream(device=images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):  # warm-up (eager, every check) on a side stream, as capture needs
            first = target[:bs] if per_image(target, images.shape[0]) else target
            eager = scalar_pass(model, static_x, s.for_batch(first, progress=False))
            eager_values, eager_total = eager.read()
            classes = eager.rec.output.shape[-1] if isinstance(eager.rec.output, torch.Tensor) else 0
            idx = class_indices(target, images.shape[0], classes)
            eager_maps = {k: v.clone() for k, v in eager.maps.items()}
            first_desc = eager.target
            del eager
        torch.cuda.current_stream(images.device).wait_stream(side)
        static_t = idx[:bs].to(images.device) if idx is not None else target
        static_settings = s.for_batch(static_t, progress=False)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static = scalar_pass(model, static_x, static_settings, check_target=idx is None)
            graph.replay()
        except RuntimeError as err:
            warnings.warn(f"CUDA graph capture failed, decomposing eagerly: {err}", stacklevel=4)
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
                stacklevel=4,
            )
            return []
        parts = [
            finish(static, eager_values, eager_total, first_desc, eager_maps if s.keep_maps else None, 0)
        ]
        for k in tqdm(range(1, n_full), desc="batches (CUDA graph)", disable=not s.progress):
            sl = slice(k * bs, (k + 1) * bs)
            static_x.copy_(images[sl])
            if idx is not None:
                static_t.copy_(idx[sl].to(images.device))
            graph.replay()
            values, total = static.read()
            maps = {name: m.clone() for name, m in static.maps.items()} if s.keep_maps else None
            desc = describe(idx[sl]) if idx is not None else first_desc
            parts.append(finish(static, values, total, desc, maps, k))
        del graph, static
    return parts
