"""Shared helpers for result objects: every result writes the same way (text returned, file optional)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
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


def rows_to_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str] | None = None) -> str:
    """A table (one dict per row, the first row's keys as columns) as CSV; written to ``path`` if given."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return save_text(buf.getvalue(), path)
