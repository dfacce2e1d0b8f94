"""Figures and the HTML report: they show the numbers they are given, and the page renders."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import itertools
import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib
import matplotlib.pyplot
import matplotlib.text
import numpy as np
import pytest
import timm
import torch
from helpers import random_images, smooth_cnn
from PIL import Image
from torch import nn

from aliasscope import _plots as plots
from aliasscope._report import (
    SHARE_DEFINITION,
    advice,
    check_failures,
    convergence_verdict,
    per_image_rows,
    render_report,
)
from aliasscope.cli import _print_summary, main
from aliasscope.decomposition import decompose
from aliasscope.lie import EquivarianceMetrics
from aliasscope.spectrum import Spectrum, spectral

matplotlib.use("Agg")


def test_spatial_maps_sum_to_each_ops_contribution_on_a_cnn() -> None:
    model = smooth_cnn()
    d = decompose(model, random_images(2, h=16, w=16).double(), "rotate", target="pred", keep_maps=True)
    checked = 0
    for i, name in enumerate(d.names):
        if d.layouts[i] != "bchw" or name not in d.maps:
            continue
        m = d.spatial_map(name)
        assert m.shape[0] == 2 and m.dim() == 3
        torch.testing.assert_close(m.sum((1, 2)).double(), d.values[i].double(), rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked >= 4
    with pytest.raises(ValueError, match="no single image grid"):
        d.spatial_map(next(n for n, lay in zip(d.names, d.layouts, strict=True) if lay == "invariant"))


def test_spatial_maps_of_tokens_drop_the_prefix_tokens() -> None:
    torch.manual_seed(0)
    model = (
        timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5).eval().double()
    )
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    d = decompose(model, x, "translate_x", target="pred", keep_maps=True)
    i = next(i for i, lay in enumerate(d.layouts) if lay.startswith("tokens(4x4+1)") and d.names[i] in d.maps)
    m = d.spatial_map(d.names[i])
    assert m.shape == (1, 4, 4)
    prefix = d.maps[d.names[i]][:, :1].sum((1, 2))
    torch.testing.assert_close(m.sum((1, 2)) + prefix, d.values[i].to(m.dtype), rtol=1e-9, atol=1e-12)


def test_radial_spectrum_of_a_rectified_cosine_has_its_harmonics() -> None:
    # ReLU(cos(2 pi 8 x / 64)): energy at |k| = 0, 8, 16 (|k|/Nyquist 0, 0.25, 0.5) and none in between
    x = torch.cos(2 * math.pi * 8 * torch.arange(64, dtype=torch.float64) / 64).expand(1, 3, 64, 64).clone()
    model = (
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double().eval()
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        model[0].bias.zero_()
    sp = spectral(model, x, upsample=2)
    centres, prof = sp.radial_spectra()
    relu = sp.names.index("1")
    row = prof[relu]
    assert torch.nansum(row).item() == pytest.approx(1.0)

    def ring(f: float) -> float:
        return row[int(torch.argmin((centres - f).abs()))].item()

    assert ring(0.25) > 1e3 * ring(0.375) and ring(0.5) > 1e3 * ring(0.375)
    assert torch.isnan(prof[sp.names.index("3")]).all()  # flattened: not image-like


def test_layer_attribution_bars_are_the_shares(tmp_path: Path) -> None:
    model = smooth_cnn()
    x = random_images(2, h=16, w=16).double()
    decs = {t: decompose(model, x, t, target="pred") for t in ("translate_x", "rotate")}
    fig = plots.plot_layer_attribution(decs, tmp_path / "attr")
    shares = {t: d.shares().numpy() for t, d in decs.items()}
    keep = np.maximum(shares["translate_x"], shares["rotate"]) >= 1e-9
    rows = [ax for ax in fig.axes if "completeness error" in ax.get_title(loc="left")]
    assert [ax.get_title(loc="left").split(":")[0] for ax in rows] == ["(a) translate x", "(b) rotate"]
    for ax, t in zip(rows, decs, strict=True):  # one row per transform, the same ops in each
        bars = [p.get_height() for p in ax.patches]
        np.testing.assert_allclose(bars, 100 * shares[t][keep], rtol=1e-12)
    assert (tmp_path / "attr.png").stat().st_size > 0 and (tmp_path / "attr.svg").stat().st_size > 0
    titles = " ".join(ax.get_title(loc="left") for ax in fig.axes)
    assert "Shares by op kind" in titles
    texts = " ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
    assert f"top 5 of {decs['rotate'].num_ops} ops" in texts  # the op count of layers.csv
    assert "the sign is lost" in texts


def test_stage_names() -> None:
    assert plots.stage_of("blocks.3.0.conv_pw") == "blocks.3"
    assert plots.stage_of("layer2.0.conv1") == "layer2"
    assert plots.stage_of("conv_stem") == "conv_stem"
    assert plots.stage_of("blocks.1#2") == "blocks.1"
    assert plots.stage_of("stages.1.blocks.0.mlp") == "stages.1"


def _summary() -> dict:
    top = [
        {
            "order": 3,
            "name": "features.relu",
            "kind": "nonlinearity",
            "share": 0.5,
            "shape": "1x8",
            "mean": 0.1,
        },
        {
            "order": 1,
            "name": "features.down",
            "kind": "downsampling",
            "share": 0.3,
            "shape": "1x8",
            "mean": -0.1,
        },
    ]
    return {
        "model": "toy",
        "pretrained": False,
        "num_images": 2,
        "images": "imgs",
        "generator": "central",
        "device": "cpu",
        "seconds": 1.0,
        "top1": None,
        "intervals": {"translate_x": [0.1, 0.05, 0.15]},
        "layerwise": {
            "translate_x": {
                "completeness_error": 2e-7,
                "num_ops": 9,
                "target": "pred",
                "by_kind": {
                    "nonlinearity": {"share": 0.6, "ops": 2, "mean": 0.1},
                    "downsampling": {"share": 0.4, "ops": 1, "mean": 0.1},
                },
                "top": top,
            }
        },
    }


def test_advice_names_the_top_ops_and_the_fix_for_their_kind() -> None:
    text = " ".join(advice(_summary()))
    assert "features.relu" in text and "50.0%" in text
    assert "filtered_activation" in text and "blurpool" in text
    assert "80% of it" in text


def test_report_embeds_every_figure_and_escapes_names(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    Image.new("RGB", (20, 10), "red").save(png)
    summary = _summary()
    summary["model"] = "<script>alert(1)</script>"
    page = render_report(summary, {"attribution": png, "transforms": png})
    assert page.count("data:image/png;base64,") == 2
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "2.00e-07" in page and "exact" in page


def _two_transforms() -> dict:
    summary = _summary()
    rotate = json.loads(json.dumps(summary["layerwise"]["translate_x"]))
    rotate["top"] = rotate["top"][::-1]  # another ranking under rotate
    summary["layerwise"]["rotate"] = rotate
    return summary


def _tables(page: str) -> list[list[list[str]]]:
    """Every <table> of the page as rows of cell texts (header row first)."""
    out = []
    for table in re.findall(r"<table>(.*?)</table>", page, flags=re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)
        out.append(
            [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r)] for r in rows]
        )
    return out


def test_share_is_defined_where_it_appears_and_shown_in_percent() -> None:
    summary = _summary()
    summary["spectral"] = {
        "upsample": 4,
        "images": 2,
        "by_kind": {},
        "convergence": {},
        "join": {"ops": 3, "spearman_rho": 0.1, "p_value": 0.5},
        "top": [
            {"order": 3, "name": "features.relu", "kind": "nonlinearity", "alias": 0.02, "lie_share": 0.25}
        ],
    }
    page = render_report(summary, {})
    assert "the sign is lost" in page and html_escape(SHARE_DEFINITION)[1:] in page  # (S|s)hare = ...
    lines = advice(summary)
    assert any("sign is lost" in line for line in lines)  # the text summary defines it too
    assert "50.0%" in lines[0] and "0.5" not in lines[0].replace("50.0%", "")
    alias_table = next(t for t in _tables(page) if "alias energy" in t[0])
    assert alias_table[0][-1] == "share % (mean of transforms)" and alias_table[1][-1] == "25"
    top = next(t for t in _tables(page) if "share %" in t[0])
    assert top[1][top[0].index("share %")] == "50"


def html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=False)


def test_top_ops_tables_rank_the_ops_and_label_the_call_order() -> None:
    page = render_report(_two_transforms(), {})
    tables = [t for t in _tables(page) if "rank" in t[0] and "share %" in t[0]]
    assert len(tables) == 2  # one per layer transform
    for table in tables:
        assert table[0][:3] == ["rank", "order (call)", "op"]
        assert [r[0] for r in table[1:]] == ["1", "2"]
    assert [r[1] for r in tables[0][1:]] == ["3", "1"]  # call order, not the rank
    assert "Top ops under translate_x (top 2 of 9 ops)" in page and "Top ops under rotate" in page
    assert any(
        line.startswith("Under rotate: <code>features.down") for line in advice(_two_transforms())
    )  # rotate's top op, in the text summary too


def test_failed_self_check_shows_the_failures_and_no_ranking_or_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = _two_transforms()
    failure = "completeness error 0.3 under rotate (limit 1e-4)"
    summary["checks"] = {"passed": False, "failures": [failure]}
    assert check_failures(summary) == [failure] and advice(summary) == []
    page = render_report(summary, {})
    box = re.search(r"<div class='failed'[^>]*>(.*?)</div>", page, flags=re.S)
    assert box and "Self-check failed: these numbers are not a finding" in box.group(1)
    assert failure in box.group(1) and page.index("class='failed'") < page.index("<h2>Summary")
    assert "<h3>Top ops" not in page and "order (call)" not in page and "Share by op kind" not in page
    for advice_text in ("For the nonlinearity ops", "fix --fix", "Under translate x", "features.relu"):
        assert advice_text not in page
    assert "Completeness check" in page  # the check itself stays, to diagnose the failure
    args = argparse.Namespace(model="toy", pretrained=False, device="cpu")
    metrics = argparse.Namespace(summary=lambda: "metrics table")
    summary.setdefault("provenance", {"weights": "random init"})
    out = argparse.Namespace(describe=lambda: "summary.json (1 file)", display=str(tmp_path))
    _print_summary(args, summary, metrics, out, 0.0)
    printed = capsys.readouterr().out
    assert "SELF-CHECK FAILED: these numbers are not a finding" in printed and failure in printed
    assert "features.relu" not in printed and "fix --fix" not in printed

    summary["checks"] = {"passed": True, "failures": []}
    assert check_failures(summary) is None and "Self-checks passed" in render_report(summary, {})
    del summary["checks"]  # older summaries have no checks: passed
    page = render_report(summary, {})
    assert "Top ops under rotate" in page and "class='failed'" not in page
    _print_summary(args, summary, metrics, out, 0.0)
    printed = capsys.readouterr().out
    assert "SELF-CHECK FAILED" not in printed and "features.relu" in printed


def test_convergence_verdict_both_ways() -> None:
    ok, text = convergence_verdict({"max_rel_change_s2_vs_s4": 0.05})
    assert ok is True and text.startswith("converged:") and "between s=2 and s=4 is 5.0% (< 10%)" in text
    ok, text = convergence_verdict({"max_rel_change_s2_vs_s4": 0.23})
    assert (
        ok is False and text.startswith("NOT converged:") and "23.0%" in text and "raise --upsample" in text
    )
    ok, text = convergence_verdict({"max_rel_change_s2_vs_s4": 0.1001})
    assert ok is False and "10.01%" in text  # never "10.0% (>= 10%)"
    # a factor above --upsample tests the factor used: it decides
    ok, text = convergence_verdict({"max_rel_change_s2_vs_s4": 0.2, "max_rel_change_s8_vs_s4": 0.01})
    assert ok is True and "between s=4 and s=8 is 1.0%" in text and "s=2 vs s=4: 20.0%" in text
    ok, text = convergence_verdict({"max_rel_change_s8_vs_s4": 0.3})
    assert ok is False and "--upsample 8" in text
    assert convergence_verdict({})[0] is None and "not checked" in convergence_verdict(None)[1]
    summary = _summary()
    summary["spectral"] = {"convergence": {"max_rel_change_s2_vs_s4": 0.23}, "by_kind": {}, "join": {}}
    assert "Spectral convergence: NOT converged" in render_report(summary, {})


def _spectrum(change: float) -> Spectrum:
    a = torch.tensor([0.02, 0.01, float("nan"), 0.05], dtype=torch.float64)
    nan = torch.full((4,), float("nan"), dtype=torch.float64)
    a2 = a * torch.tensor([1 + change, 1 - change / 2, 1.0, 1.0], dtype=torch.float64)
    return Spectrum(
        names=["a.act", "b.act", "c.conv", "d.act"],
        kinds=["nonlinearity", "nonlinearity", "downsampling", "nonlinearity"],
        layouts=["bchw"] * 4,
        alias_ratio=a,
        aliasing_error=a,
        stride_alias=torch.tensor([float("nan"), float("nan"), 0.03, float("nan")], dtype=torch.float64),
        hf_fraction=nan,
        upsample=4,
        convergence={2: (a2, a2)},
    )


def test_convergence_figure_carries_the_same_verdict(tmp_path: Path) -> None:
    for change, word in ((0.04, "converged: "), (0.3, "NOT converged: ")):
        sp = _spectrum(change)
        fig = plots.plot_convergence(sp, tmp_path / "conv", num_ops=9)
        title = fig.get_suptitle().replace("\n", " ").replace("\u00a0", " ")
        assert word in title and convergence_verdict(sp.convergence_summary())[1] in title
        assert f"{100 * change:.1f}%" in title
        bars = [p.get_height() for p in fig.axes[1].patches]
        np.testing.assert_allclose(sorted(bars), sorted([100 * change, 50 * change, 0.0]), atol=1e-9)
        assert "3 of 9 ops" in fig.axes[0].get_xlabel()
        matplotlib.pyplot.close(fig)


def _per_image_summary() -> dict:
    summary = _summary()
    summary["metrics"] = {
        "per_image": {"translate_x": [0.1, 0.2, 0.3], "rotate": [0.01, 0.02, 0.03]},
        "files": ["a.png", "b.png", "c.png"],
    }
    summary["predictions"] = {
        "predicted_class": [4, 7, 4],
        "probability": [0.5, 0.9, 0.25],
        "label": [4, 1, 4],
    }
    return summary


def _csv_link(page: str) -> list[dict]:
    link = re.search(
        r"<a id='per-image-csv' download='per_image.csv' href='data:text/csv;[^,]*base64,([^']+)'", page
    )
    assert link, "no per_image.csv link"
    return list(csv.DictReader(io.StringIO(base64.b64decode(link.group(1)).decode("utf-8"))))


def test_per_image_csv_link_decodes_to_the_per_image_rows() -> None:
    summary = _per_image_summary()
    rows = _csv_link(render_report(summary, {}))
    assert [r["file"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert [int(r["predicted_class"]) for r in rows] == [4, 7, 4] and [r["label"] for r in rows] == [
        "4",
        "1",
        "4",
    ]
    assert [r["correct"] for r in rows] == ["1", "0", "1"]
    assert [float(r["translate_x"]) for r in rows] == [0.1, 0.2, 0.3]
    assert [float(r["rotate"]) for r in rows] == [0.01, 0.02, 0.03]
    assert [float(r["predicted_probability"]) for r in rows] == [0.5, 0.9, 0.25]
    del summary["predictions"]  # an older summary: values and files only
    assert set(per_image_rows(summary)[0]) == {"image", "file", "translate_x", "rotate"}


def test_no_lite0_specific_sentence_for_another_model(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    Image.new("RGB", (20, 10), "red").save(png)
    keys = (
        "transforms",
        "attribution",
        "where_translate_x",
        "spectral",
        "convergence",
        "alias_vs_attribution",
    )
    summary = _summary()
    summary["model"] = "resnet50"
    summary["spectral"] = {"convergence": {"max_rel_change_s2_vs_s4": 0.02}, "by_kind": {}, "join": {}}
    summary["where"] = {"images": 1, "titles": ["x"], "ranked_over": 2}
    page = render_report(summary, {k: png for k in keys})
    text = re.sub(r"<style>.*?</style>|<script>.*?</script>|<[^>]+>", " ", page, flags=re.S)
    for lite_only in (
        "EfficientNet-Lite",
        "ReLU6",
        "lite0",
        "zero padding",
        "stem",
        "blocks",
        "bn1",
        "depthwise",
    ):
        assert not re.search(rf"\b{re.escape(lite_only)}\b", text, flags=re.I), lite_only
    summary["model"] = "tf_efficientnet_lite0"
    assert "EfficientNet-Lite0/1/2" in " ".join(advice(summary))


def test_where_ranks_by_the_reference_decomposition_and_says_which_images(tmp_path: Path) -> None:
    model = smooth_cnn()
    x = random_images(4, h=16, w=16).double()
    full = decompose(model, x, "rotate", target="pred")
    maps = decompose(model, x[:2], "rotate", target="pred", keep_maps=True)
    fig = plots.plot_where(x[:2], maps, tmp_path / "where", reference=full)
    title = fig.get_suptitle().replace("\n", " ")
    assert "first 2 of the 4 images" in title and f"of {full.num_ops} ops" in title
    assert "over all 4 images" in title and "own scale" in title
    shares = full.shares()
    mappable = [i for i in torch.argsort(shares, descending=True).tolist() if full.names[i] in maps.maps]
    mappable = [i for i in mappable if full.layouts[i] == "bchw"][:3]
    heads = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("rank")]
    for i, head in zip(mappable, heads, strict=True):
        rank = torch.argsort(shares, descending=True).tolist().index(i) + 1
        assert head.startswith(f"rank {rank}: {full.names[i]}") and f"{100 * shares[i]:.1f}% share" in head
    assert len([a for a in fig.axes if a.get_label() == "<colorbar>"]) == 2 * len(heads)  # a bar per map
    matplotlib.pyplot.close(fig)


def _texts(fig) -> list:
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip() and t.get_visible()]


def test_figures_have_no_tiny_text_and_no_overlapping_labels(tmp_path: Path) -> None:
    model = smooth_cnn()
    x = random_images(3, h=16, w=16).double()
    decs = {t: decompose(model, x, t, target="pred") for t in ("translate_x", "rotate", "scale")}
    rng = np.random.default_rng(0)
    crowded = [  # points on top of each other: labels must still not overlap
        {"name": f"blocks.{i}.act", "kind": "nonlinearity", "alias": 0.01 * (1 + 0.01 * i), "lie_share": 0.1}
        for i in range(8)
    ] + [
        {"name": f"op{i}", "kind": "downsampling", "alias": float(a), "lie_share": float(s)}
        for i, (a, s) in enumerate(zip(rng.uniform(1e-3, 1e-1, 30), rng.uniform(1e-4, 1e-2, 30), strict=True))
    ]
    figs = {
        "attribution": plots.plot_layer_attribution(decs),
        "alias": plots.plot_alias_vs_attribution(crowded, rho=0.1, p_value=0.5, num_ops=99),
        "spectral": plots.plot_spectral(spectral(model, x[:1], upsample=2)),
        "convergence": plots.plot_convergence(_spectrum(0.3)),
        "where": plots.plot_where(x[:2], decompose(model, x[:2], "rotate", keep_maps=True)),
        "transforms": plots.plot_transforms(
            EquivarianceMetrics(
                torch.tensor([[1e-2, 1e-3], [3e-2, 2e-3]]), ["rotate", "brightness"], "central", "softmax"
            )
        ),
        "lie_distribution": plots.plot_lie_distribution(
            EquivarianceMetrics(
                torch.rand(9, 3).double() + 1e-3, ["rotate", "scale", "shear_x"], "central", ""
            )
        ),
    }
    # 2 images: the BCa interval stays inside the values (a t-interval went below 0): nothing to mark
    assert figs["transforms"].axes[0].get_legend() is None
    for name, fig in figs.items():
        assert fig.get_size_inches()[0] <= plots.FIGURE_WIDTH + 1e-9, name
        small = [
            (t.get_text(), t.get_fontsize()) for t in _texts(fig) if t.get_fontsize() < plots.MIN_FONT_PT
        ]
        assert not small, (name, small)
    fig = figs["alias"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text().isdigit()]
    assert len(labels) == 9  # 6 by share, 3 more by alias
    boxes = [t.get_window_extent(renderer) for t in labels]
    frame = ax.get_window_extent(renderer)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    assert "38 of 99 ops" in ax.get_title(loc="left")
    for fig in figs.values():
        matplotlib.pyplot.close(fig)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FIGURES = ("transforms", "attribution", "where_translate_x", "where_rotate", "spectral", "convergence")
FIGURES += ("alias_vs_attribution", "lie_distribution")


@pytest.fixture(scope="module")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny ``aliasscope diagnose`` with every figure (two layer transforms, a convergence factor)."""
    tmp_path = tmp_path_factory.mktemp("report")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    out = tmp_path / "out"
    argv = ["diagnose", "--model", "test_efficientnet", "--no-pretrained", "--transforms", "translate_x"]
    argv += [
        "--images",
        str(folder),
        "--out",
        str(out),
        "--quiet",
        "--upsample",
        "2",
        "--spectral-images",
        "1",
    ]
    argv += ["--convergence", "4", "--layer-transforms", "translate_x", "rotate", "--where-images", "1"]
    assert main(argv) == 0
    return out


