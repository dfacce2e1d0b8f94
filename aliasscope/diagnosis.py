"""The library call behind ``aliasscope diagnose``: :func:`diagnose` measures a model and returns a
:class:`Diagnosis` (metrics, per-transform decompositions, spectrum, their join, predictions,
self-checks, timings, settings and versions). The command line only parses arguments, loads the model
and images, calls :func:`diagnose` and writes files from the result.

The summary dict (``Diagnosis.to_dict()``) is the content of ``summary.json``; the report
(:mod:`aliasscope._report`) is a view of it.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from ._batching import auto_batch_size
from .decomposition import Decomposition, decompose
from .lie import EquivarianceMetrics, equivariance_metrics
from .results import Result
from .spectrum import Spectrum, alias_of
from .spectrum import spectral as _spectral_fn

__all__ = ["Diagnosis", "Join", "alias_join", "diagnose", "parse_target", "versions"]

ALIAS_FLOOR = 1e-9
"""Ops whose alias is at most this (rounding: eval BatchNorm, per-pixel linear maps) are not ranked by
the join: their share is 0 by construction and ranking them would only inflate the correlation."""


def versions() -> dict[str, str]:
    """The versions recorded with a run: aliasscope, torch, timm, python."""
    import timm

    return {
        "aliasscope": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def parse_target(text: str | int | None) -> int | str | None:
    """``'all'`` (or None) -> None (the whole softmax vector), ``'pred'`` -> ``'pred'``, a class index
    (int or digits) -> int."""
    if text is None or text == "all":
        return None
    if text == "pred" or isinstance(text, int):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--target must be 'pred', 'all' or a class index, got {text!r}") from None


def _isnum(v: float) -> bool:
    return v == v


@dataclass
class Join:
    """Per op, its alias energy joined with its share of the Lie derivative.

    ``rows``: one per op of the spectrum (its :attr:`Spectrum.table` row plus ``alias``: the pointwise
    alias ratio, else the stride alias; and ``lie_share``: the op's share averaged over the
    decomposed transforms, NaN for an op no decomposition has). ``pairs``: ``(lie_share, alias)`` of
    the ops that can alias (alias > :data:`ALIAS_FLOOR`, both defined), the ones ranked by the
    Spearman correlation ``spearman_rho`` (``p_value``; None with fewer than 3 ops)."""

    rows: list[dict[str, Any]]
    pairs: list[tuple[float, float]]
    spearman_rho: float | None
    p_value: float | None

    @property
    def ops(self) -> int:
        """Number of ops ranked."""
        return len(self.pairs)

    def ranked_rows(self) -> list[dict[str, Any]]:
        """The rows of the ops that are ranked (those in :attr:`pairs`), in op order."""
        return [r for r in self.rows if _ranked(r["alias"], r["lie_share"])]

    def to_dict(self) -> dict[str, Any]:
        """``{"ops", "spearman_rho", "p_value"}`` (summary.json's ``spectral.join``)."""
        return {"ops": self.ops, "spearman_rho": self.spearman_rho, "p_value": self.p_value}


def _ranked(alias: float, share: float) -> bool:
    return _isnum(alias) and _isnum(share) and alias > ALIAS_FLOOR


def alias_join(spectrum: Spectrum, decompositions: Mapping[str, Decomposition] | Decomposition) -> Join:
    """Join each op's alias energy (``spectrum``) with its share of the Lie derivative (mean over the
    ``decompositions``' transforms) and rank-correlate them over the ops that can alias: the one
    implementation used by ``aliasscope diagnose`` and ``analyses/alias_vs_lie.py``."""
    from scipy import stats

    if isinstance(decompositions, Decomposition):
        decompositions = {"": decompositions}
    shares: dict[str, list[float]] = {}
    for d in decompositions.values():
        for row in d.table:
            shares.setdefault(row["name"], []).append(float(row["share"]))
    rows, pairs = [], []
    for r in spectrum.table:
        name = r["name"]
        share = sum(shares[name]) / len(shares[name]) if name in shares else float("nan")
        alias = alias_of(r)
        rows.append({**r, "alias": alias, "lie_share": share})
        if _ranked(alias, share):
            pairs.append((share, alias))
    rho = p = None
    if len(pairs) >= 3:
        res = stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs])
        rho, p = float(res.statistic), float(res.pvalue)
    return Join(rows, pairs, rho, p)


