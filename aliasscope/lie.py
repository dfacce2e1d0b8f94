"""End-to-end Lie derivatives of a model and the paper's equivariance metric.

``L_X F(x) = d/dt rho(-t) F(rho(t) x) |_{t=0} = J_F(x) . (D x) - D F(x)``, the second term only when
the output is image-like (feature maps, token grids); for invariant outputs (logits) rho acts on the
output as the identity. ``D x`` is computed once by the chosen generator, then pushed through the
model with one forward-mode Jacobian-vector product (:func:`aliasscope._forward_mode.jvp`); several
transforms share one pass (:mod:`aliasscope._lie_pass`: the primal once, the tangents together).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from ._borrow import borrowed, check_images
from ._checks import (
    check_finite_output,
    check_int,
    check_model,
    check_transforms,
    names_nonfinite_images,
    output_hint,
    raise_nonfinite,
)
from ._lie_pass import GraphedMetricPass, MetricPass, transforms_per_pass
from ._resampling import resample
from .generators import get_generator
from .layouts import Layout, infer_layout
from .results import Result
from .transforms import get_transform

__all__ = [
    "OUTPUTS",
    "lie_derivative",
    "finite_difference",
    "equivariance_metrics",
    "EquivarianceMetrics",
]

Output = str | Callable[[torch.Tensor], torch.Tensor]

OUTPUTS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "logits": None,
    "softmax": lambda y: F.softmax(y, dim=-1),
    "log_softmax": lambda y: F.log_softmax(y, dim=-1),
}
"""Named output heads applied after the model (``None``: the raw output)."""


def _output_fn(output: Output) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if callable(output):
        return _keeps_batch(output)
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; valid: {', '.join(OUTPUTS)} or a callable")
    return OUTPUTS[output]


def _keeps_batch(output: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``output=`` callable, checked to return a tensor with the batch dimension of its input."""

    def head(y: torch.Tensor) -> torch.Tensor:
        out = output(y)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"an output= callable must return a tensor, got {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != y.shape[0]:
            raise ValueError(
                f"an output= callable must keep the batch dimension: it maps the model's output "
                f"{tuple(y.shape)} to {tuple(out.shape)}; return one row per image (e.g. "
                "lambda y: y.softmax(-1) or y[:, :10]), not a reduction over the batch"
            )
        return out

    head.__name__ = getattr(output, "__name__", "output")
    return head


