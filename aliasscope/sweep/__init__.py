"""Many models at once (``aliasscope sweep``): the paper's hundreds-of-models study as one command.

The pipeline, one module per step: :mod:`.names` (which models a request names, resolved to current
timm names), :mod:`.measure` (one model: one row), :mod:`.engine` (in this process or on a Dask
cluster), :mod:`.store` (one Parquet folder per finished model, written atomically: resume and
merge), :mod:`.run` (:func:`run_sweep`, :func:`merge`). The paper's own sweep list (Gruver et al.
2023: 483 unique timm names, 2022 spelling) ships as package data (:func:`paper_models`).
"""

from __future__ import annotations

from .architecture import ARCHITECTURE_TYPES, architecture_type, family, flops_per_image
from .measure import ModelResult, SweepSettings, Task, measure_model
from .names import STATUSES, Resolved, expand, paper_models, resolution_rows, resolve, summary
from .run import merge, read_results_csv, run_sweep
from .store import Store

__all__ = [
    "ARCHITECTURE_TYPES",
    "STATUSES",
    "ModelResult",
    "Resolved",
    "Store",
    "SweepSettings",
    "Task",
    "architecture_type",
    "expand",
    "family",
    "flops_per_image",
    "measure_model",
    "merge",
    "paper_models",
    "read_results_csv",
    "resolution_rows",
    "resolve",
    "run_sweep",
    "summary",
]
