"""Figures and the HTML report: they show the numbers they are given, and the page renders."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import timm
import torch
from conftest import random_images, smooth_cnn
from PIL import Image
from torch import nn

from aliasscope import plots
from aliasscope.cli import main
from aliasscope.decompose import decompose
from aliasscope.report import advice, render_report
from aliasscope.spectral import spectral

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
    shares = decs["translate_x"].shares().numpy()
    bars = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(bars, 100 * shares[shares >= 1e-9], rtol=1e-12)
    assert (tmp_path / "attr.png").stat().st_size > 0 and (tmp_path / "attr.svg").stat().st_size > 0
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "completeness error" in titles and "Shares by op kind" in titles


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


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
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
    argv += ["--convergence", "--layer-transforms", "translate_x", "--where-images", "1"]
    assert main(argv) == 0
    url = (out / "report.html").resolve().as_uri()
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
    assert 'data-images="5"' in body.group(1)
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 10  # text and figures, not a blank page
