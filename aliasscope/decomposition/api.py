"""api"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..borrow import borrowed, check_images
from ..capture import OpRecord
from ..checks import check_finite_output, check_model, names_nonfinite_images
from ..generators import get_generator
from ..layouts import Layout
from ..lie import Output, _output_fn, lie_derivative
from ..transforms import get_transform
from .cuda_graph import decompose_graphed, use_cuda_graph
from .forward import bdot, record_forward
from .local import DCache, is_zero_by_construction, last_uses, local_lie_derivative
from .result import Decomposition, make_result
from .scalar import scalar_pass
from .self_checks import self_checks, warn_failed
from .targets import Target, picker
from .vector import auto_group_size, propagate


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
        if use_cuda_graph(cuda_graph, images, target, method, batch_size):
            graphed = decompose_graphed(
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
        warn_failed(joined)
        return joined
    head = _output_fn(output)
    vector = target is None
    with borrowed(model):
        maps: dict[str, torch.Tensor] = {}
        extra: dict[str, Any] = {}
        if not vector:
            scalar = scalar_pass(
                model, images, head, target, transform, generator, layouts, units, keep_maps, progress
            )
            rec, maps, tdesc, scalar_f = scalar.rec, scalar.maps, scalar.target, scalar.f
            values, total = scalar.read()
            summed = values.sum(0)
            del scalar
        else:
            x = images.detach().clone().requires_grad_(method == "probe")
            with torch.enable_grad() if x.requires_grad else torch.no_grad():
                rec, f = record_forward(model, x, head, layouts, units)
            tdesc = "whole output"
            ops = rec.ops
            vs: dict[int, list[torch.Tensor]] = {}
            with torch.no_grad():
                cache = DCache(transform, generator, ops)
                for i, op in enumerate(tqdm(ops, desc="local Lie derivatives", disable=not progress)):
                    if not is_zero_by_construction(op):
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
            last_use = last_uses(ops)
            size = group_size or auto_group_size(ops, dev)
            groups = [order[k : k + size] for k in range(0, len(order), size)]
            with torch.no_grad():
                for group in tqdm(groups, desc="contribution vectors", disable=not progress):
                    prop = propagate(ops, vs, group, f, last_use)
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
                            proj[i] += bdot(gr, vs[i][k], ops[i].out_layouts[k]).double()
                    sq += proj**2
            values = (sq / num_probes).sqrt().cpu()
            summed = None
            extra["num_probes"] = num_probes
    check_finite_output(model, images, rec.output)
    checks, tolerance = self_checks(
        model,
        images,
        transform,
        output=output,
        generator=generator,
        total=total,
        summed=summed,
        magnitude=values.abs().sum(0) if summed is not None else None,
        pick=None if vector else picker(scalar_f, target),
        independent_total=vector,
        verify=verify,
    )
    dec = make_result(
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
        warn_failed(dec)
    return dec