def test_report_run_writes_every_figure_and_the_per_image_csv(report_run: Path) -> None:
    page = (report_run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    for key in FIGURES:
        assert (report_run / "figures" / f"{key}.png").stat().st_size > 1000, key
    written = list(csv.DictReader((report_run / "per_image.csv").open()))
    assert _csv_link(page) == written and len(written) == 2
    summary = json.loads((report_run / "summary.json").read_text())
    assert [int(r["predicted_class"]) for r in written] == summary["predictions"]["predicted_class"]
    assert [float(r["translate_x"]) for r in written] == pytest.approx(
        summary["metrics"]["per_image"]["translate_x"]
    )
    n_ops = summary["layerwise"]["translate_x"]["num_ops"]
    layers = list(csv.DictReader((report_run / "layers.csv").open()))
    assert n_ops == sum(r["transform"] == "translate_x" for r in layers)
    assert f"of the {n_ops} ops in layers.csv" in page
    assert "Spectral convergence: " in page and "Where in the image: rotate" in page


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
def test_report_renders_in_headless_chromium(report_run: Path, tmp_path: Path) -> None:
    url = (report_run / "report.html").resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        flags = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run(
            [*flags, "--virtual-time-budget=5000", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        shot = tmp_path / "report.png"
        subprocess.run(
            [*flags, "--window-size=1200,3000", f"--screenshot={shot}", url], capture_output=True, timeout=120
        )
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    assert 'data-broken-images="0"' in body.group(1)
    assert f'data-images="{len(FIGURES)}"' in body.group(1)
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 10  # text and figures, not a blank page
