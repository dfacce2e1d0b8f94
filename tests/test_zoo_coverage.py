"""The zoo sweep's result file: resume, replacement of size-skipped rows, column migration, summary."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parent.parent / "analyses" / "zoo_coverage.py"


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("zoo_coverage", ZOO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(name: str, status: str = "ok", **kw) -> dict:
    base = {
        "architecture": name,
        "family_group": "CNN",
        "family": "resnet",
        "status": status,
        "dtype": "float64",
    }
    return {**base, "error": "", **kw}


def test_a_size_skipped_row_is_replaced_in_place(zoo, tmp_path: Path) -> None:
    out = tmp_path / "c.csv"
    zoo.write_row(out, _row("a", completeness=1e-16))
    zoo.write_row(out, _row("big", "skipped-too-large", params=9e7))
    zoo.write_row(out, _row("c", completeness=2e-16))
    zoo.write_row(out, _row("big", completeness=3e-16, device="cuda"))
    rows = zoo.read_rows(out)
    assert [r["architecture"] for r in rows] == ["a", "big", "c"]
    assert rows[1]["status"] == "ok" and rows[1]["device"] == "cuda" and rows[1]["completeness"] == "3e-16"
    assert not out.with_suffix(".tmp").exists()


def test_an_old_file_is_migrated_to_the_current_columns(zoo, tmp_path: Path) -> None:
    out = tmp_path / "c.csv"
    old = [c for c in zoo.COLUMNS if c != "completeness_mass"]
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old)
        w.writeheader()
        w.writerow({c: _row("a", completeness="0.5").get(c, "") for c in old})
    zoo.migrate(out)
    zoo.write_row(out, _row("b", completeness=1e-3, completeness_mass=1e-12))
    with out.open(newline="") as f:
        assert next(csv.reader(f)) == zoo.COLUMNS
    rows = zoo.read_rows(out)
    assert [(r["architecture"], r["completeness"], r["completeness_mass"]) for r in rows] == [
        ("a", "0.5", ""),
        ("b", "0.001", "1e-12"),
    ]
    # the summary reads completeness_mass, and completeness (its upper bound) where it is missing
    assert zoo._completeness(rows) == [0.5, 1e-12]
    assert "1/2 (50%)" in zoo.summary(rows)


def test_selection_chunks_partition_the_zoo(zoo) -> None:
    pytest.importorskip("timm")
    parts = [zoo.select_architectures("resnet*", (i, 3), None, set()) for i in range(3)]
    every = zoo.select_architectures("resnet*", (0, 1), None, set())
    assert sorted(sum(parts, [])) == every and len(set(sum(parts, []))) == len(every)
    assert zoo.select_architectures("resnet*", (0, 1), None, set(every[:2])) == every[2:]