def _composed(model: nn.Module, output: Output) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> output(model(x))`` with clear errors for models that do not fit."""
    head = _output_fn(output)

    def fn(x: torch.Tensor) -> torch.Tensor:
        try:
            y = model(x)
        except NotImplementedError:
            raise
        except RuntimeError as err:
            raise ValueError(
                f"the model failed on images of shape {tuple(x.shape)} (is it an image model, and are "
                f"the images the size it expects?): {err}"
            ) from err
        if not isinstance(y, torch.Tensor):
            raise TypeError(output_hint(y))
        if head is None:
            return y
        if isinstance(output, str) and y.dim() != 2:
            raise ValueError(
                f"output={output!r} needs (B, classes) logits, but the model returned {tuple(y.shape)}"
            )
        return head(y)

    return fn


def _validate_names(transform: Any, generator: str) -> None:
    get_transform(transform)
    get_generator(generator)


def lie_derivative(
    model: nn.Module,
    images: torch.Tensor,
    transform: str | None = None,
    *,
    transforms: Sequence[str] | None = None,
    output: Output = "logits",
    generator: str = "central",
    output_layout: Layout | None = None,
) -> torch.Tensor:
    """The Lie derivative ``L_X F(x)`` of ``F = output(model(.))`` at each image.

    Parameters
    ----------
    model:
        Any image model; used in eval mode and given back unchanged (mode, hooks, weights).
    images:
        (B, C, H, W) float tensor, as the model takes it (normalised).
    transform:
        A name from :data:`aliasscope.transforms.TRANSFORMS`.
    transforms:
        Instead of ``transform``: several names, computed in one pass (the primal once, the
        tangents together: :func:`aliasscope._lie_pass.jvp_many`), the same values as one call each.
    output:
        ``"logits"`` (the raw output), ``"softmax"``, ``"log_softmax"`` or a callable on the output.
    generator:
        ``"central"`` (default), ``"paper"`` or ``"fourier"`` (see :mod:`aliasscope.generators`).
    output_layout:
        Layout of the output when it cannot be inferred (see :func:`aliasscope.layouts.infer_layout`).

    Returns
    -------
    torch.Tensor
        Shaped like the output: ``J_F(x) D x``, minus ``D F(x)`` when the output is image-like; with
        ``transforms``, (K, *output shape), one slice per transform in their order.
    """
    if (transform is None) == (transforms is None):
        raise TypeError("lie_derivative takes one transform, or transforms=[...]: not both, not neither")
    names = [transform] if transforms is None else check_transforms(transforms)
    for name in names:
        _validate_names(name, generator)
    model = check_model(model)
    images = check_images(images, model)
    fn = _composed(model, output)
    with borrowed(model), torch.no_grad():
        group = transforms_per_pass(images.device, images.shape[0], len(names))
        parts = []
        for j in range(0, len(names), group):
            step = MetricPass(
                fn, names[j : j + group], generator, lambda y: output_layout or infer_layout(y, model)
            )
            y, dy = step.lie(images)
            check_finite_output(model, images, y, _output_fn(output))
            parts.append(dy)
    return parts[0][0] if transforms is None else torch.cat(parts)


def _act(x: torch.Tensor, transform: str, t: float, generator: str, layout: Layout) -> torch.Tensor:
    """rho(t) on a tensor of any layout (identity on invariant tensors)."""
    if not layout.is_image_like:
        return x
    if not get_transform(transform).is_spatial:
        return x * (1 + t)
    img, prefix = layout.to_bchw(x)
    return layout.from_bchw(resample(img, transform, t, generator), prefix)


def default_eps(transform: str, images: torch.Tensor, extrapolate: bool = False) -> float:
    """Finite-difference step. float64: ~1e-4 pixel with Richardson extrapolation (its O(eps^2) error
    and rounding balance there: ~1e-9 relative), ~1e-6 pixel without (the bilinear interpolant's
    O(eps) cross term); float32: ~1e-2 pixel (rounding). Brightness: 1e-5 / 1e-7 / 1e-3.
    """
    double = images.dtype == torch.float64
    spatial = get_transform(transform).is_spatial
    if double and extrapolate:
        return 1.2e-4 / max(images.shape[-2:]) if spatial else 1e-5
    if not spatial:
        return 1e-7 if double else 1e-3
    return (2e-6 if double else 2e-2) / max(images.shape[-2:])


def finite_difference(
    model: nn.Module,
    images: torch.Tensor,
    transform: str,
    *,
    eps: float | None = None,
    output: Output = "logits",
    generator: str = "central",
    output_layout: Layout | None = None,
    extrapolate: bool | None = None,
) -> torch.Tensor:
    """Estimate the same derivative as :func:`lie_derivative` by really resampling at ``+-eps``.

    ``D(eps) = (G(eps) - G(-eps)) / (2 eps)`` with ``G(t) = rho(-t) F(rho(t) x)``, where rho is the
    resampler whose derivative ``generator`` is (:func:`aliasscope._resampling.resample`). The bilinear
    resampler moves a pixel by ``eps`` times its *forward* difference for ``t > 0`` and its backward
    difference for ``t < 0``, so through a nonlinear model ``D(eps) = L + c eps + O(eps^2)``.
    ``extrapolate`` (default: on in float64) removes the ``c eps`` term by Richardson extrapolation,
    ``2 D(eps / 2) - D(eps)`` (twice the cost): relative agreement with :func:`lie_derivative` then
    reaches ~1e-9 in float64. In float32 the step must stay large (rounding is ~1e-7 / eps), so the
    ``c eps`` term and the model's curvature remain: differences of several percent from the exact
    jvp on pretrained models are expected there and say nothing about the jvp. Use float64 models
    and images when this is meant as a check (``generator="paper"``'s float32 floor-based resampler
    is no smooth group action: its finite differences do not converge at any step).
    """
    _validate_names(transform, generator)
    model = check_model(model)
    images = check_images(images, model)
    extrapolate = images.dtype == torch.float64 if extrapolate is None else extrapolate
    eps = default_eps(transform, images, extrapolate) if eps is None else float(eps)
    fn = _composed(model, output)

    def central(step: float) -> torch.Tensor:
        plus = fn(resample(images, transform, step, generator))
        minus = fn(resample(images, transform, -step, generator))
        layout = output_layout or infer_layout(plus, model)
        plus = _act(plus, transform, -step, generator, layout)
        minus = _act(minus, transform, step, generator, layout)
        return (plus - minus) / (2 * step)

    with borrowed(model), torch.no_grad():
        coarse = central(eps)
        if not extrapolate:
            return coarse
        return 2 * central(eps / 2) - coarse


@dataclass
class EquivarianceMetrics(Result):
    """Per-image, per-transform equivariance errors: the paper's end-to-end number.

    ``values[i, j]`` is the mean over output entries (classes) of ``|L_X softmax(F(x_i))|`` for
    transform ``transforms[j]``. Intervals are BCa bootstrap intervals of the mean over images.
    :meth:`to_csv` writes the per-image values (:meth:`per_image`); :meth:`plot` draws
    :func:`aliasscope._plots.plot_transforms`.
    """

    default_figure = "plot_transforms"

    values: torch.Tensor
    transforms: list[str]
    generator: str
    output: str
    files: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _intervals: dict[tuple, dict[str, tuple[float, float, float]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def num_images(self) -> int:
        """Number of images."""
        return int(self.values.shape[0])

    def interval(self, level: float = 0.95) -> dict[str, tuple[float, float, float]]:
        """``{transform: (mean, low, high)}``: the mean over images and its bias-corrected accelerated
        (BCa) bootstrap interval (9,999 resamples, seeded: the same numbers every time). The values
        are means of absolute values, skewed and never negative: a t-interval went below 0 on a few
        images, the bootstrap interval stays inside the values' range."""
        key = (level, id(self.values), self.values._version, tuple(self.transforms))
        cached = self._intervals.get(key)
        if cached is not None:  # 9,999 resamples per transform: computed once per set of values
            return dict(cached)
        out = {}
        n = self.num_images
        for j, name in enumerate(self.transforms):
            v = self.values[:, j].double().numpy()
            mean = float(v.mean())
            if n < 2:
                out[name] = (mean, math.nan, math.nan)
            elif v.min() == v.max():
                out[name] = (mean, mean, mean)
            else:
                ci = stats.bootstrap(
                    (v,), np.mean, confidence_level=level, method="BCa", n_resamples=9999, random_state=0
                ).confidence_interval
                out[name] = (mean, float(ci.low), float(ci.high))
        self._intervals[key] = dict(out)
        return out

    @property
    def table(self) -> list[dict[str, Any]]:
        """One row per transform: mean, 95% interval, std, n."""
        rows = []
        for j, (name, (mean, lo, hi)) in enumerate(self.interval().items()):
            v = self.values[:, j].double()
            std = v.std(unbiased=True).item() if self.num_images > 1 else math.nan
            rows.append(
                {
                    "transform": name,
                    "mean": mean,
                    "ci95_low": lo,
                    "ci95_high": hi,
                    "std": std,
                    "n": self.num_images,
                }
            )
        return rows

    def summary(self) -> str:
        """A fixed-width text table of the per-transform means and 95% intervals."""
        head = f"{'transform':<18} {'mean':>10}   {'95% interval':<23}"
        lines = [
            f"Lie derivative |L_X {self.output}| ({self.generator} generator, {self.num_images} images)",
            head,
            "-" * len(head),
        ]
        for r in self.table:
            lines.append(
                f"{r['transform']:<18} {r['mean']:>10.3e}   [{r['ci95_low']:.3e}, {r['ci95_high']:.3e}]"
            )
        return "\n".join(lines)

    def per_image(self) -> list[dict[str, Any]]:
        """One row per image (``image``, ``file``, one column per transform): the rows of :meth:`to_csv`."""
        return [
            {
                "image": i,
                "file": self.files[i] if self.files else "",
                **{
                    name: f"{v:.9g}" for name, v in zip(self.transforms, self.values[i].tolist(), strict=True)
                },
            }
            for i in range(self.num_images)
        ]

    def csv_rows(self) -> list[dict[str, Any]]:
        """The rows of :meth:`to_csv`: per-image values (:meth:`per_image`), not :attr:`table`."""
        return self.per_image()

    def to_dict(self) -> dict[str, Any]:
        """Settings, per-transform summary and per-image values as plain Python types."""
        return {
            "generator": self.generator,
            "output": self.output,
            "num_images": self.num_images,
            "transforms": {
                r["transform"]: {k: v for k, v in r.items() if k != "transform"} for r in self.table
            },
            "per_image": {name: self.values[:, j].tolist() for j, name in enumerate(self.transforms)},
            "files": list(self.files) if self.files else None,
            **self.extra,
        }


