"""The command line: exit codes, one clear line per bad argument, output files that parse."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from cli_inputs import LEAN, PROVENANCE, TINY, photos
from helpers import IMAGENET_SAMPLE
from PIL import Image

from aliasscope.cli import build_parser, main


def _diagnose_tiny(tmp_path: Path, images: Path, *extra: str) -> int:
    """``aliasscope diagnose`` on a tiny random model, writing into ``tmp_path / "out"``."""
    return main(["diagnose", *TINY, *LEAN, "--images", str(images), "--out", str(tmp_path / "out"), *extra])


def test_diagnose_writes_metrics_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _diagnose_tiny(tmp_path, photos(tmp_path / "imgs")) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 3 and list(rows[0]) == ["image", "file", "translate_x", "rotate", *PROVENANCE]
    assert all(float(r["rotate"]) > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 3 and summary["top1"] is None
    assert summary["metrics"]["transforms"]["rotate"]["n"] == 3
    assert summary["versions"]["torch"]


def test_diagnose_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    imgs = photos(tmp_path / "imgs", 2)
    assert _diagnose_tiny(tmp_path, imgs, "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["generator"] == "central" and printed["num_images"] == 2


def test_diagnose_with_labels_reports_top1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = IMAGENET_SAMPLE / "labels.csv"
    if not labels.is_file():
        pytest.skip("shared ImageNet sample not available")
    args = [
        "diagnose",
        "--images",
        str(labels),
        "--every",
        "250",
        "--transforms",
        "translate_x",
        "--out",
        str(tmp_path / "o"),
        *LEAN,
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "top-1 accuracy" in text and "translate_x" in text
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["num_images"] == 4 and 0 <= summary["top1"] <= 1


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "--model", "resnet_999", "--out", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert line.startswith("aliasscope: error:") and "resnet_999" in line


def test_empty_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert _diagnose_tiny(tmp_path, tmp_path / "empty") == 2
    assert "no image files" in _error_line(capsys)


def test_unreadable_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    imgs = photos(tmp_path / "imgs", 1)
    (imgs / "broken.jpg").write_bytes(b"not a jpeg")
    assert _diagnose_tiny(tmp_path, imgs) == 2
    assert "broken.jpg" in _error_line(capsys)


def test_labels_csv_with_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    imgs = photos(tmp_path / "imgs", 1)
    (imgs / "labels.csv").write_text("file,class_index\nimg0.png,3\nmissing.png,4\n")
    assert _diagnose_tiny(tmp_path, imgs / "labels.csv") == 2
    assert "missing.png" in _error_line(capsys)


def test_missing_image_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _diagnose_tiny(tmp_path, tmp_path / "nope") == 2
    assert "nope" in _error_line(capsys)


def test_unavailable_device(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["diagnose", *TINY, "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in _error_line(capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["diagnose", "--transforms", "twist"],
        ["diagnose", "--generator", "sobel"],
        ["diagnose", "--batch-size", "0"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_arguments_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: aliasscope" in capsys.readouterr().err


def test_help_lists_every_option() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["diagnose"].format_help()
    for option in (
        "--model",
        "--images",
        "--transforms",
        "--generator",
        "--device",
        "--out",
        "--num-images",
        "--batch-size",
        "--pretrained",
        "--quiet",
        "--json",
        "--dtype",
        "--seed",
        "--target",
        "--layerwise",
        "--spectral",
        "--report",
    ):
        assert option in help_text


def test_diagnose_layerwise_writes_layers_csv(tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = ["--layerwise", "--layer-transforms", "translate_x", "scale"]
    assert _diagnose_tiny(tmp_path, photos(tmp_path / "imgs", 2), *extra) == 0
    rows = list(csv.DictReader((out / "layers.csv").open()))
    assert {r["transform"] for r in rows} == {"translate_x", "scale"}
    assert {"order", "name", "kind", "layout", "shape", "mean", "share"} <= set(rows[0])
    for name in ("translate_x", "scale"):
        shares = [float(r["share"]) for r in rows if r["transform"] == name]
        assert abs(sum(shares) - 1) < 1e-6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layerwise"]["scale"]["completeness_error"] < 1e-4


def test_bad_layerwise_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _diagnose_tiny(tmp_path, photos(tmp_path / "imgs", 1), "--layerwise", "--target", "best") == 2
    assert "--target must be" in _error_line(capsys)


def test_diagnose_spectral_joins_alias_energy_with_the_attribution(tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = ["--layerwise", "--spectral", "--layer-transforms", "translate_x", "--upsample", "2"]
    extra += ["--spectral-images", "1"]
    assert _diagnose_tiny(tmp_path, photos(tmp_path / "imgs", 2), *extra, "--convergence", "4") == 0
    rows = list(csv.DictReader((out / "spectral.csv").open()))
    columns = {
        "name",
        "kind",
        "stride",
        "alias_ratio",
        "alias_ratio_s4",
        "stride_alias",
        "alias",
        "lie_share",
    }
    assert columns | {"hf_fraction"} <= set(rows[0])
    assert any(float(r["alias_ratio"]) > 0 for r in rows if r["kind"] == "nonlinearity")
    summary = json.loads((out / "summary.json").read_text())
    join = summary["spectral"]["join"]
    assert join["ops"] >= 3 and -1 <= join["spearman_rho"] <= 1
    assert summary["spectral"]["convergence"]["max_rel_change_s4_vs_s2"] >= 0
    assert (out / "layers.csv").exists()


FIGURES = ("transforms", "attribution", "spectral", "alias_vs_attribution", "where_translate_x")
FIGURES += ("where_rotate",)  # one where-in-the-image figure per layer transform
FIGURES += ("lie_distribution",)


def test_diagnose_writes_the_report_and_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = ["--layerwise", "--spectral", "--report", "--layer-transforms", "translate_x", "rotate"]
    extra += ["--upsample", "2", "--spectral-images", "1", "--convergence", "--where-images", "2"]
    assert _diagnose_tiny(tmp_path, photos(tmp_path / "imgs", 2), *extra) == 0
    for key in FIGURES:
        for suffix in (".png", ".svg"):
            assert (out / "figures" / (key + suffix)).stat().st_size > 1000, key
        with Image.open(out / "figures" / f"{key}.png") as im:
            assert im.size[0] > 400 and im.size[1] > 300
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)

    def strict(token: str) -> None:
        raise AssertionError(f"summary.json is not strict JSON: {token}")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=strict)
    top = summary["layerwise"]["translate_x"]["top"][0]["name"]
    assert top in page and "Completeness check" in page and "exact" in page
    assert summary["dtype"] == "float32" and summary["seed"] == 0
    assert set(summary["intervals"]) == {"translate_x", "rotate"}


def test_diagnose_in_float64_matches_float32(tmp_path: Path) -> None:
    imgs = photos(tmp_path / "imgs", 2)
    for dtype in ("float32", "float64"):
        main(
            [
                "diagnose",
                *TINY,
                *LEAN,
                "--images",
                str(imgs),
                "--out",
                str(tmp_path / dtype),
                "--dtype",
                dtype,
            ]
        )
    a, b = (
        json.loads((tmp_path / d / "summary.json").read_text())["intervals"] for d in ("float32", "float64")
    )
    for t in a:
        assert a[t][0] == pytest.approx(b[t][0], rel=1e-3)
    assert a["translate_x"][0] != b["translate_x"][0]  # really computed in another precision


def test_fix_writes_the_comparison(tmp_path: Path) -> None:
    out = tmp_path / "fix"
    argv = ["fix", *TINY, "--images", str(photos(tmp_path / "imgs", 2)), "--out", str(out), "--quiet"]
    extra = ["--fix", "blurpool", "--fix", "circular_padding+polyphase", "--layer-images", "1"]
    assert main([*argv, *extra, "--spectral-images", "1", "--transforms", "translate_x"]) == 0
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["model"] for r in rows] == ["original", "blurpool", "circular_padding+polyphase"]
    assert all(float(r["lie_translate_x"]) > 0 and 0 <= float(r["shift_consistency"]) <= 1 for r in rows)
    data = json.loads((out / "comparison.json").read_text())
    assert data["settings"]["crop"] + 32 == data["settings"]["image_size"][0]
    changed = list(csv.DictReader((out / "changes.csv").open()))
    assert {r["variant"] for r in changed} == {"blurpool", "circular_padding+polyphase"}
    assert (out / "comparison.png").stat().st_size > 10_000 and (out / "comparison.svg").exists()


def test_fix_rejects_an_unknown_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fix", *TINY, "--images", str(photos(tmp_path / "imgs", 1)), "--out", str(tmp_path / "o")]
    assert main([*argv, "--fix", "blurpool+sharpen"]) == 2
    assert "unknown fix 'blurpool+sharpen'" in _error_line(capsys)


def test_a_failed_self_check_leaves_no_ranking_and_no_advice(tmp_path: Path, monkeypatch, capsys) -> None:
    """End to end: with every check's tolerance at 0 the real checks fail, and the report, the text
    summary and summary.json say so instead of ranking ops or advising a fix."""
    import importlib

    dec = importlib.import_module("aliasscope.decomposition._self_checks")  # where the checks read TOLERANCES
    monkeypatch.setattr(dec, "TOLERANCES", {k: 0.0 for k in dec.TOLERANCES})
    imgs = photos(tmp_path / "imgs", 2)
    argv = ["diagnose", *[a for a in TINY if a != "--quiet"], "--images", str(imgs)]
    argv += ["--out", str(tmp_path / "o"), "--layer-transforms", "translate_x", "--no-spectral"]
    argv += ["--where-images", "0"]
    with pytest.warns(dec.SelfCheckWarning, match="not a finding"):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["checks"]["passed"] is False and summary["checks"]["failures"]
    assert set(summary["checks"]["ran"]) == {"completeness", "leak", "total_vs_jvp"}
    assert "SELF-CHECK FAILED" in printed and "fix --fix" not in printed
    page = (tmp_path / "o" / "report.html").read_text()
    assert "id='self-check-failed'" in page and "<h3>Top ops" not in page and "fix --fix" not in page


def test_passed_self_checks_are_named_with_their_worst_values(tmp_path: Path, capsys) -> None:
    imgs = photos(tmp_path / "imgs", 2)
    argv = ["diagnose", *[a for a in TINY if a != "--quiet"], "--images", str(imgs)]
    argv += ["--out", str(tmp_path / "o"), "--layer-transforms", "translate_x", "rotate"]
    argv += ["--no-spectral", "--no-report"]
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("self-checks passed"))
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    worst = max(summary["layerwise"][t]["checks"]["total_vs_jvp"] for t in ("translate_x", "rotate"))
    assert f"total_vs_jvp <= {worst:.1e}" in line and "completeness <= " in line
