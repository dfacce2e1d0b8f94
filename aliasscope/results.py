"""Result objects share one base, :class:`Result`: every result has ``table`` (rows), ``to_dict()``,
``summary()`` (also its ``str``), ``to_csv(path=None)``, ``to_json(path=None)`` and
``plot(path=None)``, and writes the same way (text returned, file optional)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

__all__ = ["Result", "save_text", "to_json_text", "rows_to_csv"]


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


class Result(ABC):
    """The base of every result (:class:`~aliasscope.lie.EquivarianceMetrics`,
    :class:`~aliasscope.decomposition.Decomposition`, :class:`~aliasscope.spectrum.Spectrum`,
    :class:`~aliasscope.comparison.Comparison`).

    A subclass implements :attr:`table` (one dict per row), :meth:`to_dict` (plain Python types) and
    :meth:`summary` (text), and names its default figure in :attr:`default_figure` (a function of
    :mod:`aliasscope._plots` taking the result and a path). The base writes them: :meth:`to_csv` (the
    rows of :meth:`csv_rows`, :attr:`table` unless the subclass says otherwise), :meth:`to_json`
    (:meth:`to_dict`, NaN and inf as null), ``str`` (:meth:`summary`) and :meth:`plot`.
    """

    default_figure: ClassVar[str]
    """Name of the default figure function in :mod:`aliasscope._plots`."""

    @property
    @abstractmethod
    def table(self) -> list[dict[str, Any]]:
        """One dict per row."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The result as plain Python types (what :meth:`to_json` writes)."""

    @abstractmethod
    def summary(self) -> str:
        """A short text summary (also ``str(result)``)."""

    def csv_rows(self) -> list[dict[str, Any]]:
        """The rows :meth:`to_csv` writes: :attr:`table`."""
        return self.table

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """:meth:`csv_rows` as CSV; also written to ``path`` if given."""
        return rows_to_csv(self.csv_rows(), path)

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """:meth:`to_dict` as JSON (NaN written as null); also written to ``path`` if given."""
        return save_text(to_json_text(self.to_dict()), path)

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """The default figure (a matplotlib Figure; saved as PNG and SVG when ``path`` is given)."""
        from . import _plots as plots

        return getattr(plots, self.default_figure)(self, path)

    def __str__(self) -> str:
        return self.summary()