@names_nonfinite_images
def equivariance_metrics(
    model: nn.Module,
    images: torch.Tensor | Any,
    transforms: Sequence[str] | None = None,
    *,
    generator: str = "central",
    output: str = "softmax",
    batch_size: int = 32,
    progress: bool = True,
    cuda_graph: bool | None = None,
) -> EquivarianceMetrics:
    """The paper's end-to-end metric: per image and transform, ``mean_classes |L_X softmax(F(x))|``.

    The transforms of a batch go through the model together (:func:`aliasscope._lie_pass.jvp_many`:
    the primal once, the K tangents together; all of them on a GPU, about 32 tangent rows a pass on
    the CPU: :func:`~aliasscope._lie_pass.transforms_per_pass`); on CUDA the pass is captured as a
    CUDA graph and replayed for every further full batch (checked against the eager pass first).
    Out of GPU memory, the transforms are split into smaller groups, then the batch is halved.

    Parameters
    ----------
    images:
        (B, C, H, W) tensor or an :class:`aliasscope.data.ImageBatch` (its file names are kept).
    transforms:
        Names to evaluate; default all of :data:`aliasscope.transforms.TRANSFORMS`.
    output:
        ``"softmax"`` as in the paper; ``"logits"``/``"log_softmax"`` also accepted.
    batch_size, progress:
        Images per pass, and whether to show a tqdm bar.
    cuda_graph:
        ``None`` (default): replay a CUDA graph when the images are on a CUDA device and there are at
        least two full batches; ``False``: always eager; ``True``: as None, but an error where it
        cannot apply. A capture that fails or disagrees with the eager pass warns and runs eagerly.
    """
    files = getattr(images, "files", None)
    images = getattr(images, "images", images)
    names = check_transforms(transforms)
    for name in names:
        _validate_names(name, generator)
    model = check_model(model)
    images = check_images(images, model)
    batch_size = check_int("batch_size", batch_size)
    n = images.shape[0]
    graphable = images.is_cuda and n >= 2 * batch_size
    if cuda_graph and not graphable:
        raise ValueError(
            "cuda_graph=True cannot apply: it needs images on a CUDA device and at least two full "
            f"batches of batch_size={batch_size} (got {n} images on {images.device})"
        )
    fn = _composed(model, output)
    values = torch.empty(n, len(names), dtype=torch.float64, device=images.device)
    finite: list[torch.Tensor] = []
    group, graphed = transforms_per_pass(images.device, batch_size, len(names)), None
    with (
        borrowed(model),
        torch.no_grad(),
        tqdm(total=n, desc="Lie derivatives", unit="image", disable=not progress) as bar,
    ):
        layout_of = _cached_layout(model)
        s = 0
        while s < n:
            chunk = images[s : s + batch_size]
            rows = slice(s, s + chunk.shape[0])
            try:
                if graphed is not None and chunk.shape[0] == batch_size:
                    parts = [(slice(None), *graphed(chunk))]
                elif graphable and cuda_graph is not False and group == len(names) and s == 0:
                    step = MetricPass(fn, names, generator, layout_of)
                    graphed, y, vals = GraphedMetricPass.capture(step, chunk)
                    parts = [(slice(None), y, vals)]
                else:
                    parts = []
                    for j in range(0, len(names), group):
                        columns = slice(j, j + group)
                        parts.append((columns, *MetricPass(fn, names[columns], generator, layout_of)(chunk)))
                for columns, y, vals in parts:  # before the next replay: the graph's buffers are reused
                    finite.append(torch.isfinite(y).all())
                    values[rows, columns] = vals
            except torch.OutOfMemoryError:
                if group == 1 and batch_size == 1:
                    raise
                graphed, graphable = None, False
                if group > 1:
                    group = (group + 1) // 2
                else:
                    batch_size //= 2
                torch.cuda.empty_cache()
                continue
            s += chunk.shape[0]
            bar.update(chunk.shape[0])
        del graphed
        if finite and not torch.stack(finite).all():  # the one host sync of the loop
            raise_nonfinite(model, images, _output_fn(output), batch_size)
    return EquivarianceMetrics(
        values.cpu(),
        names,
        generator,
        output if isinstance(output, str) else "custom",
        list(files) if files is not None else None,
    )


def _cached_layout(model: nn.Module) -> Callable[[torch.Tensor], Layout]:
    """The output's layout, inferred from the first output seen (shapes only: no host sync)."""
    seen: list[Layout] = []

    def layout_of(y: torch.Tensor) -> Layout:
        if not seen:
            seen.append(infer_layout(y, model))
        return seen[0]

    return layout_of
