"""``decompose()``: validate, split into batches, pick the method, build the result, check, warn.

The maths lives with each step: :mod:`.local` (each op's local Lie derivative ``v_i``),
:mod:`.scalar` (exact ``c_i = <dT/dh_out_i, v_i>`` for a scalar target), :mod:`.vector` (exact
``J_{>i} v_i`` for the whole output), :mod:`.probe` (the paper's estimator of its norm),
:mod:`.cuda_graph` (batches replayed as one CUDA graph), :mod:`.self_checks` and :mod:`.result`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._batching import auto_batch_size
from .._borrow import borrowed, check_images
from .._checks import check_finite_output, check_model, names_nonfinite_images
from ..capture import OpRecord
from ..layouts import Layout
from ..lie import Output
from ._cuda_graph import decompose_graphed, use_cuda_graph
from ._probe import probe_attribution
from ._result import Attribution, Decomposition, make_result
from ._scalar import scalar_attribution
from ._self_checks import self_checks, warn_failed
from ._settings import Settings, Target
from ._targets import per_image
from ._vector import vector_attribution

__all__ = ["decompose"]


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
        join the parts (:meth:`Decomposition.concat`); ``None``: the device's automatic batch
        (:func:`aliasscope._batching.auto_batch_size`: 16 on the CPU, 64/32/16 on a GPU by its free
        memory). Per-image targets are split with the images.
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
    settings = Settings(
        transform,
        target=target,
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
        batch_size=batch_size,
        cuda_graph=cuda_graph,
        verify=verify,
    )
    model = check_model(model)
    images = check_images(images, model)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
    if batch_size is None:
        batch_size = auto_batch_size(images.device)
        settings = dataclasses.replace(settings, batch_size=batch_size)
    if images.shape[0] > batch_size:
        dec = decompose_in_batches(model, images, settings)
        warn_failed(dec)  # as ever, joined probe estimates too (they carry no check: they warn)
    else:
        dec = decompose_batch(model, images, settings)
        if method != "probe":  # an estimator has no check to run (passed stays False)
            warn_failed(dec)
    return dec


def decompose_in_batches(model: nn.Module, images: torch.Tensor, settings: Settings) -> Decomposition:
    """Every ``batch_size`` images decomposed on their own (the full batches by one replayed CUDA
    graph where :func:`~.cuda_graph.use_cuda_graph` says so), joined by :meth:`Decomposition.concat`.
    A per-image target is split with the images."""
    s = settings
    n, bs = images.shape[0], s.batch_size
    split = per_image(s.target, n)
    graphed = decompose_graphed(model, images, s) if use_cuda_graph(s, images) else []
    rest = [
        decompose_batch(model, images[i : i + bs], s.for_batch(s.target[i : i + bs] if split else s.target))
        for i in range(len(graphed) * bs, n, bs)
    ]
    return Decomposition.concat(graphed + rest)


def method_of(settings: Settings) -> Callable[[nn.Module, torch.Tensor, Settings], Attribution]:
    """The method that attributes one batch: exact scalar (a target), exact whole-output vectors
    (``target=None``) or the probe estimator (``method="probe"``)."""
    if not settings.vector:
        return scalar_attribution
    return vector_attribution if settings.method == "exact" else probe_attribution


def decompose_batch(model: nn.Module, images: torch.Tensor, settings: Settings) -> Decomposition:
    """One batch, eagerly: the method's numbers (model borrowed), a finite output, the self-checks
    (:func:`~.self_checks.self_checks`), the result (:func:`~.result.make_result`). No warning."""
    with borrowed(model):
        att = method_of(settings)(model, images, settings)
    check_finite_output(model, images, att.rec.output)
    checks, tolerance = self_checks(model, images, settings, att)
    return make_result(att, settings, checks, tolerance)
