"""A sweep end to end: resolve the names, measure what is not stored yet, merge into one table.

:func:`run_sweep` is ``aliasscope sweep``; :func:`merge` is ``aliasscope sweep --merge``.
"""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .engine import run_tasks
from .measure import ModelResult, SweepSettings, Task, images_source
from .names import EVALUATED, expand, resolution_rows, resolve, summary
from .store import Store

__all__ = ["run_sweep", "merge", "read_results_csv", "TIMM_PREFIX"]

TIMM_PREFIX = "timm_"
"""Columns joined from timm's ``results-imagenet.csv`` (``timm_top1``, ``timm_param_count``, ...)."""


SWEEP_INSTALL = "pip install 'aliasscope[sweep]'"


def require(*modules: str, why: str = "aliasscope sweep") -> None:
    """ImportError naming every missing package of ``modules`` and the install command."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{why} needs {', '.join(missing)}: {SWEEP_INSTALL}")


def read_results_csv(path: str | os.PathLike[str]) -> Any:
    """timm's ``results-imagenet.csv`` (columns ``model``, ``top1``, ``top5``, ``param_count``,
    ``img_size``, ...) as a DataFrame whose columns other than ``model`` get the ``timm_`` prefix."""
    import pandas as pd

    frame = pd.read_csv(path)
    if "model" not in frame.columns:
        raise ValueError(
            f"{path}: not a timm results file (no 'model' column; columns: {list(frame.columns)})"
        )
    return frame.rename(columns={c: f"{TIMM_PREFIX}{c}" for c in frame.columns if c != "model"})


def merge(
    out: str | os.PathLike[str],
    results_csv: str | os.PathLike[str] | None = None,
    *,
    order: Sequence[str] | None = None,
    write: bool = True,
) -> Any:
    """One pandas DataFrame, one row per stored model (in ``order`` of requested names where given),
    joined on ``model`` (timm ``arch.tag``) with timm's ``results-imagenet.csv`` when given. Written
    to ``out/sweep.parquet`` and ``out/sweep.csv`` unless ``write`` is False."""
    require("pandas", "pyarrow")
    store = Store(out)
    frame = store.table("row", order)
    if results_csv is not None and not frame.empty:
        frame = frame.merge(read_results_csv(results_csv), on="model", how="left")
    if write and not frame.empty:
        frame.to_parquet(store.out / "sweep.parquet", index=False)
        frame.to_csv(store.out / "sweep.csv", index=False)
    return frame


def _write_resolution(out: Path, resolved: Sequence[Any]) -> None:
    rows = resolution_rows(resolved)
    tmp = out / ".resolution.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["requested", "model", "status", "note"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "resolution.csv")


class _Progress:
    """A tqdm bar over the models with done / failed / no-weights counts (its ETA is tqdm's)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.counts: Counter[str] = Counter()
        self.bar = tqdm(total=total, desc="sweep", unit="model", disable=not enabled, dynamic_ncols=True)

    def update(self, result: ModelResult) -> None:
        self.counts[result.row.get("status", "failed")] += 1
        c = self.counts
        last = result.row["requested"][:32]
        self.bar.set_postfix_str(
            f"ok {c['ok']}, failed {c['failed']}, no weights {c['no_weights']}, last {last}"
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_sweep(
    models: str | Sequence[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    num_images: int = 100,
    transforms: Sequence[str] | None = None,
    layer_transforms: Sequence[str] = ("translate_x", "rotate", "scale"),
    layer_images: int = 32,
    batch_size: int | None = None,
    device: str = "cpu",
    allow_random: bool = False,
    generator: str = "central",
    seed: int = 0,
    threads: int | None = None,
    workers: int | None = None,
    address: str | None = None,
    retries: int = 2,
    retry_failed: bool = False,
    results_csv: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Any = print,
) -> Any:
    """Measure every model ``models`` names (:func:`.names.expand`: names, ``arch.tag``, globs,
    ``hf-hub:``, a text file, ``paper``) on ``images`` into the store at ``out`` and return the merged
    table (:func:`merge`).

    Names are resolved first (``out/resolution.csv``); remapped and gone names are not measured.
    Models already stored are skipped (a re-run resumes; ``retry_failed`` measures failed ones
    again). With neither ``workers`` nor ``address`` the models run one after another in this
    process; ``workers=N`` starts a local Dask cluster of N worker processes (one per GPU with
    ``device='cuda'``), ``address`` joins a running Dask scheduler. The other arguments are
    :class:`~aliasscope.sweep.measure.SweepSettings`'."""
    from ..data import load_images
    from ..transforms import transform_names

    require("pandas", "pyarrow")
    if workers is not None or address is not None:
        require("dask", "distributed", why="a sweep on Dask workers (workers= or address=)")
    names = expand(models)
    if not names:
        raise ValueError("the sweep names no model: pass --models with names, patterns, a file or 'paper'")
    unknown = [t for t in list(transforms or []) + list(layer_transforms) if t not in transform_names()]
    if unknown:
        raise ValueError(f"unknown transforms {unknown}; known: {', '.join(transform_names())}")
    for name, value in (("num_images", num_images), ("layer_images", layer_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if workers is not None and address is not None:
        raise ValueError("pass workers (a new local cluster) or address (a running one), not both")
    probe = load_images(images_source(str(images)), limit=1)  # bad --images: one clear error before any model
    if probe.labels is None:
        log(f"note: {images} has no labels (a labels.csv with file,class_index): top-1/top-5 are NaN")
    settings = SweepSettings(
        images=str(images), num_images=num_images,
        transforms=None if transforms is None else tuple(transforms),
        layer_transforms=tuple(layer_transforms), layer_images=layer_images, batch_size=batch_size,
        device=device, allow_random=allow_random, generator=generator, seed=seed, threads=threads,
    )  # fmt: skip
    store = Store(out)
    resolved = resolve(names)
    _write_resolution(store.out, resolved)
    counts = summary(resolved)
    log("resolved: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    tasks = [Task(r.requested, r.model, r.status) for r in resolved if r.status in EVALUATED]
    if not allow_random:
        no_weights = sum(t.resolution == "no_weights" for t in tasks)
        if no_weights:
            log(f"note: {no_weights} models have no pretrained weights in timm; --allow-random measures them")
    stored = {t.requested: store.status(t.requested) for t in tasks}
    todo = [t for t in tasks if stored[t.requested] is None or (retry_failed and stored[t.requested] != "ok")]
    if len(todo) < len(tasks):
        log(f"resuming: {len(tasks) - len(todo)} models already in {store.out}, {len(todo)} to measure")
    bar = _Progress(len(todo), progress)
    start = time.perf_counter()

    def write(result: ModelResult) -> None:
        store.write(result)
        bar.update(result)

    try:
        run_tasks(todo, settings, write, workers=workers, address=address, retries=retries)
    except KeyboardInterrupt:
        from .._output import Interrupted

        done = len(store.names())
        raise Interrupted(
            f"interrupted; {done} models are stored in {store.out}: the same command resumes from there"
        ) from None
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    if todo:
        rate = len(todo) / elapsed * 3600 if elapsed > 0 else float("nan")
        log(
            f"measured {len(todo)} models in {elapsed:.1f} s ({rate:.0f} models per hour): {dict(bar.counts)}"
        )
    return merge(store.out, results_csv, order=[t.requested for t in tasks])
