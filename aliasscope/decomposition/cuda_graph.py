"""cuda_graph"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..borrow import borrowed
from ..capture import OpRecord
from ..layouts import Layout
from ..lie import Output
from .result import Decomposition, make_result
from .scalar import ScalarPass, scalar_pass
from .self_checks import self_checks
from .targets import Target, class_indices, describe, picker


def use_cuda_graph(
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


def decompose_graphed(
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

    def finish(sp: ScalarPass, values: torch.Tensor, total: torch.Tensor, desc: str, maps, k: int):
        sl = slice(k * bs, (k + 1) * bs)
        batch_target = idx[sl].to(images.device) if idx is not None else target
        checks, tolerance = self_checks(
            model, images[sl], transform, output=output, generator=generator, total=total,
            summed=values.sum(0), magnitude=values.abs().sum(0), pick=picker(sp.f, batch_target),
            independent_total=False, verify=verify,
        )  # fmt: skip
        return make_result(
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
            eager = scalar_pass(model, static_x, head, first, transform, generator, layouts, units, keep_maps)
            eager_values, eager_total = eager.read()
            classes = eager.rec.output.shape[-1] if isinstance(eager.rec.output, torch.Tensor) else 0
            idx = class_indices(target, images.shape[0], classes)
            eager_maps = {k: v.clone() for k, v in eager.maps.items()}
            first_desc = eager.target
            del eager
        torch.cuda.current_stream(images.device).wait_stream(side)
        static_t = idx[:bs].to(images.device) if idx is not None else target
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static = scalar_pass(
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
            desc = describe(idx[sl]) if idx is not None else first_desc
            parts.append(finish(static, values, total, desc, maps, k))
        del graph, static
    return parts
