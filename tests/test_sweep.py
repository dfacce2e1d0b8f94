"""``aliasscope sweep``: one row per model, cross-checked against a direct measurement; resume; a
Dask local cluster whose worker dies mid-run; failures recorded, never raised; atomic store."""

from __future__ import annotations

import math
import os
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import smooth_cnn
from PIL import Image
from torch import nn

from aliasscope.sweep import Store, architecture_type, merge, run_sweep
from aliasscope.sweep.measure import ModelResult, SweepSettings, Task, measure_model, random_init_seed

SMALL = {"num_images": 2, "transforms": ["translate_x", "rotate"], "layer_transforms": ["translate_x"]}
SMALL |= {"layer_images": 2, "allow_random": True, "threads": 1, "progress": False}
VOLATILE = ["seconds", "worker_pid", "peak_memory_gb", "device"]
"""Columns that differ between two runs of the same sweep (time, process, memory)."""


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three smooth photos-like images with labels (labels.csv: file, class_index)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    lines = ["file,class_index"]
    for i in range(3):
        low = rng.uniform(0, 255, size=(6, 7, 3))
        pixels = np.kron(low, np.ones((12, 12, 1))).astype(np.uint8)
        Image.fromarray(pixels).resize((84, 72), Image.BICUBIC).save(folder / f"img{i}.png")
        lines.append(f"img{i}.png,{i}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module ``sweepnets`` on the path of this process and of Dask workers: small models, one that
    raises, one whose op has no inferable layout, one that kills its process the first time, one that
    waits until the file ``release`` exists."""
    (tmp_path / "sweepnets.py").write_text(
        textwrap.dedent(
            f"""
            import os
            import torch
            from torch import nn

            MARKER = {str(tmp_path / "killed-once")!r}
            RELEASE = {str(tmp_path / "release")!r}

            def conv():
                torch.manual_seed(0)
                return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(4, 5))

            def broken():
                raise RuntimeError("this factory is broken on purpose")

            class Patches(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.unfold = nn.Unfold(8, stride=8)
                    self.head = nn.Linear(3 * 64, 5)

                def forward(self, x):
                    return self.head(self.unfold(x).mean(-1))

            def patches():
                torch.manual_seed(0)
                return Patches()

            def dies_once():
                if not os.path.exists(MARKER):
                    open(MARKER, "w").close()
                    os._exit(1)
                return conv()

            def gate():
                # waits until the test writes RELEASE, so that a sweep cannot finish before it is killed
                import time
                deadline = time.monotonic() + 300
                while not os.path.exists(RELEASE):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the test never released the gate")
                    time.sleep(0.05)
                return conv()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    sys.modules.pop("sweepnets", None)
    return "python:sweepnets"


def test_a_row_per_model_equals_a_direct_measurement_and_a_rerun_resumes(
    images: Path, tmp_path: Path
) -> None:
    from aliasscope.data import load_images
    from aliasscope.diagnosis import _Batch
    from aliasscope.lie import equivariance_metrics
    from aliasscope.models import load_model

    out, log = tmp_path / "sweep", []
    frame = run_sweep(["test_resnet", "test_vit"], images, out, **SMALL, log=log.append)
    assert list(frame["requested"]) == ["test_resnet", "test_vit"] and set(frame["status"]) == {"ok"}
    assert list(frame["type"]) == ["CNN", "ViT"] and not frame["pretrained"].any()
    assert set(frame["weights"]) == {"random init"} and (frame["num_images"] == 2).all()
    assert frame["checks_passed"].all() and (frame["decomposition_error"] == "").all()
    assert (frame["lie_translate_x_low"] <= frame["lie_translate_x"]).all()
    assert (frame["lie_translate_x"] <= frame["lie_translate_x_high"]).all()
    assert (frame["params"] > 0).all() and (frame["gflops"] > 0).all()
    shares = [c for c in frame.columns if c.startswith("share_")]
    assert shares and np.all(np.isfinite(frame[shares].to_numpy()))

    # independently: the same model (same seed), the images through its own preprocessing
    row = frame.iloc[0]
    torch.manual_seed(random_init_seed(row["model"]))
    model, preprocess = load_model(row["model"], pretrained=False)
    batch = load_images(images / "labels.csv", preprocess, limit=2)
    direct = equivariance_metrics(model, _Batch(batch.images, batch.files), ["translate_x", "rotate"])
    values = Store(out).table("values")
    mine = values[values["requested"] == "test_resnet"].sort_values(["transform", "image"])
    for j, t in enumerate(direct.transforms):
        got = mine[mine["transform"] == t]["value"].to_numpy()
        np.testing.assert_allclose(got, direct.values[:, j].numpy(), rtol=1e-5)
        assert math.isclose(row[f"lie_{t}"], direct.values[:, j].mean().item(), rel_tol=1e-5)

    for name in ("sweep.parquet", "sweep.csv", "resolution.csv"):
        assert (out / name).is_file()
    log.clear()
    again = run_sweep(["test_resnet", "test_vit", "sweep_no_such_net"], images, out, **SMALL, log=log.append)
    assert any("resuming: 2 models already" in line for line in log)
    assert list(again["requested"]) == ["test_resnet", "test_vit"]  # the gone name is not measured
    assert again["seconds"].tolist() == frame["seconds"].tolist()  # nothing was measured again
    assert "sweep_no_such_net,,gone" in (out / "resolution.csv").read_text()


def test_failures_are_rows_and_a_layoutless_op_keeps_the_end_to_end_values(
    images: Path, tmp_path: Path, nets: str
) -> None:
    models = [f"{nets}:conv", f"{nets}:broken", f"{nets}:patches", "test_resnet"]
    frame = run_sweep(models, images, tmp_path / "a", **(SMALL | {"allow_random": False}), log=lambda _: None)
    by = frame.set_index("requested")
    assert by.loc[f"{nets}:conv", "status"] == "ok" and by.loc[f"{nets}:conv", "checks_passed"]
    assert by.loc[f"{nets}:broken", "status"] == "failed"
    assert "RuntimeError: this factory is broken on purpose" in by.loc[f"{nets}:broken", "error"]
    patches = by.loc[f"{nets}:patches"]
    assert patches["status"] == "ok" and math.isfinite(patches["lie_translate_x"])
    assert "unfold" in patches["decomposition_error"] and pd.isna(patches["checks_passed"])
    assert by.loc["test_resnet", "status"] == "no_weights"  # nothing cached offline, random init not allowed
    assert "--allow-random" in by.loc["test_resnet", "error"]
    from aliasscope.sweep.report import write_report

    written = write_report(frame, tmp_path / "a")
    html = (tmp_path / "a" / "sweep.html").read_text()
    assert "this factory is broken on purpose" in html and "Decompositions not run" in html
    assert all((tmp_path / "a" / name).is_file() for name in written)


def _wrapped_oom() -> Exception:
    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB (simulated)")
    except torch.OutOfMemoryError as oom:
        try:
            raise ValueError("the model failed on images of shape (4, 3, 64, 64)") from oom
        except ValueError as wrapped:
            return wrapped


OUT_OF_MEMORY = {
    "torch": lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)"),
    "kernel": lambda: RuntimeError("CUDA error: out of memory\nSearch for `cudaErrorMemoryAllocation'"),
    "wrapped": _wrapped_oom,
}


