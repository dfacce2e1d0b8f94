"""The sweep's result store: one folder of Parquet files per finished model, written atomically.

Why Parquet files and not one database: every model is written once, by whichever process finished
it, and must never leave half a row behind when that process is killed. Each model's three tables
(``row``, ``values``: per image and transform, ``shares``: per transform and op kind) are written into
a hidden temporary folder that is then renamed into place (``os.replace``, atomic on POSIX), so a model
is either complete in the store or absent. Resuming is listing the folders; the merged table is read
with pyarrow and is as readable from pandas, DuckDB, Polars or Spark (``models/*/row.parquet``).

Layout of ``out``::

    models/<slug>/row.parquet      one row: the model's measures (README: the table's columns)
    models/<slug>/values.parquet   requested, transform, image, file, value (per-image Lie derivative)
    models/<slug>/shares.parquet   requested, transform, kind, share, mean, ops
    resolution.csv                 every requested name: its status (renamed, remapped, gone, ...)
    sweep.parquet, sweep.csv       the merged table (:func:`merge`)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .measure import SHARE_PREFIX, ModelResult

__all__ = ["Store", "slug"]

TABLES = ("row", "values", "shares")


def slug(name: str) -> str:
    """A file-system name for a requested model name (unique: a hash is added when characters had to
    be replaced)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe != name or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe


def _table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


class Store:
    """The store in folder ``out`` (created when missing)."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.models = self.out / "models"
        self.models.mkdir(parents=True, exist_ok=True)

    def folder(self, requested: str) -> Path:
        return self.models / slug(requested)

    def has(self, requested: str) -> bool:
        """Whether a model is complete in the store."""
        return (self.folder(requested) / "row.parquet").is_file()

    def status(self, requested: str) -> str | None:
        """The stored status of a model (``ok``, ``failed``, ``no_weights``), None when absent."""
        if not self.has(requested):
            return None
        import pyarrow.parquet as pq

        return str(pq.read_table(self.folder(requested) / "row.parquet", columns=["status"])[0][0])

    def write(self, result: ModelResult) -> Path:
        """Write one model atomically (module docstring); a model stored before is replaced."""
        import pyarrow.parquet as pq

        requested = result.row["requested"]
        final = self.folder(requested)
        tmp = self.models / f".{final.name}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            pq.write_table(_table([result.row]), tmp / "row.parquet")
            if result.values:
                pq.write_table(_table(result.values), tmp / "values.parquet")
            if result.shares:
                pq.write_table(_table(result.shares), tmp / "shares.parquet")
            if final.exists():
                old = self.models / f".{final.name}.{uuid.uuid4().hex}.old"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def names(self) -> list[str]:
        """The requested names of every stored model."""
        return [str(t["requested"][0]) for t in self._read("row")] if self._folders() else []

    def _folders(self) -> list[Path]:
        return sorted(p for p in self.models.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _read(self, table: str) -> list[Any]:
        import pyarrow.parquet as pq

        return [
            pq.read_table(f / f"{table}.parquet")
            for f in self._folders()
            if (f / f"{table}.parquet").is_file()
        ]

    def table(self, table: str = "row", order: Iterable[str] | None = None) -> Any:
        """One pandas DataFrame of a table over every stored model (``row``, ``values``, ``shares``);
        rows in the order of ``order`` (requested names) where given. Share columns missing from a
        model whose decomposition passed are zero (the kind has no op in it)."""
        import pandas as pd

        parts = [t.to_pandas() for t in self._read(table)]
        if not parts:
            return pd.DataFrame()
        frame = pd.concat(parts, ignore_index=True, sort=False)
        if table == "row":
            shares = sorted(c for c in frame.columns if c.startswith(SHARE_PREFIX))
            if "checks_passed" in frame and shares:
                decomposed = frame["checks_passed"].notna()
                frame.loc[decomposed, shares] = frame.loc[decomposed, shares].fillna(0.0)
            front = [c for c in frame.columns if not c.startswith(SHARE_PREFIX)]
            frame = frame[front + shares]
        if order is not None:
            rank = {name: i for i, name in enumerate(order)}
            frame = frame.sort_values("requested", key=lambda s: s.map(rank).fillna(len(rank)), kind="stable")
            frame = frame.reset_index(drop=True)
        return frame