def _predictions(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int
) -> tuple[float | None, dict[str, Any]]:
    """One forward pass over the images: top-1 accuracy (None when unlabelled) and, per image, the
    predicted class (the logits' argmax), its softmax probability and the label."""
    from ._borrow import borrowed
    from ._checks import check_labels
    from .comparison import top1 as top1_of

    classes: list[torch.Tensor] = []
    probs: list[torch.Tensor] = []
    with borrowed(model), torch.no_grad():  # eval mode, given back as it came
        for s in range(0, images.shape[0], batch_size):
            logits = model(images[s : s + batch_size])
            if s == 0 and labels is not None:  # bad labels fail before any other work
                width = logits.shape[-1] if isinstance(logits, torch.Tensor) else None
                labels = check_labels(labels, images.shape[0], width)
            idx = logits.argmax(-1)
            classes.append(idx)
            probs.append(logits.softmax(-1).gather(-1, idx[:, None])[:, 0].double())
    predicted = torch.cat(classes).cpu()
    top1 = None if labels is None else top1_of(predicted, labels)
    return top1, {
        "predicted_class": predicted.tolist(),
        "probability": torch.cat(probs).cpu().tolist(),
        "label": None if labels is None else labels.tolist(),
    }


def _checks(decs: Mapping[str, Decomposition]) -> dict[str, Any]:
    """The run's verdict: every self-check of every decomposition (see ``aliasscope.decompose.CHECKS``)."""
    failures = [line for d in decs.values() for line in d.failures()]
    ran = sorted({name for d in decs.values() for name in d.checks})
    return {"passed": not failures, "failures": failures, "ran": ran}


