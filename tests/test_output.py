"""Output folders: written whole or not at all, one run at a time, saying what produced them."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_inputs import LEAN, PROVENANCE, TINY, photos

from aliasscope import _output as output
from aliasscope import cli, figures
from aliasscope._output import (
    MANIFEST,
    Interrupted,
    OutputBusyError,
    OutputError,
    OutputLock,
    is_output_folder,
    output_folder,
)
from aliasscope.models import load_model, weights_source
from aliasscope.results import rows_to_csv

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> content)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _siblings(folder: Path) -> list[str]:
    """What lies beside ``folder`` besides it (partial folders, lock files, moved-aside outputs)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def _write(out, files: dict[str, str]) -> None:
    out.provenance.update(model="m", weights="random init")
    for name, text in files.items():
        out.write_text(name, text)


# --------------------------------------------------------------------------------------------------
# The CSV writer and the weights
# --------------------------------------------------------------------------------------------------


def test_rows_to_csv_appends_constant_columns_after_the_rows_own() -> None:
    rows = [{"model": "original", "x": 1}, {"model": "blurpool", "x": 2}]
    text = rows_to_csv(rows, constant_columns={"model": "resnet18", "weights": "random init", "seed": 0})
    table = list(csv.DictReader(text.splitlines()))
    assert list(table[0]) == ["model", "x", "run_model", "weights", "seed"]
    assert [r["model"] for r in table] == ["original", "blurpool"]  # the rows' own column wins
    assert {r["run_model"] for r in table} == {"resnet18"} and {r["weights"] for r in table} == {
        "random init"
    }
    assert rows_to_csv(rows) == "model,x\noriginal,1\nblurpool,2\n"  # unchanged without them


def test_load_model_says_where_the_weights_came_from(tmp_path: Path) -> None:
    model, _ = load_model("test_efficientnet", pretrained=False)
    assert weights_source(model) == "random init"
    ckpt = tmp_path / "test_efficientnet.pth"
    torch.save(model.state_dict(), ckpt)
    loaded, _ = load_model(str(ckpt))
    assert weights_source(loaded) == f"checkpoint {ckpt.resolve()}"
    assert "aliasscope_weights" not in loaded.state_dict()
    assert weights_source(torch.nn.Linear(2, 2)) == "unknown"


# --------------------------------------------------------------------------------------------------
# OutputFolder: commit and roll back
# --------------------------------------------------------------------------------------------------


