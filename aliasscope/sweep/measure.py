"""One model of a sweep, measured: one row of the table, its per-image values and its shares by kind.

:func:`measure_model` never raises for what goes wrong with a model: the row says ``status``
``failed`` with the ``error``, or ``no_weights`` when pretrained weights are neither bundled nor cached
and random init is not allowed. A model whose exact decomposition cannot run (an op whose layout
cannot be inferred) keeps its end-to-end values; ``decomposition_error`` says why its shares are
missing and ``checks_passed`` is empty. Out of memory, the model is measured again at half the batch, down to
one image (as timm's ``validate.py`` does).
"""

from __future__ import annotations

import gc
import math
import os
import resource
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .architecture import architecture_type, family, flops_per_image, parameter_count

__all__ = ["ModelResult", "SweepSettings", "Task", "measure_model", "LAYER_TRANSFORMS", "SHARE_PREFIX"]

LAYER_TRANSFORMS = ("translate_x", "rotate", "scale")
"""Transforms of the exact decomposition (shares by op kind), as ``aliasscope diagnose``."""

SHARE_PREFIX = "share_"
"""Columns ``share_<kind>``: the kind's share of the exact decomposition, mean over its transforms."""


@dataclass(frozen=True)
class SweepSettings:
    """What every model of a sweep is measured on and how (the same for all models).

    ``images``: what :func:`aliasscope.data.load_images` takes (a folder holding ``labels.csv`` uses
    its labels); the first ``num_images`` are measured, each model with its own preprocessing.
    ``transforms``: end-to-end Lie derivatives (default all ten); ``layer_transforms`` on the first
    ``layer_images`` images: the exact decomposition by op kind (empty: skipped). ``allow_random``:
    random init where no pretrained weights are bundled or cached (flagged in ``weights``).
    ``device``: ``cuda`` uses the worker's GPU. ``threads``: torch threads per model (None: as is)."""

    images: str
    num_images: int = 100
    transforms: tuple[str, ...] | None = None
    layer_transforms: tuple[str, ...] = LAYER_TRANSFORMS
    layer_images: int = 32
    batch_size: int | None = None
    device: str = "cpu"
    allow_random: bool = False
    generator: str = "central"
    seed: int = 0
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Task:
    """One requested name and the model a sweep builds for it (from :func:`.names.resolve`)."""

    requested: str
    model: str
    resolution: str


@dataclass
class ModelResult:
    """A measured model: its ``row``, per-image ``values`` (requested, transform, image, file, value)
    and ``shares`` (requested, transform, kind, share, mean, ops)."""

    row: dict[str, Any]
    values: list[dict[str, Any]] = field(default_factory=list)
    shares: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.row.get("status") == "ok"


def images_source(images: str) -> str:
    """What :func:`aliasscope.data.load_images` reads for ``images``: a folder's ``labels.csv`` when
    it has one (its labels give top-1/top-5), else ``images`` itself."""
    path = Path(images)
    if path.is_dir() and (path / "labels.csv").is_file():
        return str(path / "labels.csv")
    return images


_IMAGES: dict[tuple[str, int, str], Any] = {}


def _images(source: str, limit: int, preprocess: Any) -> Any:
    """The preprocessed images, cached per process (the last four preprocessings: most models of a
    sweep share one)."""
    from ..data import load_images

    key = (source, limit, repr(preprocess))
    if key not in _IMAGES:
        while len(_IMAGES) >= 4:
            _IMAGES.pop(next(iter(_IMAGES)))
        _IMAGES[key] = load_images(images_source(source), preprocess, limit=limit)
    return _IMAGES[key]


def _device(settings: SweepSettings) -> torch.device:
    if not settings.device.startswith("cuda"):
        return torch.device(settings.device)
    if ":" in settings.device:
        return torch.device(settings.device)
    index = 0
    try:  # a Dask worker of a local cluster without dask-cuda: its name is its GPU
        from distributed import get_worker

        name = get_worker().name
        index = int(name) % max(torch.cuda.device_count(), 1) if str(name).isdigit() else 0
    except (ImportError, ValueError):
        pass
    return torch.device("cuda", index)


def _bundled_default(model: str, arch: str, bundled: tuple[str, ...]) -> bool:
    """Whether ``model`` names a bundled architecture at timm's default weights (or none): the
    bundled weights are used, offline, and ``weights`` says so."""
    if arch not in bundled:
        return False
    from .names import _default_tag

    return model in (arch, _default_tag(arch))


def _load(task: Task, settings: SweepSettings, device: torch.device) -> tuple[Any, Any, str]:
    """The model, its preprocessing and ``None`` or the reason it has no weights."""
    from ..models import MissingWeightsError, available_pretrained, load_model

    arch = task.model.split(".", 1)[0]
    if task.resolution != "no_weights" and _bundled_default(task.model, arch, available_pretrained()):
        with torch.device(device):
            model, preprocess = load_model(arch, pretrained=True, device=device)
        return model, preprocess, None
    if task.resolution != "no_weights":
        try:
            with torch.device(device):
                model, preprocess = load_model(task.model, pretrained=True, device=device)
            return model, preprocess, None
        except MissingWeightsError as exc:
            missing = str(exc)
    else:
        missing = "timm publishes no pretrained weights for this architecture"
    if not settings.allow_random:
        return None, None, missing
    torch.manual_seed(random_init_seed(task.model, settings.seed))  # just before the build: reproducible
    with torch.device(device):
        model, preprocess = load_model(task.model, pretrained=False, device=device)
    return model, preprocess, None


