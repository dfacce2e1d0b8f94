"""Coverage of the timm zoo: does each architecture go through capture, the exact decomposition, the
end-to-end Lie derivative and the spectral measures?

    python analyses/zoo_coverage.py [--small] [--chunk 0/10] [--names 'vit_*'] [--limit K]
        [--timeout 120] [--max-params 100e6] [--device cpu|cuda] [--dtype float64|float32]
        [--jobs N] [--large-device cuda [--large-dtype float64] [--large-timeout 300] [--large-jobs 1]]
        [--stop-after SECONDS] [--out figures/zoo_coverage/coverage.csv]
    python analyses/zoo_coverage.py --summary [--out ...]

Each architecture of ``timm.list_models()`` is built at random init (eval mode; timm's zero-init
heads and last-BatchNorms undone as in :func:`common.undo_zero_init`, else the Lie derivative of the
logits is 0) and fed ONE seeded ``randn`` image, in its own spawned subprocess with a wall-clock budget
(``--timeout``), so that a hang, an out-of-memory kill or a segfault is recorded and the sweep goes
on. Stages, each in its own try/except (a failed stage does not stop the later ones):

1. ``capture``: ``aliasscope.record`` around one forward pass;
2. ``decompose``: ``aliasscope.decompose(model, x, t, target="pred", output="logits", verify=None)``
   for ``t`` in translate_x and rotate (completeness only; the jvp self-check is left out so that
   this stage tests the decomposition alone);
3. ``lie``: ``aliasscope.lie_derivative(model, x, "translate_x")``;
4. ``spectral``: ``aliasscope.spectral(model, x, select="nonlinearity")``, or on every op when the
   capture found no op of kind ``nonlinearity`` (the activations all inside fused modules: FRN/TLU,
   EvoNorm, a ViT with no MLP activation).

The sweep is resumable (architectures already in the CSV are skipped) and appends one row per
finished architecture (flushed and fsynced: a kill loses at most the running ones). ``--jobs N`` runs
N architectures at a time (one subprocess each, one torch thread each by default); only the parent
writes the CSV. ``--large-device cuda`` sends every architecture over ``--max-params`` (those skipped
in this run and ``skipped-too-large`` rows already in the CSV) to that device, ``--large-jobs`` at a time, in
``--large-dtype`` (float64 by default, so that completeness stays comparable), and its row replaces
the skipped one. ``--stop-after S`` starts nothing after S seconds and kills what still runs at S
(those rows are not written: a later run picks them up), for runs inside a fixed time slot.

Columns of the CSV:

architecture
    The timm model name.
family_group
    CNN / ViT / hybrid / MLP, from the module classes present (:func:`family_group`): self-attention
    modules (class names with ``Attention``/``Attn``, channel/spatial gates such as SE, CBAM, SK,
    ResNeSt's split attention excluded; ``nn.MultiheadAttention``) and no convolution outside the stem
    / patch embedding / attention modules -> ViT; attention and such convolutions -> hybrid; no
    attention and token-mixing MLP or recurrent blocks (timm modules ``mlp_mixer``: mixer, resmlp,
    gmlp; ``sequencer``) -> MLP; else CNN. A heuristic: read it as a grouping, not a taxonomy.
family
    The timm module the architecture is defined in (``resnet``, ``vision_transformer``, ...).
input_size
    ``HxW`` of the image used: the default ``input_size`` of its pretrained config, or with
    ``--small`` the first of 64, 96, 128, 160, 224 that a plain forward accepts (models without
    ``fixed_input_size``; otherwise, or when none does, the default).
params
    Number of parameters.
status
    ``ok`` (every stage ran), the first failed stage (``create``, ``capture``, ``decompose``, ``lie``,
    ``spectral``), ``timeout`` (over ``--timeout`` seconds; ``error`` names the stage it was in),
    ``crashed`` (the subprocess died: segfault, out-of-memory kill; exit code in ``error``) or
    ``skipped-too-large`` (more than ``--max-params`` parameters).
ops
    Number of recorded ops (capture stage).
collapsed
    Number of collapsed regions: recorded ops of kind ``block`` (regions whose layouts are unknown,
    recorded whole).
completeness
    The decomposition's ``completeness_error`` (``||total - sum_i c_i|| / ||total||``), the larger
    of the two transforms.
completeness_mass
    ``completeness_error_mass``: the same residual relative to ``max(||total||, ||sum_i |c_i| ||)``,
    meaningful when the total cancels (an exactly invariant random net); the larger of the two
    transforms. The summary's "exact" share reads this column (rows written before it existed fall
    back to ``completeness``, an upper bound of it).
leak
    :attr:`Decomposition.leak`: the share of ``sum_i |c_i|`` on ops of kinds ``layout`` and
    ``residual`` (ops that only move data, and residual adds, which carry no Lie derivative of their
    own when every layout is known); the larger of the two transforms.
seconds
    Wall-clock seconds of the architecture's subprocess work (model build included).
peak_mem_mb
    CPU: growth of the subprocess's peak RSS (``ru_maxrss``) from before the model was built; CUDA:
    ``torch.cuda.max_memory_allocated``. MiB.
dtype, device
    What the model ran in.
error
    ``stage: ExceptionType: first line of the message`` for every failed stage, joined by `` | ``.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import math
import multiprocessing as mp
import os
import re
import resource
import signal
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

COLUMNS = [
    "architecture",
    "family_group",
    "family",
    "input_size",
    "params",
    "status",
    "ops",
    "collapsed",
    "completeness",
    "completeness_mass",
    "leak",
    "seconds",
    "peak_mem_mb",
    "dtype",
    "device",
    "error",
]
STAGES = ("create", "capture", "decompose", "lie", "spectral")
TRANSFORMS = ("translate_x", "rotate")
SMALL_SIZES = (64, 96, 128, 160, 224)
LEAK_KINDS = ("layout", "residual")
GROUPS = ("CNN", "ViT", "hybrid", "MLP")
MLP_MODULES = {"mlp_mixer", "sequencer"}
NOT_SELF_ATTENTION = {
    "ChannelAttn",
    "SpatialAttn",
    "LightChannelAttn",
    "LightSpatialAttn",
    "SplitAttn",
    "SelectiveKernelAttn",
    "CoordAttn",
    "SimpleCoordAttn",
    "ChannelAttention",
    "ChannelAttentionV2",
    "SpatialAttention",
    "BilinearAttnTransform",
    "StripAttn",
}
STEM_PATHS = ("stem", "patch_embed", "pos_embed", "conv_stem", "downsample_layers.0")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "figures" / "zoo_coverage" / "coverage.csv"


# ---------------------------------------------------------------------------------------- selection


def select_architectures(
    names: str | None, chunk: tuple[int, int], limit: int | None, done: set[str]
) -> list[str]:
    """``timm.list_models()`` filtered by fnmatch patterns (comma-separated: any of them), every n-th
    from i, minus ``done``."""
    import timm

    archs = sorted(timm.list_models())
    if names:
        patterns = [p.strip() for p in names.split(",") if p.strip()]
        archs = [a for a in archs if any(fnmatch.fnmatch(a, p) for p in patterns)]
    i, n = chunk
    archs = [a for a in archs[i::n] if a not in done]
    return archs[:limit] if limit is not None else archs


def parse_chunk(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    i, n = (int(v) for v in text.split("/"))
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--chunk {text}: need 0 <= i < n")
    return i, n


# ------------------------------------------------------------------------------------------ the CSV


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows already written (none when the file does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row (header first on a new file), flushed and fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: _cell(row.get(k)) for k in COLUMNS})
        f.flush()
        os.fsync(f.fileno())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("\n", " ")


# ------------------------------------------------------------------------------------------- worker


def error_string(stage: str, err: BaseException) -> str:
    """``stage: ExceptionType: first line of the message``."""
    lines = str(err).strip().splitlines()
    return f"{stage}: {type(err).__name__}: {lines[0] if lines else ''}"[:400]


def family_group(model: Any, module_name: str) -> str:
    """CNN / ViT / hybrid / MLP from the module classes present (see the module docstring)."""
    from torch import nn

    attention_paths = [
        path
        for path, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) or _is_self_attention(type(m).__name__)
    ]
    convs = [
        path
        for path, m in model.named_modules()
        if isinstance(m, nn.Conv1d | nn.Conv2d)
        and not any(s in path for s in STEM_PATHS)
        and not any(path.startswith(a + ".") for a in attention_paths if a)
    ]
    if attention_paths:
        return "hybrid" if len(convs) > 1 else "ViT"  # a lone conv: an unnamed stem
    return "MLP" if module_name in MLP_MODULES else "CNN"


def _is_self_attention(cls: str) -> bool:
    return bool(re.search(r"Attention|Attn", cls)) and cls not in NOT_SELF_ATTENTION and "Pool" not in cls


def pick_input(name: str, model: Any, small: bool, dtype: Any, device: str) -> Any:
    """One seeded randn image at the default input size, or the smallest of SMALL_SIZES that runs."""
    import timm
    import torch

    cfg = timm.get_pretrained_cfg(name)
    c, h, w = cfg.input_size if cfg is not None else (3, 224, 224)
    sizes = [(h, w)]
    if small and not (cfg is not None and cfg.fixed_input_size):
        sizes = [(s, s) for s in SMALL_SIZES if s <= max(h, w)] + sizes
    gen = torch.Generator().manual_seed(0)
    for hh, ww in sizes:
        x = torch.randn(1, c, hh, ww, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        if (hh, ww) == sizes[-1]:
            return x
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception:
            continue
    raise AssertionError("unreachable")


def too_large(name: str, module: str, max_params: float, row: dict[str, Any]) -> bool:
    """Whether ``name`` has more than ``max_params`` parameters, counted on a meta-device build (no
    memory, no init); its params and family group go into ``row``. False when the meta build fails
    (the real build then decides)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:
        return False
    row["params"] = sum(p.numel() for p in model.parameters())
    row["family_group"] = family_group(model, module)
    return row["params"] > max_params


