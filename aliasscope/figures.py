"""The report's figures, one registry: each :class:`Figure` says when it applies to a run, how to draw
it from a :class:`~aliasscope.diagnosis.Diagnosis`, its title, its caption (from the summary dict, so
that a report can be rendered from a ``summary.json`` alone) and where it goes in the report.

``aliasscope diagnose`` draws every registered figure that applies into ``figures/<key>.png|svg``, and
:func:`aliasscope._report.render_report` orders, titles and captions them from the same registry, so
adding a figure is one :func:`register_figure` call (plus its test)::

    register_figure(Figure(
        key="my_figure",
        title="What it shows",
        caption=lambda summary, key: "How to read it.",
        draw=lambda diagnosis, path, key: plot_something(diagnosis.metrics, path),
        order=70,
    ))
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._report import _SHARE_HTML, CONVERGENCE_TOLERANCE

if TYPE_CHECKING:
    import matplotlib.figure

    from .diagnosis import Diagnosis

__all__ = ["FIGURES", "Figure", "figure_keys", "figure_spec", "register_figure", "report_keys"]


def _always(diagnosis: Diagnosis) -> bool:
    return True


@dataclass(frozen=True)
class Figure:
    """One figure of the report.

    ``key``: its file name under ``figures/`` (``<key>_<transform>`` for each layer transform when
    ``per_transform``); ``title``: the report's heading (a per-transform figure's heading adds the
    transform); ``caption(summary, key)``: the HTML caption under it, from the summary dict;
    ``draw(diagnosis, path, key)``: draws it, writes ``path.png|svg`` and returns the matplotlib
    Figure; ``applies(diagnosis)``: whether the run has what it shows; ``order``: its place in the
    report (smaller first); ``prepare(diagnosis, key)``: the figure's own computation with the model
    (run first, in the main process, on the model's device), leaving what ``draw`` needs in
    ``diagnosis.prepared[key]``, so that ``draw`` only plots (and can run in a worker, which gets a
    CPU copy of it)."""

    key: str
    title: str
    caption: Callable[[dict[str, Any], str], str]
    draw: Callable[[Diagnosis, Path, str], matplotlib.figure.Figure]
    applies: Callable[[Diagnosis], bool] = field(default=_always)
    order: float = 100.0
    per_transform: bool = False
    prepare: Callable[[Diagnosis, str], None] | None = None

    def keys(self, transforms: list[str]) -> list[str]:
        """The file keys of this figure for a run with these layer transforms."""
        return [f"{self.key}_{t}" for t in transforms] if self.per_transform else [self.key]

    def title_of(self, key: str) -> str:
        """The heading of the figure drawn under ``key``."""
        if self.per_transform and key != self.key:
            return f"{self.title}: {key[len(self.key) + 1 :].replace('_', ' ')}"
        return self.title


FIGURES: dict[str, Figure] = {}
"""The registered figures by key, in registration order (see :func:`figure_keys` for report order)."""


def register_figure(spec: Figure, *, replace: bool = False) -> Figure:
    """Add a figure to the registry (``replace``: overwrite one of the same key); returns it."""
    if spec.key in FIGURES and not replace:
        raise ValueError(f"figure {spec.key!r} is already registered (replace=True to overwrite)")
    FIGURES[spec.key] = spec
    return spec


def _sorted() -> list[Figure]:
    return sorted(FIGURES.values(), key=lambda f: f.order)


def figure_spec(key: str) -> Figure | None:
    """The registered figure a file key belongs to (``where_rotate`` -> the ``where`` figure)."""
    if key in FIGURES:
        return FIGURES[key]
    for spec in FIGURES.values():
        if spec.per_transform and key.startswith(spec.key + "_"):
            return spec
    return None


def figure_keys(diagnosis: Diagnosis) -> list[tuple[str, Figure]]:
    """``(key, figure)`` of every registered figure that applies to ``diagnosis``, in report order."""
    transforms = list(diagnosis.decompositions)
    return [(k, f) for f in _sorted() if f.applies(diagnosis) for k in f.keys(transforms)]


def report_keys(summary: dict[str, Any]) -> list[str]:
    """Every key a report of ``summary`` can show, in report order: per-transform figures once per
    layer transform, then under their bare key (older runs)."""
    transforms = list(summary.get("layerwise") or {})
    keys: list[str] = []
    for f in _sorted():
        keys += f.keys(transforms)
        if f.per_transform:
            keys.append(f.key)
    return keys


def draw_figures(
    diagnosis: Diagnosis, folder: Path, progress: bool = True, jobs: int | None = None
) -> dict[str, Path]:
    """Draw every figure that applies into ``folder/<key>.png|svg``; returns {key: png path}.

    Every figure's ``prepare`` runs here first (it may use the model and the GPU); the plotting
    (matplotlib: most of the time, about 0.5-2 s a figure) then runs in forked processes, one per
    figure, at most ``jobs`` at a time (default: the CPUs; 1: everything here). A worker sees a CPU
    copy of the results, never the model or a GPU; a figure a worker could not draw is drawn here
    again, so the files are the same either way.
    """
    from tqdm.auto import tqdm

    keys = figure_keys(diagnosis)
    workers = _workers(jobs, len(keys))
    redo: list[str] = []
    with tqdm(total=len(keys), desc="figures", disable=not progress) as bar:
        for key, spec in keys:  # first, with every core (prepare and plot at once thrash 2-core machines)
            if spec.prepare is not None:
                spec.prepare(diagnosis, key)
        pool = _ForkedFigures(diagnosis, folder, workers, bar) if workers > 1 else None
        for key, _ in keys:
            if pool is None or not pool.start(key):
                redo.append(key)
        if pool is not None:
            redo += pool.join()
        for key in redo:  # drawn here: serial, or what a worker could not draw
            figure_spec(key).draw(diagnosis, folder / key, key)  # a bare Figure: freed with it
            bar.update()
    return {key: folder / f"{key}.png" for key, _ in keys}


def _workers(jobs: int | None, figures: int) -> int:
    import multiprocessing
    import os
    import sys

    if jobs is not None:
        return max(1, min(jobs, figures))
    if not sys.platform.startswith("linux"):  # fork is the only start method that needs no pickling
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else multiprocessing.cpu_count()
    return max(1, min(cpus, figures))


WORKER_TIMEOUT = 600.0
"""Seconds a figure's worker may take before it is stopped and the figure drawn in the main process
(a worker that hangs, e.g. on a lock a thread of the parent held when it forked, costs no more)."""

_FORKED: tuple[Diagnosis, Path] | None = None
"""What a forked worker draws from (inherited through fork, never pickled)."""


class _ForkedFigures:
    """Figures drawn in forked processes, ``workers`` at a time, each from a CPU copy of the
    results (:func:`_on_cpu`)."""

    def __init__(self, diagnosis: Diagnosis, folder: Path, workers: int, bar: Any) -> None:
        import multiprocessing

        self.folder, self.workers, self.bar = folder, workers, bar
        self.context = multiprocessing.get_context("fork")
        self.running: list[tuple[str, Any, float]] = []
        self.failed: list[str] = []
        self.view = _on_cpu(diagnosis)

    def start(self, key: str) -> bool:
        """Fork a worker for ``key`` (after waiting for a free one); False when none could start."""
        import warnings

        global _FORKED
        while len(self.running) >= self.workers:
            self._reap(block=True)
        _FORKED = (self.view, self.folder)
        try:
            with warnings.catch_warnings():
                # forking a process that has threads is safe here: the worker only plots and writes
                warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks.*")
                process = self.context.Process(target=_draw_in_worker, args=(key,), daemon=True)
                process.start()
        except OSError:  # no process to be had: drawn in the main process
            return False
        finally:
            _FORKED = None
        self.running.append((key, process, time.monotonic()))
        return True

    def _reap(self, block: bool) -> None:
        from multiprocessing.connection import wait

        if block:
            wait([p.sentinel for _, p, _ in self.running], timeout=5.0)
        for entry in list(self.running):
            key, process, started = entry
            if process.is_alive():
                if time.monotonic() - started < WORKER_TIMEOUT:
                    continue
                process.kill()  # hung: drawn in the main process instead
            process.join()
            self.running.remove(entry)
            if process.exitcode == 0:
                self.bar.update()
            else:
                self.failed.append(key)

    def join(self) -> list[str]:
        """Wait for every worker; returns the keys they could not draw."""
        while self.running:
            self._reap(block=True)
        return self.failed


def _draw_in_worker(key: str) -> None:
    import sys

    import torch

    torch.set_num_threads(1)
    assert _FORKED is not None
    diagnosis, folder = _FORKED
    try:
        figure_spec(key).draw(diagnosis, folder / key, key)
    except Exception:  # drawn again in the main process, where its error (if any) is raised
        sys.exit(1)


def _on_cpu(diagnosis: Diagnosis) -> Diagnosis:
    """A copy of ``diagnosis`` for the workers: every tensor of its results on the CPU, no model."""
    import dataclasses

    import torch

    def cpu(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.cpu()
        if isinstance(value, dict):
            return {k: cpu(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            items = [cpu(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: cpu(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
            return dataclasses.replace(value, **fields)
        return value

    results = ("metrics", "decompositions", "spectrum", "join", "images", "prepared")
    return dataclasses.replace(
        diagnosis, model=None, **{name: cpu(getattr(diagnosis, name)) for name in results}
    )


# ---- the figures of aliasscope diagnose ---------------------------------------------------------


def _num_ops(summary: dict[str, Any]) -> int | None:
    layer = summary.get("layerwise") or {}
    return next((p.get("num_ops") for p in layer.values()), None)


def _of_ops(summary: dict[str, Any]) -> str:
    n_ops = _num_ops(summary)
    return f" of the {n_ops} ops in layers.csv" if n_ops else ""


def _transforms_caption(summary: dict[str, Any], key: str) -> str:
    return (
        f"End-to-end Lie derivative per transform (mean over the {summary.get('num_images')} images of "
        "the mean over classes of |L_X softmax|, 95% BCa bootstrap interval, log scale): which symmetries "
        "the model breaks most."
    )


def _distribution_caption(summary: dict[str, Any], key: str) -> str:
    return (
        f"The same end-to-end Lie derivative per image (one point per image, {summary.get('num_images')} "
        "images; box: quartiles, line: median, whiskers: 1.5 IQR, log scale; per_image.csv has the "
        "values): whether a transform's mean is carried by all images or by a few."
    )


def _attribution_caption(summary: dict[str, Any], key: str) -> str:
    layer = summary.get("layerwise") or {}
    names = ", ".join(t.replace("_", " ") for t in layer)
    return (
        f"Layer attribution, one row per transform ({html.escape(names)}; all {summary.get('num_images')} "
        "images): each op's share of the Lie derivative in call order, coloured by op kind, stage "
        f"boundaries dotted; the 5 largest are numbered and listed on the right (top 5{_of_ops(summary)}); "
        "the black line is the cumulative share. Ops whose share is below 1e-9 in every transform (zero "
        "by construction: data movement, eval BatchNorm, per-position linear maps) are left off the "
        "axis. Bottom: shares by op kind per transform. "
        f"{_SHARE_HTML}. Tall early bars mean the model breaks equivariance early."
    )


def _where_caption(summary: dict[str, Any], key: str) -> str:
    layer = summary.get("layerwise") or {}
    of_ops = _of_ops(summary)
    images = summary.get("num_images")
    transform = key.partition("_")[2] or next(iter(layer), "")
    info = summary.get("where") or {}
    n = info.get("images", "the first")
    files = ", ".join(html.escape(str(f)) for f in info.get("titles", []))
    ranked = info.get("ranked_over", images)
    if key not in ("where", f"where_{next(iter(layer), '')}"):  # the first one explains it all
        return (
            f"As above, under {html.escape(transform.replace('_', ' '))}: the top 3 ops' contribution "
            f"maps for the first {n} of the {images} images ({files}), ranked over "
            f"{'all ' if ranked == images else 'these '}{ranked} images; each map on its own colour "
            "scale (its colour bar)."
        )
    if ranked == images:
        which = (
            f"The ops are the top 3{of_ops} by share in the layer attribution (ranked over all {images} "
            "images, as in the attribution figure and the Top ops table; an op with no single image "
            "grid, such as a pooled vector, is skipped). "
        )
    else:
        which = (
            f"The ops are ranked, and their shares computed, over these {n} images only, for the "
            "predicted class (the layer attribution's target has no per-pixel maps). "
        )
    return (
        f"Where in the image the top ops' contributions under {html.escape(transform.replace('_', ' '))} "
        f"sit, for the first {n} of the {images} images only ({files}). {which}"
        "Each map is dT/dh &middot; v summed over channels and upsampled to the photo; red positive, "
        "blue negative. Each map has its own symmetric colour scale, given by its colour bar "
        "(clipped at the 99.5th percentile of |map|): compare the patterns, and the numbers c (the "
        "op's exact contribution on that image), not colours across panels. Contributions at the "
        "image border point to padding; on edges and textures, to aliasing."
    )


def _spectral_caption(summary: dict[str, Any], key: str) -> str:
    return (
        "Left: alias energy per op along depth (circles: pointwise ops measured at higher "
        "resolution; squares: energy above the output's Nyquist frequency that folds back at a "
        f"stride); only the ops that can alias are measured (their number{_of_ops(summary)} is on the "
        "axis), the 5 largest numbered and listed. Right: radial power spectra of the same ops' outputs; "
        "power right of the dashed Nyquist line is only reachable along diagonals. White: "
        "frequencies an op's grid does not have (a small grid has no samples in the outer rings)."
    )


def _convergence_caption(summary: dict[str, Any], key: str) -> str:
    return (
        "Each pointwise op's alias ratio at every upsampling factor measured (left) and its "
        "relative change against the factor used, --upsample (right; dashed line: the "
        f"{100 * CONVERGENCE_TOLERANCE:.0f}% tolerance of the verdict)."
    )


def _alias_caption(summary: dict[str, Any], key: str) -> str:
    layer = summary.get("layerwise") or {}
    names = ", ".join(t.replace("_", " ") for t in layer)
    return (
        "One point per op that can alias (the title says how many"
        f"{_of_ops(summary)}; eval BatchNorm and other per-pixel linear ops have alias ~0 and share 0 by "
        "construction and are left out): alias energy against its share, the mean over "
        f"{html.escape(names)}. "
        "The top ops by share and by alias energy are numbered and listed. If aliasing explained the "
        "equivariance error, points would rise to the right (positive rank correlation)."
    )


def _prepare_where(d: Diagnosis, key: str) -> None:
    """The where figure's decomposition with per-pixel maps (on the model's device), kept for ``draw``."""
    from .decomposition import decompose
    from .diagnosis import parse_target

    transform = key[len("where_") :]
    x = d.images[: d.settings.get("where_images", 3)]
    target = parse_target(d.settings.get("target"))  # maps need a scalar: 'all' shows the predicted class
    titles = [Path(f).stem for f in (d.files or [])[: x.shape[0]]]
    # ranked by the layer attribution over all images (same target), maps for the first images
    d.where = {
        "images": x.shape[0],
        "titles": titles,
        "transforms": list(d.decompositions),
        "ranked_over": d.num_images if target is not None else x.shape[0],
    }
    dec = decompose(
        d.model,
        x,
        transform,
        target="pred" if target is None else target,
        output="softmax",
        generator=d.settings.get("generator", "central"),
        keep_maps=True,
    )
    d.prepared[key] = {"x": x.cpu(), "dec": dec, "reference": target is not None, "titles": titles}


def _draw_where(d: Diagnosis, path: Path, key: str):
    from . import _plots as plots

    if key not in d.prepared:
        _prepare_where(d, key)
    p = d.prepared[key]
    reference = d.decompositions[key[len("where_") :]] if p["reference"] else None
    shown = {} if d.preprocess is None else {"mean": d.preprocess.mean, "std": d.preprocess.std}
    return plots.plot_where(p["x"], p["dec"], path, reference=reference, titles=p["titles"], **shown)


def _draw_alias(d: Diagnosis, path: Path, key: str):
    from . import _plots as plots

    return plots.plot_alias_vs_attribution(
        d.join.rows,
        path,
        rho=d.join.spearman_rho,
        p_value=d.join.p_value,
        num_ops=d.num_ops,
        transforms=list(d.decompositions),
    )


def _plots():
    from . import _plots as plots

    return plots


register_figure(
    Figure(
        "transforms",
        "End-to-end Lie derivative per transform",
        _transforms_caption,
        lambda d, p, k: _plots().plot_transforms(d.metrics, p),
        order=10,
    )
)
register_figure(
    Figure(
        "lie_distribution",
        "Lie derivative per image",
        _distribution_caption,
        lambda d, p, k: _plots().plot_lie_distribution(d.metrics, p),
        order=15,
    )
)
register_figure(
    Figure(
        "attribution",
        "Layer attribution",
        _attribution_caption,
        lambda d, p, k: _plots().plot_layer_attribution(d.decompositions, p),
        applies=lambda d: bool(d.decompositions),
        order=20,
    )
)
register_figure(
    Figure(
        "where",
        "Where in the image",
        _where_caption,
        _draw_where,
        applies=lambda d: bool(d.decompositions) and d.settings.get("where_images", 3) > 0,
        order=30,
        per_transform=True,
        prepare=_prepare_where,
    )
)
register_figure(
    Figure(
        "spectral",
        "Aliasing energy per op",
        _spectral_caption,
        lambda d, p, k: _plots().plot_spectral(d.spectrum, p, num_ops=d.num_ops),
        applies=lambda d: d.spectrum is not None,
        order=40,
    )
)
register_figure(
    Figure(
        "convergence",
        "Convergence of the alias measure in the upsampling factor",
        _convergence_caption,
        lambda d, p, k: _plots().plot_convergence(d.spectrum, p, num_ops=d.num_ops),
        applies=lambda d: d.spectrum is not None and bool(d.spectrum.convergence),
        order=50,
    )
)
register_figure(
    Figure(
        "alias_vs_attribution",
        "Alias energy vs attribution",
        _alias_caption,
        _draw_alias,
        applies=lambda d: d.join is not None and bool(d.decompositions),
        order=60,
    )
)
