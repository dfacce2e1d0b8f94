"""Shared helpers for result objects: every result writes the same way (text returned, file optional)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["save_text", "to_json_text", "rows_to_csv"]


def save_text(text: str, path: str | os.PathLike[str] | None) -> str:
    """Write ``text`` to ``path`` when one is given; return ``text`` either way."""
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    return text


def _plain(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return _plain(o.tolist())
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_plain(v) for v in o]
    return o


def to_json_text(data: Any) -> str:
    """JSON that any tool reads: tensors as lists, NaN and inf as null."""
    return json.dumps(_plain(data), indent=2, default=str)


def rows_to_csv(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str] | None = None,
    constant_columns: Mapping[str, Any] | None = None,
) -> str:
    """A table (one dict per row, the first row's keys as columns) as CSV; written to ``path`` if given.

    ``constant_columns`` (e.g. a run's provenance) are appended after the rows' own columns, with the
    same value in every row; one whose name the rows already use is written as ``run_<name>``.
    """
    fields = list(rows[0]) if rows else []
    constant: dict[str, Any] = {}
    for name, value in (constant_columns or {}).items():
        while name in fields or name in constant:
            name = f"run_{name}"
        constant[name] = value
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields + list(constant), lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, **constant} for row in rows)
    return save_text(buf.getvalue(), path)
