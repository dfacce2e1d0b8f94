"""Every result shares one base (aliasscope.results.Result): table, to_dict, summary, to_csv, to_json,
plot; and the one alias rule (spectral.alias_of) and top-1 (compare.predict, compare.top1)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import random_images, smooth_cnn
from matplotlib.figure import Figure
from torch import nn

import aliasscope as asc
from aliasscope._report import convergence_verdict
from aliasscope.comparison import Comparison, compare, predict, top1
from aliasscope.decomposition import Decomposition
from aliasscope.diagnosis import Diagnosis
from aliasscope.lie import EquivarianceMetrics
from aliasscope.results import Result
from aliasscope.spectrum import Spectrum, alias_of


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()


@pytest.fixture(scope="module")
def results() -> dict[str, Result]:
    model, x = smooth_cnn().double(), random_images(2).double()
    conv = _conv()
    images = torch.randn(4, 3, 48, 48)
    models = {"conv": conv, "blurred": nn.Sequential(nn.AvgPool2d(3, 1, 1), conv).eval()}
    return {
        "metrics": asc.equivariance_metrics(model, x, ["translate_x", "rotate"], progress=False),
        "decomposition": asc.decompose(model, x, "translate_x"),
        "spectrum": asc.spectral(conv, images[:2], upsample=2, convergence=(3,)),
        "diagnosis": asc.diagnose(model, x, transforms=["translate_x"], layer_transforms=["translate_x"]),
        "comparison": compare(
            models,
            images,
            torch.tensor([0, 1, 2, 3]),
            ["translate_x"],
            layer_images=2,
            spectral_images=1,
            progress=False,
        ),
    }


def _csv_text(v: Any) -> str:
    return "" if v is None else str(v)


def _json_plain(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return _json_plain(o.tolist())
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _json_plain(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_json_plain(v) for v in o]
    return o


def test_every_result_class_is_a_result() -> None:
    for cls in (EquivarianceMetrics, Decomposition, Spectrum, Comparison, Diagnosis):
        assert issubclass(cls, Result)
        assert cls.__str__ is Result.__str__ and cls.to_json is Result.to_json and cls.to_csv is Result.to_csv
    for cls in (EquivarianceMetrics, Decomposition, Spectrum, Comparison):
        assert cls.plot is Result.plot


@pytest.mark.parametrize("name", ["metrics", "decomposition", "spectrum", "comparison", "diagnosis"])
def test_result_writes_and_draws(name: str, results: dict[str, Result], tmp_path: Path) -> None:
    r = results[name]
    assert isinstance(r, Result)
    assert str(r) == r.summary() and r.summary()
    # CSV: the rows of csv_rows() (the table, except the metrics' per-image values), written to a path
    rows = list(csv.DictReader(io.StringIO(r.to_csv(tmp_path / "r.csv"))))
    assert rows == [{k: _csv_text(v) for k, v in row.items()} for row in r.csv_rows()]
    assert (tmp_path / "r.csv").read_text() == r.to_csv()
    if name == "metrics":
        assert r.csv_rows() == r.per_image()
    else:
        assert _json_plain(r.csv_rows()) == _json_plain(r.table) and len(rows) == len(r.table)  # NaN-aware
    # JSON: to_dict() with NaN as null
    text = r.to_json(tmp_path / "r.json")
    assert json.loads(text) == _json_plain(r.to_dict()) and "NaN" not in text
    assert (tmp_path / "r.json").read_text() == text
    fig = r.plot(tmp_path / "fig")
    assert isinstance(fig, Figure)
    assert (tmp_path / "fig.png").stat().st_size > 0 and (tmp_path / "fig.svg").stat().st_size > 0
    assert isinstance(r.plot(), Figure)


def test_spectrum_summary(results: dict[str, Result]) -> None:
    sp = results["spectrum"]
    assert isinstance(sp, Spectrum)
    text = sp.summary()
    measured = sum(1 for row in sp.table if alias_of(row) == alias_of(row))
    assert measured > 0
    assert f"{measured} of {len(sp.names)} ops measured" in text
    assert "upsample 2" in text
    for kind, row in sp.by_kind().items():
        if alias_of(row) == alias_of(row):
            assert f"{kind:<15} {alias_of(row):.3e}  ({row['ops']} ops)" in text
    worst = max((row for row in sp.table if alias_of(row) == alias_of(row)), key=alias_of)
    assert f"{alias_of(worst):.3e}  {worst['kind']:<13} {worst['name']}" in text.split("top 5 ops")[1]
    assert text.splitlines()[-1] == f"convergence: {convergence_verdict(sp.convergence_summary())[1]}"


def test_alias_of_rows_and_tensors() -> None:
    nan = float("nan")
    assert alias_of({"alias_ratio": 0.1, "stride_alias": 0.5}) == 0.1
    assert alias_of({"alias_ratio": nan, "stride_alias": 0.5}) == 0.5
    assert math.isnan(alias_of({"alias_ratio": nan, "stride_alias": nan}))
    t = alias_of(
        {"alias_ratio": torch.tensor([0.1, nan, nan]), "stride_alias": torch.tensor([nan, 0.5, nan])}
    )
    assert t[:2].tolist() == pytest.approx([0.1, 0.5]) and t[2].isnan()


def test_spectrum_alias_matches_its_rows(results: dict[str, Result]) -> None:
    sp = results["spectrum"]
    a = sp.alias().tolist()
    for v, row in zip(a, sp.table, strict=True):
        assert (v == alias_of(row)) or (math.isnan(v) and math.isnan(alias_of(row)))


def test_predict_and_top1() -> None:
    model = _conv()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).argmax(-1)
    pred = predict(model, x, batch_size=2)
    assert pred.tolist() == expected.tolist()
    assert top1(pred, expected) == 1.0
    labels = expected.clone()
    labels[0] = (labels[0] + 1) % 4
    assert top1(pred, labels) == pytest.approx(0.8)
