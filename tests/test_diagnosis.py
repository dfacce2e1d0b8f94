"""The library call behind ``aliasscope diagnose`` and the figure registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_inputs import TINY, photos
from helpers import random_images, smooth_cnn
from scipy import stats

import aliasscope as asc
from aliasscope import figures
from aliasscope.cli import main
from aliasscope.diagnosis import Diagnosis, alias_join
from aliasscope.figures import Figure, figure_keys, register_figure, report_keys
from aliasscope.results import to_json_text


def _strict(d: dict) -> dict:
    """As summary.json holds it: strict JSON (NaN as null), without provenance and timings."""
    d = json.loads(to_json_text(d))
    d.pop("provenance", None)
    d.pop("seconds", None)
    d.pop("timings", None)
    return d


def test_library_call_equals_the_cli_summary(tmp_path: Path) -> None:
    imgs = photos(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    extra = ["--layer-transforms", "translate_x", "--upsample", "2", "--spectral-images", "1", "--no-report"]
    assert main(["diagnose", *TINY, "--images", str(imgs), "--out", str(out), *extra]) == 0
    written = json.loads((out / "summary.json").read_text())

    torch.manual_seed(0)  # as the CLI: --seed 0 before loading
    model, preprocess = asc.load_model("test_efficientnet", pretrained=False)
    batch = asc.load_images(str(imgs), preprocess)
    result = asc.diagnose(
        model,
        batch,
        transforms=["translate_x", "rotate"],
        layer_transforms=["translate_x"],
        upsample=2,
        spectral_images=1,
        progress=False,
        preprocess=preprocess,
        settings={"model": "test_efficientnet", "pretrained": False, "images": str(imgs), "seed": 0},
    )
    assert isinstance(result, Diagnosis)
    assert _strict(result.to_dict()) == _strict(written)
    assert list(result.to_dict()) == [k for k in written if k != "provenance"]
    text = str(result)
    assert "translate_x" in text and "spectral convergence" in text and text == result.summary()
    assert result.checks["passed"] and set(result.timings) >= {"metrics", "layerwise", "spectral", "total"}


def test_the_join_rank_correlation_is_scipys_on_the_same_pairs() -> None:
    model = smooth_cnn()
    x = random_images(3, h=16, w=16)
    result = asc.diagnose(
        model, x, transforms=["rotate"], layer_transforms=["translate_x", "rotate"], upsample=2,
        spectral_images=2, convergence=(), progress=False,
    )  # fmt: skip
    join = result.join
    assert join.ops >= 3 and join.ops == len(join.pairs) == len(join.ranked_rows())
    res = stats.spearmanr([s for s, _ in join.pairs], [a for _, a in join.pairs])
    assert join.spearman_rho == float(res.statistic) and join.p_value == float(res.pvalue)
    # the pairs, from the decompositions and the spectrum directly
    decs = result.decompositions
    shares = {t: dict(zip(d.names, d.shares().tolist(), strict=True)) for t, d in decs.items()}
    sp = result.spectrum
    alias = torch.where(sp.alias_ratio.isnan(), sp.stride_alias, sp.alias_ratio).tolist()
    expected = [
        (sum(s[n] for s in shares.values()) / len(shares), a)
        for n, a in zip(sp.names, alias, strict=True)
        if a == a and a > 1e-9 and n in shares["rotate"]
    ]
    np.testing.assert_allclose(np.array(join.pairs), np.array(expected), rtol=1e-12)
    again = alias_join(sp, result.decompositions)  # one implementation, deterministic
    assert (again.pairs, again.spearman_rho, again.p_value) == (join.pairs, join.spearman_rho, join.p_value)
    summary = result.to_dict()["spectral"]["join"]
    assert summary == {"ops": join.ops, "spearman_rho": join.spearman_rho, "p_value": join.p_value}


def test_a_tensor_without_files_or_layers() -> None:
    result = asc.diagnose(
        smooth_cnn(), random_images(2, h=16, w=16), transforms=["rotate"], layer_transforms=None,
        spectral=False, progress=False,
    )  # fmt: skip
    d = result.to_dict()
    assert "layerwise" not in d and "spectral" not in d and d["checks"]["passed"]
    assert d["dtype"] == "float64" and d["device"] == "cpu" and d["num_images"] == 2
    assert [k for k, _ in figure_keys(result)] == ["transforms", "lie_distribution"]


@pytest.fixture
def extra_figure():
    """A figure registered for one test, and taken out again."""

    def draw(d, path, key):
        from aliasscope._plots import plot_transforms

        return plot_transforms(d.metrics, path)

    spec = register_figure(
        Figure("extra_check", "An extra figure", lambda s, k: f"Extra over {s['num_images']} images.", draw,
               order=12)
    )  # fmt: skip
    yield spec
    del figures.FIGURES[spec.key]


def test_one_registration_adds_a_figure_file_and_its_report_section(tmp_path: Path, extra_figure) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_figure(extra_figure)
    out = tmp_path / "out"
    lean = ["--no-layerwise", "--no-spectral"]
    imgs = photos(tmp_path / "i", 2)
    assert main(["diagnose", *TINY, *lean, "--images", str(imgs), "--out", str(out)]) == 0
    drawn = sorted(p.name for p in (out / "figures").iterdir())
    keys = ["transforms", "extra_check", "lie_distribution"]  # registry order: 10, 12, 15
    assert drawn == sorted(f"{k}{s}" for k in keys for s in (".png", ".svg"))
    page = (out / "report.html").read_text()
    at = [page.index(f"<h2>{figures.FIGURES[k].title}</h2>") for k in keys]
    assert at == sorted(at) and "Extra over 2 images." in page
    assert page.count("data:image/png;base64,") == len(keys)
    assert report_keys({"layerwise": {"rotate": {}}})[:4] == [*keys, "attribution"][:4]


def test_the_per_image_distribution_figure(tmp_path: Path) -> None:
    values = torch.tensor([[1e-2, 1e-3], [3e-2, 2e-3], [2e-2, 5e-4]], dtype=torch.float64)
    metrics = asc.EquivarianceMetrics(values, ["rotate", "scale"], "central", "softmax")
    fig = asc.plot_lie_distribution(metrics, tmp_path / "dist")
    assert (tmp_path / "dist.png").stat().st_size > 1000 and (tmp_path / "dist.svg").exists()
    ax = fig.axes[0]
    points = [line for line in ax.lines if line.get_marker() == "o"]
    assert len(points) == 2 and all(len(p.get_ydata()) == 3 for p in points)
    assert sorted(points[1].get_ydata()) == sorted(values[:, 1].tolist())
    spec = figures.FIGURES["lie_distribution"]
    assert spec.title == "Lie derivative per image"
    assert "3 images" in spec.caption({"num_images": 3}, spec.key)


def _small_diagnosis(tmp_path: Path) -> Diagnosis:
    imgs = photos(tmp_path / "imgs", 2)
    torch.manual_seed(0)
    model, preprocess = asc.load_model("test_efficientnet", pretrained=False)
    return asc.diagnose(
        model, asc.load_images(str(imgs), preprocess), transforms=["rotate"], layer_transforms=["rotate"],
        upsample=2, spectral_images=1, progress=False, preprocess=preprocess,
    )  # fmt: skip


def _drawn_by_workers(monkeypatch) -> list[str]:
    """The keys that forked workers drew (filled in when they are joined)."""
    started: list[str] = []
    drawn: list[str] = []
    start, join = figures._ForkedFigures.start, figures._ForkedFigures.join

    def counted_start(self, key):
        ok = start(self, key)
        if ok:
            started.append(key)
        return ok

    def counted_join(self):
        failed = join(self)
        drawn.extend(k for k in started if k not in failed)
        return failed

    monkeypatch.setattr(figures._ForkedFigures, "start", counted_start)
    monkeypatch.setattr(figures._ForkedFigures, "join", counted_join)
    return drawn


def test_figures_drawn_by_workers_equal_those_drawn_here(tmp_path: Path, monkeypatch) -> None:
    result = _small_diagnosis(tmp_path)
    by_workers = _drawn_by_workers(monkeypatch)
    here = figures.draw_figures(result, tmp_path / "here", progress=False, jobs=1)
    assert not by_workers
    there = figures.draw_figures(result, tmp_path / "workers", progress=False, jobs=3)
    assert list(there) == list(here) and "where_rotate" in here
    assert sorted(by_workers) == sorted(here)  # every figure was drawn by a worker, none here again
    for key in here:
        assert (tmp_path / "here" / f"{key}.png").read_bytes() == (
            tmp_path / "workers" / f"{key}.png"
        ).read_bytes()
    assert result.where is not None and result.where["images"] == 2  # set by prepare, in this process


def test_a_figure_a_worker_cannot_draw_is_drawn_here(tmp_path: Path, monkeypatch) -> None:
    """Workers never see the model: a figure that needs it (and has no prepare) fails there and is
    drawn in the main process."""

    def draw(d, path, key):
        from aliasscope._plots import plot_transforms

        assert d.model is not None, "workers have no model"
        return plot_transforms(d.metrics, path)

    by_workers = _drawn_by_workers(monkeypatch)
    spec = register_figure(Figure("needs_model", "Needs the model", lambda s, k: "", draw, order=11))
    try:
        result = _small_diagnosis(tmp_path)
        paths = figures.draw_figures(result, tmp_path / "f", progress=False, jobs=2)
        assert paths["needs_model"].exists() and (tmp_path / "f" / "needs_model.svg").exists()
        assert "transforms" in by_workers and "needs_model" not in by_workers
    finally:
        del figures.FIGURES[spec.key]


def test_a_worker_that_hangs_is_stopped_and_its_figure_drawn_here(tmp_path: Path, monkeypatch) -> None:
    import time

    def draw(d, path, key):
        from aliasscope._plots import plot_transforms

        if d.model is None:  # in a worker: hang
            time.sleep(60)
        return plot_transforms(d.metrics, path)

    monkeypatch.setattr(figures, "WORKER_TIMEOUT", 1.0)
    spec = register_figure(Figure("hangs", "Hangs in a worker", lambda s, k: "", draw, order=11))
    try:
        result = _small_diagnosis(tmp_path)
        start = time.monotonic()
        paths = figures.draw_figures(result, tmp_path / "f", progress=False, jobs=2)
        assert paths["hangs"].exists() and time.monotonic() - start < 30
    finally:
        del figures.FIGURES[spec.key]