def test_output_folder_commits_everything_at_once(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with output_folder(target, command=["aliasscope", "test"]) as out:
        _write(out, {"a.csv": "x\n", "sub/b.txt": "hello"})
        assert not target.exists()  # nothing at --out while the run goes on
        assert out.path.parent == tmp_path and out.path.name == f".out.partial-{os.getpid()}"
        assert (out.path / "sub" / "b.txt").read_text() == "hello"
        assert out.lock.path == tmp_path / ".out.lock" and out.lock.path.read_text().strip() == str(
            os.getpid()
        )
    assert sorted(_snapshot(target)) == ["a.csv", MANIFEST, "sub/b.txt"]
    assert _siblings(target) == []  # partial folder moved, lock file removed
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["files"] == [{"path": "a.csv", "bytes": 2}, {"path": "sub/b.txt", "bytes": 5}]
    assert manifest["status"] == "complete" and manifest["command"] == "aliasscope test"
    assert manifest["model"] == "m" and manifest["weights"] == "random init"
    assert is_output_folder(target)
    assert out.describe() == "a.csv, manifest.json and sub/ (3 files)"


def test_output_folder_rolls_back_on_an_error(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), output_folder(target) as out:
        _write(out, {"a.csv": "x\n"})
        raise RuntimeError("boom")
    assert not target.exists() and _siblings(target) == []
    with OutputLock(tmp_path / ".out.lock"):  # released
        pass


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_an_earlier_output_is_replaced_whole(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    with output_folder(target) as out:
        _write(out, {"a.csv": "first\n", "stale.csv": "old\n", "figures/f.png": "png"})
    with output_folder(target) as out:
        assert out.replaces
        _write(out, {"a.csv": "second\n"})
        assert (target / "stale.csv").exists()  # the earlier output stays complete until the commit
    assert _snapshot(target).keys() == {"a.csv", MANIFEST}
    assert (target / "a.csv").read_text() == "second\n" and _siblings(target) == []


def test_an_error_leaves_the_earlier_output_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with output_folder(target) as out:
        _write(out, {"a.csv": "first\n"})
    before = _snapshot(target)
    with pytest.raises(ValueError), output_folder(target) as out:
        _write(out, {"a.csv": "second\n", "b.csv": "new\n"})
        raise ValueError("bad image")
    assert _snapshot(target) == before and _siblings(target) == []


def test_an_empty_folder_is_used_and_a_foreign_one_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with output_folder(empty) as out:
        _write(out, {"a.csv": "x\n"})
    assert is_output_folder(empty)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(
        OutputError, match="not an aliasscope output folder.*choose another --out or remove it"
    ):
        output_folder(mine).__enter__()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        output_folder(tmp_path / "file").__enter__()
    (mine / MANIFEST).write_text("{not json")  # a manifest that is not ours does not count
    with pytest.raises(OutputError):
        output_folder(mine).__enter__()
    assert _snapshot(mine) == {MANIFEST: b"{not json", "thesis.tex": b"precious"}
    assert _siblings(mine) == [] and _siblings(tmp_path / "file") == []  # lock given back


def test_what_killed_runs_left_is_tidied(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with output_folder(target) as out:
        _write(out, {"a.csv": "earlier\n"})
    # a run killed (SIGKILL) between moving the earlier output aside and moving its own in
    target.rename(tmp_path / ".out.old-99999")
    (tmp_path / ".out.partial-99999").mkdir()
    (tmp_path / ".out.partial-99999" / "half.csv").write_text("x")
    (tmp_path / ".out.lock").write_text("99999\n")  # its lock file (no process holds the flock)
    with output_folder(target) as out:
        assert out.replaces  # the earlier output was put back first
        assert _siblings(target) == [".out.lock", f".out.partial-{os.getpid()}"]
        _write(out, {"b.csv": "new\n"})
    assert _snapshot(target).keys() == {"b.csv", MANIFEST} and _siblings(target) == []


def test_keyboard_interrupt_rolls_back_and_says_so(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(Interrupted) as exc, output_folder(target) as out:
        _write(out, {"a.csv": "x\n"})
        raise KeyboardInterrupt
    assert exc.value.message == f"interrupted; nothing was written to {target}"
    assert not target.exists() and _siblings(target) == []
    with output_folder(target) as out:
        _write(out, {"a.csv": "x\n"})
    before = _snapshot(target)
    with pytest.raises(Interrupted) as exc, output_folder(target) as out:
        _write(out, {"a.csv": "y\n"})
        raise KeyboardInterrupt
    assert (
        exc.value.message
        == f"interrupted; nothing was written, the earlier output in {target} was left as it was"
    )
    assert _snapshot(target) == before
    with pytest.raises(Interrupted) as exc, output_folder(target) as out:  # after the commit
        _write(out, {"a.csv": "z\n"})
        out.commit()
        raise KeyboardInterrupt
    assert exc.value.message == f"interrupted after the run had finished; {target} holds its complete output"
    assert (target / "a.csv").read_text() == "z\n"


def test_ctrl_c_during_the_commit_is_held_back_until_the_folder_is_in_place(
    tmp_path: Path, monkeypatch
) -> None:
    target = tmp_path / "out"
    with output_folder(target) as out:
        _write(out, {"a.csv": "first\n", "b.csv": "first\n"})

    def exchange_interrupted(a: Path, b: Path) -> bool:
        signal.raise_signal(signal.SIGINT)  # Ctrl-C right in the middle of the swap
        return False

    monkeypatch.setattr(output, "_exchange", exchange_interrupted)
    with pytest.raises(Interrupted, match="holds its complete output"), output_folder(target) as out:
        _write(out, {"a.csv": "second\n"})
    assert _snapshot(target).keys() == {"a.csv", MANIFEST} and (target / "a.csv").read_text() == "second\n"
    assert _siblings(target) == []


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_at_once(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with output_folder(target) as out:
        _write(out, {"a.csv": "x\n"})
        t0 = time.monotonic()
        with pytest.raises(OutputBusyError) as exc, output_folder(target):
            pass
        assert time.monotonic() - t0 < 1
        assert exc.value.pid == os.getpid()
        assert str(exc.value) == (
            f"another aliasscope run (pid {os.getpid()}) is writing into {target}; wait for it to finish "
            "or choose another --out"
        )
        assert out.path.is_dir()  # the refused run did not touch the running one's folder
    assert _snapshot(target).keys() == {"a.csv", MANIFEST}


def test_the_lock_without_fcntl_detects_live_and_stale_holders(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(output, "fcntl", None)
    path = tmp_path / ".out.lock"
    with OutputLock(path, "out"):
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(OutputBusyError, match=rf"pid {os.getpid()}\)"):
            OutputLock(path, "out").acquire()
    assert not path.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(f"{dead.pid}\n")  # left by a process that is gone
    with OutputLock(path, "out"):
        assert path.read_text().strip() == str(os.getpid())
    assert not path.exists()


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def _argv(tmp_path: Path, *extra: str, quiet: bool = True) -> list[str]:
    imgs = tmp_path / "imgs"
    if not imgs.exists():
        photos(imgs, 2)
    tiny = TINY if quiet else [a for a in TINY if a != "--quiet"]
    return ["diagnose", *tiny, "--images", str(imgs), "--out", str(tmp_path / "out"), *extra]


WROTE = re.compile(r"wrote (.*) into (.*)/ \(\d+\.\d s\)")


def test_a_second_run_with_fewer_outputs_leaves_no_stale_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    first = ["--layerwise", "--layer-transforms", "translate_x", "--no-spectral", "--no-report"]
    assert cli.main(_argv(tmp_path, *first, quiet=False)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert WROTE.fullmatch(line).groups() == (
        "layers.csv, metrics.csv, per_image.csv, summary.json and manifest.json (5 files)",
        str(out),
    )
    assert cli.main(_argv(tmp_path, *LEAN, quiet=False)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert WROTE.fullmatch(line).groups() == (
        "metrics.csv, per_image.csv, summary.json and manifest.json (4 files)",
        str(out),
    )
    assert sorted(_snapshot(out)) == [MANIFEST, "metrics.csv", "per_image.csv", "summary.json"]  # no layers
    assert _siblings(out) == []


def test_the_final_line_names_the_report_and_the_figures(tmp_path: Path, capsys) -> None:
    extra = ["--no-layerwise", "--no-spectral", "--report", "--where-images", "0"]
    assert cli.main(_argv(tmp_path, *extra, quiet=False)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    written = _snapshot(tmp_path / "out")
    figures = [f"figures/{k}.{s}" for k in ("transforms", "lie_distribution") for s in ("png", "svg")]
    assert sorted(written) == sorted(
        [MANIFEST, *figures, "metrics.csv", "per_image.csv", "report.html", "summary.json"]
    )
    listed = (
        f"metrics.csv, per_image.csv, report.html, summary.json, manifest.json and figures/ "
        f"({len(written)} files)"
    )
    assert WROTE.fullmatch(line).group(1) == listed
    page = written["report.html"].decode()
    names = "metrics.csv, per_image.csv, summary.json, manifest.json, figures/"
    assert f"Files next to this report: {names}." in page
    assert "Weights: random init" in page


def test_a_folder_that_is_not_an_aliasscope_output_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(_argv(tmp_path, *LEAN)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"aliasscope: error: --out {out} exists and is not an aliasscope output folder (it has files but "
        "no manifest.json); choose another --out or remove it"
    ]
    assert _snapshot(out) == {"notes.txt": b"mine"} and _siblings(out) == []


def test_a_run_into_a_busy_folder_exits_2(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    loaded = []
    monkeypatch.setattr(cli, "_load", lambda args: loaded.append(args))  # must not even load the model
    with OutputLock(tmp_path / ".out.lock"):
        assert cli.main(_argv(tmp_path, *LEAN)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"aliasscope: error: another aliasscope run (pid {os.getpid()}) is writing into {out}; wait for it "
        "to finish or choose another --out"
    ]
    assert loaded == [] and not out.exists()
    monkeypatch.undo()
    assert cli.main(_argv(tmp_path, *LEAN)) == 0  # free again


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-an-earlier-output"])
def test_ctrl_c_mid_run_exits_130_and_leaves_the_folder_as_it_was(
    tmp_path: Path, capsys, monkeypatch, earlier: bool
) -> None:
    out = tmp_path / "out"
    if earlier:
        assert cli.main(_argv(tmp_path, *LEAN)) == 0
    before = _snapshot(out) if earlier else None
    capsys.readouterr()
    seen = []

    def interrupted(diagnosis, folder, progress=True):
        seen.append(sorted(_snapshot(folder.parent)))  # the run had written into its partial folder
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "draw_figures", interrupted)
    assert cli.main(_argv(tmp_path, "--layerwise", "--no-spectral", "--report")) == 130
    assert seen == [["layers.csv", "metrics.csv", "per_image.csv"]]
    captured = capsys.readouterr()
    if earlier:
        expected = (
            f"aliasscope: interrupted; nothing was written, the earlier output in {out} was left as it was"
        )
        assert _snapshot(out) == before
    else:
        expected = f"aliasscope: interrupted; nothing was written to {out}"
        assert not out.exists()
    assert captured.err.splitlines() == [expected] and captured.out == ""
    assert _siblings(out) == []


def test_the_manifest_and_every_file_say_what_produced_them(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = _argv(tmp_path, *LEAN, "--generator", "paper", "--seed", "3", "--json")
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / MANIFEST).read_text())
    imgs = str((tmp_path / "imgs").resolve())
    expected = {
        "model": "test_efficientnet",
        "weights": "random init",
        "images": imgs,
        "num_images": 2,
        "generator": "paper",
        "dtype": "float32",
        "device": "cpu",
        "seed": 3,
        "aliasscope_version": cli.__version__,
    }
    assert {k: manifest[k] for k in expected} == expected
    assert manifest["format"] == output.FORMAT and manifest["status"] == "complete"
    assert manifest["argv"] == ["aliasscope", *argv] and manifest["command"].startswith(
        "aliasscope diagnose "
    )
    assert manifest["versions"] == cli._versions()
    assert manifest["started"] <= manifest["finished"] and manifest["seconds"] >= 0
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.name != MANIFEST}
    assert manifest["files"] == [{"path": n, "bytes": sizes[n]} for n in sorted(sizes)]

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert list(rows[0]) == ["image", "file", "translate_x", "rotate", *PROVENANCE]
    assert all({k: r[k] for k in expected} == {k: str(v) for k, v in expected.items()} for r in rows)

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[-1] == "provenance" and list(summary)[0] == "model"  # added after the old keys
    assert summary["provenance"] == {**expected, "versions": cli._versions(), "command": manifest["command"]}
    assert printed == summary


def test_fix_writes_its_folder_the_same_way(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(_argv(tmp_path, *LEAN)) == 0  # an earlier diagnose output, replaced whole
    argv = ["fix", *[a for a in TINY if a != "--quiet"], "--transforms", "translate_x"]
    argv += ["--images", str(tmp_path / "imgs"), "--out", str(out), "--fix", "blurpool"]
    assert cli.main([*argv, "--layer-images", "0", "--spectral-images", "0"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    names = "changes.csv, comparison.csv, comparison.json, comparison.png, comparison.svg and manifest.json"
    assert WROTE.fullmatch(line).groups() == (f"{names} (6 files)", str(out))
    assert sorted(_snapshot(out)) == sorted(n.strip() for n in names.replace(" and ", ", ").split(","))
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["model"] for r in rows] == ["original", "blurpool"]
    assert {r["run_model"] for r in rows} == {"test_efficientnet"} and {r["weights"] for r in rows} == {
        "random init"
    }
    assert list(rows[0])[-len(PROVENANCE) :] == ["run_model", *PROVENANCE[1:]]
    data = json.loads((out / "comparison.json").read_text())
    assert list(data) == ["settings", "rows", "by_kind", "provenance"]
    assert data["provenance"]["model"] == "test_efficientnet"
    assert json.loads((out / MANIFEST).read_text())["argv"][:2] == ["aliasscope", "fix"]


def test_a_real_run_locks_its_folder_and_ctrl_c_leaves_the_earlier_output(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(_argv(tmp_path, *LEAN)) == 0
    before = _snapshot(out)
    argv = _argv(tmp_path, "--layer-transforms", "translate_x", "--upsample", "2", "--spectral-images", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aliasscope.cli", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell without job control starts background jobs with SIGINT ignored; this run must get it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    partial = tmp_path / f".out.partial-{proc.pid}"
    deadline = time.monotonic() + 120
    try:
        while not partial.exists():  # the run has started writing (a full run takes several seconds)
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never created its partial folder"
            time.sleep(0.005)
        capsys.readouterr()
        assert cli.main(_argv(tmp_path, *LEAN)) == 2  # a second run, here, while that one is writing
        assert f"another aliasscope run (pid {proc.pid}) is writing into {out};" in capsys.readouterr().err
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines() == [
        f"aliasscope: interrupted; nothing was written, the earlier output in {out} was left as it was"
    ]
    assert _snapshot(out) == before and _siblings(out) == []


def test_an_output_written_before_manifests_is_recognised(tmp_path: Path) -> None:
    """Folders of earlier aliasscope versions (no manifest.json) are replaced, not refused."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "summary.json").write_text('{"model": "m", "versions": {"aliasscope": "0.1.0"}}')
    (old / "layers.csv").write_text("stale\n")
    assert is_output_folder(old)
    with output_folder(old) as out:
        _write(out, {"a.csv": "x\n"})
    assert sorted(p.name for p in old.iterdir()) == ["a.csv", MANIFEST]
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text('{"versions": {"numpy": "2"}}')  # not ours
    assert not is_output_folder(other)