@dataclass
class Diagnosis(Result):
    """Everything ``aliasscope diagnose`` measures, as returned by :func:`diagnose`.

    ``metrics``: the end-to-end :class:`~aliasscope.lie.EquivarianceMetrics`; ``decompositions``: per
    layer transform, its :class:`~aliasscope.decompose.Decomposition` (empty without layerwise);
    ``spectrum`` and ``join`` (:class:`Join`: alias energy per op with its share and their rank
    correlation; None without spectral); ``top1`` (None when unlabelled) and ``predictions``;
    ``checks`` (the self-check verdict: ``passed``, ``failures``, ``ran``); ``timings`` (seconds per
    stage, ``total`` for the whole run); ``settings`` (what summary.json records: model, images,
    generator, ...); ``versions``. ``model``, ``images`` (on the measuring device), ``files`` and
    ``preprocess`` are kept for the figures. ``where`` is filled in by the where-in-the-image figures
    when they are drawn (which images they show) and then appears in :meth:`to_dict`; ``prepared``
    holds what a figure computed for its drawing (:mod:`aliasscope.figures`, ``Figure.prepare``).

    As a :class:`~aliasscope.results.Result`: :attr:`table` is :meth:`per_image_rows` (per_image.csv),
    :meth:`to_json` is summary.json without its provenance, :meth:`plot` the metrics' figure
    (:func:`aliasscope._plots.plot_transforms`; the CLI's other figures: :mod:`aliasscope.figures`).
    """

    default_figure = "plot_transforms"

    metrics: EquivarianceMetrics
    decompositions: dict[str, Decomposition]
    spectrum: Spectrum | None
    join: Join | None
    top1: float | None
    predictions: dict[str, Any]
    checks: dict[str, Any]
    settings: dict[str, Any]
    versions: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False)
    images: torch.Tensor | None = field(default=None, repr=False)
    files: list[str] | None = None
    preprocess: Any = field(default=None, repr=False)
    where: dict[str, Any] | None = None
    prepared: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_images(self) -> int:
        """Number of images measured."""
        return self.metrics.num_images

    @property
    def num_ops(self) -> int | None:
        """Number of ops of the decompositions (None without layerwise)."""
        return next(iter(self.decompositions.values())).num_ops if self.decompositions else None

    def layers_rows(self) -> list[dict[str, Any]]:
        """layers.csv: one row per transform x op."""
        return [{"transform": t, **r} for t, d in self.decompositions.items() for r in d.table]

    def spectral_rows(self) -> list[dict[str, Any]] | None:
        """spectral.csv: the join's rows (None without spectral)."""
        return None if self.join is None else self.join.rows

    @property
    def table(self) -> list[dict[str, Any]]:
        """:meth:`per_image_rows`: predictions and each transform's value, per image."""
        return self.per_image_rows()

    def plot(self, path: str | None = None) -> Any:
        """The end-to-end figure of :attr:`metrics` (:func:`aliasscope._plots.plot_transforms`)."""
        return self.metrics.plot(path)

    def per_image_rows(self) -> list[dict[str, Any]]:
        """per_image.csv: predictions and each transform's value, per image."""
        from ._report import per_image_rows

        return per_image_rows(self.to_dict())

    def _layerwise(self) -> dict[str, Any]:
        return {
            name: {
                "checks": dict(d.checks),
                "passed": d.passed,
                "failures": d.failures(),
                "completeness_error": d.completeness_error,
                "completeness_error_mass": d.completeness_error_mass,
                "num_ops": d.num_ops,
                "target": d.target,
                "by_kind": d.by_kind(),
                "top": d.top(10),
            }
            for name, d in self.decompositions.items()
        }

    def _spectral(self) -> dict[str, Any]:
        sp, join = self.spectrum, self.join
        top = sorted((r for r in join.rows if _isnum(r["alias"])), key=lambda r: -r["alias"])[:10]
        return {
            "upsample": self.settings["upsample"],
            "images": int(min(self.settings["spectral_images"], self.num_images)),
            "by_kind": sp.by_kind(),
            "convergence": sp.convergence_summary(),
            "join": join.to_dict(),
            "top": [{k: r[k] for k in ("order", "name", "kind", "alias", "lie_share")} for r in top],
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary: exactly the content of ``summary.json`` (without its ``"provenance"``
        object, which the output folder adds). NaN stays NaN here; summary.json writes it as null."""
        s = self.settings
        out: dict[str, Any] = {k: s.get(k) for k in ("model", "pretrained", "images")}
        out["num_images"] = self.num_images
        out.update({k: s.get(k) for k in ("preprocess", "generator", "device", "dtype", "seed", "target")})
        total = self.timings.get("total")
        out.update(
            top1=self.top1,
            seconds=None if total is None else round(total, 2),
            timings={k: round(v, 3) for k, v in self.timings.items() if k != "total"},
            versions=dict(self.versions),
            intervals={t: list(v) for t, v in self.metrics.interval().items()},
            metrics=json.loads(self.metrics.to_json()),
            predictions=self.predictions,
        )
        if s.get("layerwise"):
            out["layerwise"] = self._layerwise()
        out["checks"] = dict(self.checks)
        if self.spectrum is not None and self.join is not None:
            out["spectral"] = self._spectral()
        if self.where is not None:
            out["where"] = dict(self.where)
        return out

    def summary(self) -> str:
        """The text summary: metrics, top-1, the advice (or the self-check failures), the spectral
        convergence verdict."""
        import html
        import re

        from ._report import advice, check_failures, convergence_verdict

        d = self.to_dict()
        lines = [self.metrics.summary()]
        if self.top1 is not None:
            lines.append(f"top-1 accuracy: {100 * self.top1:.1f}% ({self.num_images} labelled images)")
        failures = check_failures(d)
        if failures is not None:
            lines.append("\nSELF-CHECK FAILED: these numbers are not a finding (no ranking, no advice)")
            lines += [f"  - {f}" for f in failures]
        elif d.get("layerwise"):
            lines.append("")
            lines += [html.unescape(re.sub(r"</?(code|b)>", "", line)) for line in advice(d)]
        if d.get("spectral"):
            lines.append(f"spectral convergence: {convergence_verdict(d['spectral'].get('convergence'))[1]}")
        return "\n".join(lines)


def _describe_images(images: Any) -> str:
    files = getattr(images, "files", None)
    return "tensor" if not files else f"{len(files)} files"


def diagnose(
    model: torch.nn.Module,
    images: torch.Tensor | Any,
    *,
    transforms: Sequence[str] | None = None,
    layer_transforms: Sequence[str] | None = ("translate_x", "rotate", "scale"),
    target: str | int | None = "pred",
    generator: str = "central",
    batch_size: int | None = None,
    spectral: bool = True,
    upsample: int = 4,
    spectral_images: int = 4,
    convergence: Sequence[int] = (2,),
    labels: torch.Tensor | None = None,
    files: Sequence[str] | None = None,
    progress: bool = True,
    preprocess: Any = None,
    settings: Mapping[str, Any] | None = None,
) -> Diagnosis:
    """Diagnose ``model`` on ``images``: the end-to-end Lie derivative per image and transform
    (``transforms``, default all), the exact attribution to every op for each of
    ``layer_transforms`` (None or empty: skipped) with its self-checks, each op's aliasing energy
    (``spectral``: on the first ``spectral_images`` images at ``upsample`` times the resolution,
    re-measured at the ``convergence`` factors) joined with its share, top-1 (with ``labels``) and
    the predictions.

    ``images``: a (B, C, H, W) tensor (on the model's device, in its dtype) or an
    :class:`~aliasscope.data.ImageBatch` (its labels and files are used unless ``labels``/``files``
    are given). ``target``: what the layer attribution explains: ``'pred'`` (each image's top class),
    a class index, or ``'all'`` (the whole softmax vector). ``preprocess``: the
    :class:`~aliasscope.models.Preprocess` that made the images (recorded; the figures use its
    mean/std to show the photos). ``settings``: entries that override what the summary records
    (``model``, ``pretrained``, ``images``, ``device``, ``dtype``, ``seed``, ...: the CLI records its
    arguments there). ``batch_size``: images per pass, None for :func:`aliasscope._batching.auto_batch_size`.
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}
    if labels is None:
        labels = getattr(images, "labels", None)
    if files is None:
        files = getattr(images, "files", None)
    x = getattr(images, "images", images)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a tensor or an ImageBatch, got {type(images).__name__}")
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        device = x.device
    x = x.to(device)
    batch_size = auto_batch_size(x.device) if batch_size is None else batch_size
    record: dict[str, Any] = {
        "model": type(model).__name__,
        "pretrained": None,
        "images": _describe_images(images),
        "preprocess": None if preprocess is None else repr(preprocess),
        "generator": generator,
        "device": str(device),
        "dtype": str(x.dtype).removeprefix("torch."),
        "seed": None,
        "target": target,
        "transforms": list(transforms) if transforms is not None else None,
        "layerwise": bool(layer_transforms),
        "layer_transforms": list(layer_transforms or []),
        "batch_size": batch_size,
        "spectral": bool(spectral),
        "upsample": upsample,
        "spectral_images": spectral_images,
        "convergence": list(convergence),
    }
    record.update(settings or {})

    clock = time.perf_counter()
    top1, predictions = _predictions(model, x, labels, batch_size)
    source = x if files is None else _Batch(x, list(files))
    metrics = equivariance_metrics(
        model, source, transforms, generator=generator, batch_size=batch_size, progress=progress
    )
    timings["metrics"] = time.perf_counter() - clock

    decs: dict[str, Decomposition] = {}
    if layer_transforms:
        from tqdm.auto import tqdm

        clock = time.perf_counter()
        parsed = parse_target(target)
        for name in tqdm(list(layer_transforms), desc="layer attribution", disable=not progress):
            decs[name] = decompose(
                model, x, name, target=parsed, output="softmax", generator=generator, batch_size=batch_size
            )
        timings["layerwise"] = time.perf_counter() - clock

    sp = join = None
    if spectral:
        clock = time.perf_counter()
        sp = _spectral_fn(
            model,
            x[:spectral_images],
            upsample=upsample,
            batch_size=batch_size,
            convergence=tuple(convergence),
            progress=progress,
        )
        join = alias_join(sp, decs)
        timings["spectral"] = time.perf_counter() - clock
    timings["total"] = time.perf_counter() - start
    return Diagnosis(
        metrics=metrics,
        decompositions=decs,
        spectrum=sp,
        join=join,
        top1=top1,
        predictions=predictions,
        checks=_checks(decs),
        settings=record,
        versions=versions(),
        timings=timings,
        model=model,
        images=x,
        files=None if files is None else list(files),
        preprocess=preprocess,
    )


@dataclass
class _Batch:
    """Images with their file names, as :func:`equivariance_metrics` takes them."""

    images: torch.Tensor
    files: list[str]