def random_init_seed(model: str, seed: int = 0) -> int:
    """The torch seed a model of a sweep is built with when randomly initialised: ``seed`` plus the
    CRC-32 of its name (each model its own weights, the same in every run and on every worker)."""
    return seed + zlib.crc32(model.encode())


def _peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's peak RSS


def _accuracy(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None, batch: int) -> dict:
    if labels is None:
        return {"top1": math.nan, "top5": math.nan}
    with torch.no_grad():
        logits = torch.cat([model(x[s : s + batch]).float() for s in range(0, x.shape[0], batch)])
    labels = labels.to(logits.device)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {
        "top1": (top[:, 0] == labels).double().mean().item(),
        "top5": (top == labels[:, None]).any(1).double().mean().item(),
    }


def _measure(model, preprocess, task: Task, settings: SweepSettings, device, batch: int) -> ModelResult:
    from ..decomposition import decompose
    from ..diagnosis import _Batch
    from ..lie import equivariance_metrics
    from ..models import RANDOM_INIT, weights_source

    images = _images(settings.images, settings.num_images, preprocess)
    x = images.images.to(device)
    row: dict[str, Any] = {
        "family": family(task.model),
        "type": architecture_type(model),
        "params": parameter_count(model),
        "gflops": flops_per_image(model, x) / 1e9,
        "input_size": int(x.shape[-1]),
        "weights": weights_source(model),
        "pretrained": weights_source(model) != RANDOM_INIT,
        "num_images": int(x.shape[0]),
        **_accuracy(model, x, images.labels, batch),
    }
    metrics = equivariance_metrics(
        model, _Batch(x, images.files), settings.transforms, generator=settings.generator,
        batch_size=batch, progress=False,
    )  # fmt: skip
    values = []
    for t, (mean, low, high) in metrics.interval().items():
        row.update({f"lie_{t}": mean, f"lie_{t}_low": low, f"lie_{t}_high": high})
    for j, t in enumerate(metrics.transforms):
        column = metrics.values[:, j].tolist()
        values += [
            {"requested": task.requested, "transform": t, "image": i, "file": Path(f).name, "value": v}
            for i, (f, v) in enumerate(zip(images.files, column, strict=True))
        ]
    shares, failures, kinds = [], [], {}
    layer_x = x[: settings.layer_images]
    try:
        for t in settings.layer_transforms:
            dec = decompose(
                model, layer_x, t, target="pred", output="softmax", generator=settings.generator,
                batch_size=batch,
            )  # fmt: skip
            failures += [f"{t}: {f}" for f in dec.failures()]
            for kind, entry in dec.by_kind().items():
                shares.append({"requested": task.requested, "transform": t, "kind": kind, **entry})
                kinds.setdefault(kind, []).append(entry["share"])
    except Exception as exc:  # noqa: BLE001 - the end-to-end values stand; the decomposition says why not
        if is_out_of_memory(exc):
            raise
        row["decomposition_error"] = _error_text(exc)
        return ModelResult(row, values, [])
    if settings.layer_transforms:
        n = len(settings.layer_transforms)
        row.update({f"{SHARE_PREFIX}{k}": sum(v) / n for k, v in kinds.items()})
        row["layer_images"] = int(layer_x.shape[0])
        row["checks_passed"] = not failures
        row["check_failures"] = "; ".join(failures)
        row["decomposition_error"] = ""
    return ModelResult(row, values, shares)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an error, or any error it was raised from, is the device running out of memory.

    Besides ``torch.OutOfMemoryError`` this catches a CUDA allocation failure inside a kernel
    (``torch.AcceleratorError: CUDA error: out of memory``) and checks that wrap the error in their own
    message (``ValueError: the model failed on images ...: CUDA out of memory``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]


def measure_model(task: Task, settings: SweepSettings) -> ModelResult:
    """Measure one model (module docstring): never raises for the model's own errors."""
    import timm

    from .. import __version__

    start = time.perf_counter()
    base = {
        "requested": task.requested,
        "model": task.model,
        "resolution": task.resolution,
        "status": "ok",
        "error": "",
        "device": "",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "aliasscope": __version__,
        "worker_pid": os.getpid(),
    }
    if settings.threads:
        torch.set_num_threads(settings.threads)
    result = ModelResult({})
    model = None
    try:
        device = _device(settings)
        base["device"] = str(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.reset_peak_memory_stats(device)
        model, preprocess, missing = _load(task, settings, device)
        if model is None:
            base.update(status="no_weights", error=f"{missing} (pass --allow-random for random init)")
        else:
            from .._batching import auto_batch_size

            batch = settings.batch_size or auto_batch_size(device)
            retries = 0
            while True:
                try:
                    result = _measure(model, preprocess, task, settings, device, batch)
                    break
                except Exception as exc:
                    if batch == 1 or not is_out_of_memory(exc):
                        raise
                # out of the except block, so the error's frames (and the tensors they hold) are freed
                batch, retries = batch // 2, retries + 1
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            base.update(batch_size=batch, oom_retries=retries)
    except Exception as exc:  # noqa: BLE001 - one model's failure is its row, the sweep goes on
        base.update(status="failed", error=_error_text(exc))
        result = ModelResult({})
    finally:
        used = torch.device(base["device"] or "cpu")
        base["seconds"] = time.perf_counter() - start
        base["peak_memory_gb"] = _peak_gb(used)
        del model
        if used.type == "cuda":
            torch.cuda.empty_cache()
    result.row = {**base, **result.row}
    return result