def feature_readout(features: Any) -> Any:
    """A scalar per image from an encoder's (B, ...) features: their dot product with fixed random
    weights (seeded, so the same readout on every run), the target of its decomposition."""
    import torch

    weights = torch.randn(features.shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (features * weights.to(features)).flatten(1).sum(1)


def run_stages(name: str, opts: dict[str, Any], report: Callable[[dict[str, Any]], None]) -> None:
    """Build ``name`` and run every stage, calling ``report(row)`` after each (the row so far)."""
    import timm
    import torch
    from common import undo_zero_init

    import aliasscope as asc

    warnings.simplefilter("ignore")
    torch.set_num_threads(opts["threads"])
    dtype, device = getattr(torch, opts["dtype"]), opts["device"]
    module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    row: dict[str, Any] = {"architecture": name, "family": module, "dtype": opts["dtype"], "device": device}
    errors: list[str] = []
    row["stage"] = "create"
    report(row)
    try:
        if too_large(name, module, opts["max_params"], row):
            row["status"], row["done"] = "skipped-too-large", True
            report(row)
            return
        torch.manual_seed(0)  # the same random init on every run
        model = timm.create_model(name, pretrained=False).eval()
        row["params"] = sum(p.numel() for p in model.parameters())
        row["family_group"] = family_group(model, module)
        undo_zero_init(model)
        model = model.to(device=device, dtype=dtype)
        x = pick_input(name, model, opts["small"], dtype, device)
        row["input_size"] = f"{x.shape[-2]}x{x.shape[-1]}"
    except Exception as err:
        row["status"], row["error"], row["done"] = "create", error_string("create", err), True
        report(row)
        return

    kinds: set[str] = set()
    seen = {"classifier": True}  # (B, classes) outputs; else an encoder: a fixed random readout

    def capture() -> None:
        with asc.record(model) as rec, torch.no_grad():
            seen["classifier"] = model(x).dim() == 2
        row["ops"] = len(rec.ops)
        kinds.update(op.kind for op in rec.ops)
        row["collapsed"] = sum(op.kind == "block" for op in rec.ops)

    def decomposition() -> None:
        errs, mass_errs, leaks = [], [], []
        target = "pred" if seen["classifier"] else feature_readout
        for t in TRANSFORMS:
            d = asc.decompose(model, x, t, target=target, output="logits", verify=None)
            errs.append(d.completeness_error)
            mass_errs.append(d.completeness_error_mass)
            leaks.append(d.leak)
        worst = lambda e: e if math.isfinite(e) else math.inf  # noqa: E731
        row["completeness"] = max(errs, key=worst)
        row["completeness_mass"] = max(mass_errs, key=worst)
        row["leak"] = max(leaks)

    def lie() -> None:
        output = "logits" if seen["classifier"] else feature_readout
        asc.lie_derivative(model, x, "translate_x", output=output)

    def spectrum() -> None:
        if not kinds or "nonlinearity" in kinds:
            asc.spectral(model, x, select="nonlinearity")
        else:  # every nonlinearity sits inside a fused module (FRN/TLU, EvoNorm): measure every op
            asc.spectral(model, x)

    for stage, fn in zip(STAGES[1:], (capture, decomposition, lie, spectrum), strict=True):
        row["stage"] = stage
        report(row)
        try:
            fn()
        except Exception as err:
            errors.append(error_string(stage, err))
            row.setdefault("status", stage)
            row["error"] = " | ".join(errors)
    row.setdefault("status", "ok")
    row["done"] = True
    report(row)


def worker(name: str, opts: dict[str, Any], conn: Any) -> None:
    """Subprocess entry: run the stages, sending the row so far after each, with time and memory."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    start, rss0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def report(row: dict[str, Any]) -> None:
        row["seconds"] = time.perf_counter() - start
        row["peak_mem_mb"] = _peak_mb(opts["device"], rss0)
        conn.send(dict(row))

    run_stages(name, opts, report)
    conn.close()


def _peak_mb(device: str, rss0_kb: int) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0_kb) / 1024


# ------------------------------------------------------------------------------------------- driver


def run_one(
    name: str, opts: dict[str, Any], timeout: float, stop_at: float = math.inf
) -> dict[str, Any] | None:
    """Run one architecture in a spawned subprocess; the row, with timeout / crash recorded; None when
    it was still running at ``stop_at`` (a ``time.perf_counter()`` value) and was killed."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=worker, args=(name, opts, child), daemon=True)
    start = time.perf_counter()
    proc.start()
    child.close()
    row: dict[str, Any] = {"architecture": name}
    deadline = min(start + timeout, stop_at)
    try:
        while (left := deadline - time.perf_counter()) > 0:
            if parent.poll(min(left, 1.0)):
                try:
                    row = parent.recv()
                except EOFError:  # the subprocess ended
                    break
            elif not proc.is_alive():
                break
    finally:  # also on SIGTERM / Ctrl-C of the sweep: leave no subprocess behind
        timed_out = proc.is_alive()
        if timed_out:
            proc.kill()
        proc.join()
    stage = row.pop("stage", "create")
    if not row.pop("done", False):
        if timed_out and time.perf_counter() >= stop_at and start + timeout > stop_at:
            return None
        if timed_out:
            row["status"], why = "timeout", f"timeout after {timeout:g} s"
        else:
            row["status"], why = "crashed", f"subprocess died (exit code {proc.exitcode})"
        row["error"] = " | ".join(e for e in (row.get("error"), f"{stage}: {why}") if e)
        row["seconds"] = time.perf_counter() - start
    return row


def sweep(
    archs: list[str],
    opts: dict[str, Any],
    timeout: float,
    out: Path,
    jobs: int = 1,
    large: dict[str, Any] | None = None,
    rerun: Iterable[str] = (),
    stop_after: float = math.inf,
) -> None:
    """Run every architecture, ``jobs`` at a time, writing each finished row to ``out`` (this thread
    only), with a progress bar. With ``large`` (opts plus ``timeout``), rows skipped as too large in
    this run, and the architectures ``rerun`` (skipped in an earlier one), are run with those opts,
    ``large["jobs"]`` at a time."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    stop_at = time.perf_counter() + stop_after
    rerun = list(rerun) if large else []
    counts: Counter[str] = Counter()
    bar = Progress(len(archs) + len(rerun))
    with (
        ThreadPoolExecutor(jobs) as small_pool,
        ThreadPoolExecutor(large.get("jobs", 1) if large else 1) as large_pool,
    ):

        def submit_large(name: str) -> Any:
            return large_pool.submit(run_one, name, large, large["timeout"], stop_at)

        pending = {small_pool.submit(run_one, a, opts, timeout, stop_at): a for a in archs}
        pending |= {submit_large(a): a for a in rerun}
        done = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                name = pending.pop(fut)
                row = fut.result()
                if row is None:  # killed at --stop-after: not recorded, picked up by the next run
                    continue
                status = row["status"]
                write_row(out, row)
                if large and status == "skipped-too-large" and time.perf_counter() < stop_at:
                    pending[submit_large(name)] = name  # its row is replaced when this run ends
                    bar.grow(1)
                    continue
                done += 1
                counts[status if status in ("ok", "skipped-too-large") else "failed"] += 1
                bar(
                    done, counts, f"{name}: {status} ({row.get('seconds', 0):.0f} s, {row.get('device', '')})"
                )
            if time.perf_counter() >= stop_at:  # the rest was never started: cancel it
                for fut in [f for f in pending if f.cancel()]:
                    pending.pop(fut)


def migrate(path: Path) -> None:
    """Rewrite ``path`` with the current COLUMNS when it was written with others (new columns empty)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        header = next(csv.reader(f), None)
    if header is None or header == COLUMNS:
        return
    _rewrite(path, read_rows(path))


def write_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row``; an earlier row of the same architecture (a size skip now run) is replaced."""
    rows = read_rows(path)
    if not any(r["architecture"] == row["architecture"] for r in rows):
        append_row(path, row)
        return
    _rewrite(path, [row if r["architecture"] == row["architecture"] else r for r in rows])


def _rewrite(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` by ``rows`` under the current COLUMNS, atomically (a temporary file, then
    ``os.replace``)."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    for r in rows:
        append_row(tmp, r)
    os.replace(tmp, path)


class Progress:
    """Progress: tqdm when installed, else one line per finished architecture."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.total = total
        self.bar = tqdm(total=total, unit="model", dynamic_ncols=True) if tqdm is not None else None

    def grow(self, n: int) -> None:
        self.total += n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def __call__(self, done: int, counts: Counter[str], msg: str) -> None:
        skipped = counts["skipped-too-large"]
        if self.bar is None:
            tally = f"ok {counts['ok']} failed {counts['failed']} skipped {skipped} left {self.total - done}"
            print(f"[{done}/{self.total}] {tally}  {msg}", flush=True)
            return
        self.bar.update(1)
        self.bar.set_postfix(ok=counts["ok"], failed=counts["failed"], skipped=skipped)
        self.bar.write(msg)


# ------------------------------------------------------------------------------------------ summary


def summary(rows: list[dict[str, str]], top: int = 10) -> str:
    """Markdown: statuses per family group, the share with float64 completeness <= 1e-9, top errors."""
    statuses = ["ok", *STAGES, "timeout", "crashed", "skipped-too-large"]
    statuses += sorted({r["status"] for r in rows} - set(statuses))
    groups = [g for g in GROUPS if any(r["family_group"] == g for r in rows)]
    groups += sorted({r["family_group"] for r in rows} - set(groups))
    by_group: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        by_group[r["family_group"]][r["status"]] += 1
    used = [s for s in statuses if any(c[s] for c in by_group.values())]
    lines = [
        f"{len(rows)} architectures",
        "",
        "| group | " + " | ".join(used) + " | total | completeness <= 1e-9 (float64) |",
        "|---" * (len(used) + 3) + "|",
    ]
    for g in [*groups, "all"]:
        sel = rows if g == "all" else [r for r in rows if r["family_group"] == g]
        c = Counter(r["status"] for r in sel)
        cells = " | ".join(str(c[s]) for s in used)
        lines.append(f"| {g or '?'} | {cells} | {len(sel)} | {_exact(sel)} |")
    lines += ["", "completeness (float64, where the decomposition ran):", "", _distribution(rows), ""]
    lines += ["| count | error | examples |", "|---|---|---|"]
    for msg, archs in _top_errors(rows)[:top]:
        ex = ", ".join(archs[:3]) + (", ..." if len(archs) > 3 else "")
        lines.append(f"| {len(archs)} | {msg.replace('|', '/')} | {ex} |")
    return "\n".join(lines)


def _completeness(rows: Iterable[dict[str, str]]) -> list[float]:
    """Float64 completeness relative to max(|total|, sum |c_i|); ``completeness`` (an upper bound of
    it) for rows written before that column existed."""
    vals = []
    for r in rows:
        v = r.get("completeness_mass") or r["completeness"]
        if r["dtype"] == "float64" and v:
            vals.append(float(v))
    return vals


def _exact(rows: list[dict[str, str]]) -> str:
    vals = _completeness(rows)
    if not vals:
        return "-"
    n = sum(v <= 1e-9 for v in vals)
    return f"{n}/{len(vals)} ({100 * n / len(vals):.0f}%)"


def _distribution(rows: list[dict[str, str]]) -> str:
    vals = _completeness(rows)
    edges = [1e-15, 1e-12, 1e-9, 1e-6, 1e-3, 1.0, math.inf]
    labels = ["<=1e-15", "<=1e-12", "<=1e-9", "<=1e-6", "<=1e-3", "<=1", ">1 or nan"]
    counts = Counter()
    for v in vals:
        counts[next((lab for e, lab in zip(edges, labels, strict=True) if v <= e), labels[-1])] += 1
    return (
        "| "
        + " | ".join(labels)
        + " |\n"
        + "|---" * len(labels)
        + "|\n| "
        + " | ".join(str(counts[lab]) for lab in labels)
        + " |"
    )


def _top_errors(rows: list[dict[str, str]]) -> list[tuple[str, list[str]]]:
    """Distinct error messages, most frequent first; a message that several stages of one architecture
    raised (a capture failure repeats in decompose and spectral) counts once, as ``stage/stage: msg``."""
    found: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        stages: dict[str, list[str]] = defaultdict(list)
        for msg in filter(None, r["error"].split(" | ")):
            stage, _, text = msg.partition(": ")
            stages[text].append(stage)
        for text, where in stages.items():
            found[f"{'/'.join(where)}: {text}"].append(r["architecture"])
    return sorted(found.items(), key=lambda kv: -len(kv[1]))


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments; print the summary, or sweep."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--small", action="store_true", help="smallest accepted input size")
    p.add_argument("--chunk", type=parse_chunk, default=(0, 1), help="i/n: every n-th architecture from i")
    p.add_argument("--names", help="fnmatch patterns on architecture names, comma-separated")
    p.add_argument("--limit", type=int, help="at most this many (new) architectures")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per architecture")
    p.add_argument("--max-params", type=float, help="default 100e6 on CPU, unlimited on CUDA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float64", "float32"], help="default float64 on CPU, float32 on CUDA")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each subprocess")
    p.add_argument("--jobs", type=int, default=1, help="architectures run at a time")
    p.add_argument("--large-device", help="run architectures over --max-params here (e.g. cuda)")
    p.add_argument("--large-dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--large-timeout", type=float, default=300.0)
    p.add_argument("--large-jobs", type=int, default=1, help="large architectures run at a time")
    p.add_argument("--stop-after", type=float, default=math.inf, help="seconds; then stop (resumable)")
    p.add_argument("--summary", action="store_true", help="print a markdown summary of --out and exit")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run run_one's cleanup
    if args.summary:
        print(summary(read_rows(args.out)))
        return
    cpu = args.device == "cpu"
    opts = {
        "small": args.small,
        "device": args.device,
        "dtype": args.dtype or ("float64" if cpu else "float32"),
        "max_params": args.max_params if args.max_params is not None else (100e6 if cpu else math.inf),
        "threads": args.threads,
    }
    large = None
    if args.large_device:
        large = {**opts, "device": args.large_device, "dtype": args.large_dtype, "max_params": math.inf}
        large["timeout"], large["jobs"] = args.large_timeout, args.large_jobs
    migrate(args.out)
    rows = read_rows(args.out)
    done = {r["architecture"] for r in rows}
    archs = select_architectures(args.names, args.chunk, args.limit, done)
    skipped = {
        r["architecture"]: float(r["params"] or "inf") for r in rows if r["status"] == "skipped-too-large"
    }
    rerun = [a for a in select_architectures(args.names, args.chunk, None, set()) if a in skipped]
    rerun.sort(key=skipped.__getitem__)  # smallest first: the most architectures in a time slot
    print(f"{len(archs)} architectures to run ({len(done)} already in {args.out})", flush=True)
    if large:
        print(f"{len(rerun)} skipped as too large to run on {args.large_device}", flush=True)
    sweep(archs, opts, args.timeout, args.out, args.jobs, large, rerun, args.stop_after)


if __name__ == "__main__":
    main()