@pytest.mark.parametrize("error", OUT_OF_MEMORY)
def test_out_of_memory_halves_the_batch(images: Path, monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    """Any error that is, or was raised from, the device running out of memory halves the batch (as
    timm's validate.py does); the row then equals a run at the batch that fits."""
    from aliasscope.sweep import measure

    real, batches = measure._measure, []

    def tight(model, preprocess, task, settings, device, batch):
        batches.append(batch)
        if batch > 1:
            raise OUT_OF_MEMORY[error]()
        return real(model, preprocess, task, settings, device, batch)

    monkeypatch.setattr(measure, "_measure", tight)
    settings = SweepSettings(str(images), num_images=2, transforms=("translate_x",), layer_transforms=(),
                             batch_size=4, allow_random=True)  # fmt: skip
    result = measure_model(Task("test_resnet", "test_resnet", "no_weights"), settings)
    assert result.ok and batches == [4, 2, 1]
    assert (result.row["batch_size"], result.row["oom_retries"]) == (1, 2)
    plain = measure_model(Task("test_resnet", "test_resnet", "no_weights"), replace(settings, batch_size=1))
    assert plain.row["lie_translate_x"] == result.row["lie_translate_x"]


def test_other_errors_are_not_retried(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aliasscope.sweep import measure

    batches = []

    def wrong(model, preprocess, task, settings, device, batch):
        batches.append(batch)
        raise ValueError("mat1 and mat2 shapes cannot be multiplied (memory of a shape)")

    monkeypatch.setattr(measure, "_measure", wrong)
    settings = SweepSettings(str(images), num_images=2, transforms=("translate_x",), layer_transforms=(),
                             batch_size=4, allow_random=True)  # fmt: skip
    result = measure_model(Task("test_resnet", "test_resnet", "no_weights"), settings)
    assert batches == [4] and result.row["status"] == "failed" and "mat1 and mat2" in result.row["error"]
    assert not measure.is_out_of_memory(ValueError("out of range"))


def test_a_killed_sweep_rerun_on_dask_gives_the_uninterrupted_table(
    images: Path, tmp_path: Path, nets: str
) -> None:
    """Six small random-init timm models, one whose worker process dies the first time, one that raises
    and one that waits to be released: the sweep (CLI, a local cluster of 2 workers) is killed mid-run
    (the waiting model keeps it from finishing, however fast the machine), re-run, and then equals an
    uninterrupted in-process run, every model present exactly once."""
    import signal
    import subprocess
    import time

    pytest.importorskip("distributed")
    timm_models = [
        "test_resnet",
        "test_convnext",
        "test_efficientnet",
        "test_vit",
        "test_byobnet",
        "test_nfnet",
    ]
    models = [*timm_models[:3], f"{nets}:dies_once", *timm_models[3:], f"{nets}:gate", f"{nets}:broken"]
    out = tmp_path / "cluster"
    argv = [sys.executable, "-m", "aliasscope.cli", "sweep", "--models", *models, "--images", str(images),
            "--out", str(out), "--num-images", "2", "--transforms", "translate_x", "rotate",
            "--layer-transforms", "--allow-random", "--threads", "1", "--workers", "2", "--retries", "1",
            "--quiet", "--no-report"]  # fmt: skip
    sweep = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stored = lambda: [p for p in (out / "models").glob("*") if not p.name.startswith(".")]  # noqa: E731
    deadline = time.monotonic() + 240
    while len(stored()) < 2 and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and its workers, mid-run
    _, err = sweep.communicate()
    assert sweep.returncode == -signal.SIGKILL, err.decode()[-2000:]
    before = len(stored())
    assert 2 <= before < len(models), "the sweep finished before it could be killed"
    assert f"{nets}:gate" not in Store(out).names()
    (tmp_path / "release").touch()

    log: list[str] = []
    settings = SMALL | {"layer_transforms": [], "transforms": ["translate_x", "rotate"]}
    cluster = run_sweep(models, images, out, **settings, workers=2, retries=1, log=log.append)
    assert any(f"resuming: {before} models already" in line for line in log), log
    assert list(cluster["requested"]) == models and len(Store(out).names()) == len(models)
    assert list(cluster["status"]) == ["ok"] * 8 + ["failed"]
    assert (tmp_path / "killed-once").exists()  # a worker really died (in the first run or the second)
    assert cluster["worker_pid"].nunique() >= 2 and os.getpid() not in set(cluster["worker_pid"])
    local = run_sweep(models, images, tmp_path / "local", **settings, log=lambda _: None)
    stable = [c for c in cluster.columns if c not in VOLATILE]
    a, b = cluster[stable], local[stable]
    assert a.equals(b), a.compare(b) if a.shape == b.shape else (a.columns, b.columns)


def test_store_writes_a_model_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path)
    row = {"requested": "a/b:c", "model": "m", "status": "ok", "lie_translate_x": 0.5}
    result = ModelResult(row, values=[{"requested": "a/b:c", "transform": "translate_x", "value": 0.5}])
    real = os.replace

    def crash(*args: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.write(result)
    assert not store.has("a/b:c") and store.names() == [] and list(store.models.iterdir()) == []
    monkeypatch.setattr(os, "replace", real)
    store.write(result)
    store.write(ModelResult(row | {"lie_translate_x": 0.25}))  # replaces the stored model
    assert store.names() == ["a/b:c"] and store.status("a/b:c") == "ok"
    assert merge(tmp_path)["lie_translate_x"].tolist() == [0.25]


def test_architecture_types() -> None:
    import timm

    class Hybrid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    with torch.device("meta"):
        assert architecture_type(smooth_cnn()) == "CNN"
        assert architecture_type(timm.create_model("test_efficientnet")) == "CNN"  # SE gates are no attention
        assert architecture_type(timm.create_model("test_vit")) == "ViT"
        assert architecture_type(timm.create_model("test_maxvit")) == "hybrid"
        assert architecture_type(timm.create_model("mixer_s32_224")) == "Mixer-MLP"
    assert architecture_type(Hybrid()) == "hybrid"


def test_fit_statistics_on_exact_relations() -> None:
    from aliasscope.sweep.figures import fit_statistics

    x = np.linspace(0.5, 0.8, 12)
    up = fit_statistics(x, 3 * x - 1, resamples=200)
    assert up["n"] == 12 and up["r2"] == pytest.approx(1) and up["rho"] == pytest.approx(1)
    assert up["r2_low"] == pytest.approx(1) and up["rho_low"] == pytest.approx(1)
    down = fit_statistics(x, np.exp(-10 * x), resamples=200)  # monotone, not linear
    from scipy.stats import linregress

    assert down["rho"] == pytest.approx(-1) and down["r2"] < 0.9
    assert down["r2"] == pytest.approx(linregress(x, np.exp(-10 * x)).rvalue ** 2)
    assert math.isnan(fit_statistics(x[:2], x[:2])["r2"])
    noise = fit_statistics(*np.random.default_rng(0).normal(size=(2, 200)), resamples=200)
    assert noise["r2"] < 0.05 and noise["rho_low"] < 0 < noise["rho_high"]


def test_cli_errors_name_the_problem(tmp_path: Path, images: Path, capsys: pytest.CaptureFixture) -> None:
    from aliasscope.cli import build_parser

    def run(*argv: str) -> object:
        args = build_parser().parse_args(["sweep", *argv])
        return args.func(args)

    with pytest.raises(ValueError, match="needs --models and --images"):
        run("--out", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds no sweep"):
        run("--merge", "--out", str(tmp_path / "empty"))
    with pytest.raises(SystemExit):
        run("--models", "test_resnet", "--images", str(images), "--transforms", "twirl")
    assert "invalid choice: 'twirl'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown transforms"):
        run_sweep("test_resnet", images, tmp_path, transforms=["twirl"])
    with pytest.raises(ValueError, match="num_images must be a positive integer"):
        run_sweep("test_resnet", images, tmp_path, num_images=0)
    with pytest.raises(ValueError, match="not both"):
        run_sweep("test_resnet", images, tmp_path, workers=2, address="tcp://127.0.0.1:1")


def test_ctrl_c_says_what_is_stored_and_how_to_resume(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from aliasscope.cli import main
    from aliasscope.sweep import run as sweep_run

    def one_then_ctrl_c(todo, settings, write, **_: object) -> None:
        write(measure_model(todo[0], settings))
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_run, "run_tasks", one_then_ctrl_c)
    argv = ["sweep", "--models", "test_resnet", "test_vit", "--images", str(images), "--out", str(tmp_path),
            "--num-images", "2", "--transforms", "translate_x", "--layer-transforms", "--allow-random",
            "--quiet", "--no-report"]  # fmt: skip
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"interrupted; 1 models are stored in {tmp_path}: the same command resumes" in err, err
    assert Store(tmp_path).names() == ["test_resnet"]
