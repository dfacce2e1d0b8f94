"""``aliasscope sweep``: its arguments and what it runs (the heavy imports happen on use)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "sweep_command"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_parser(sub: Any, transforms: list[str], generators: list[str]) -> argparse.ArgumentParser:
    """Add the ``sweep`` sub-command to the ``aliasscope`` parser's sub-parsers."""
    p = sub.add_parser(
        "sweep",
        help="measure many models (timm names, patterns, a file, or the paper's list) into one table",
        description="Resolve model names to current timm names (what was renamed, remapped onto another "
        "model's weights, or is gone: resolution.csv), measure each model on the same images (top-1/5, "
        "the Lie derivative of every transform with 95% intervals, shares by op kind from the exact "
        "decomposition, parameters, FLOPs, seconds, peak memory) and store each finished model at once "
        "(Parquet, atomic): a re-run with the same --out resumes. Merges into sweep.parquet/csv and draws "
        "the paper's figure (Lie derivative against top-1) and sweep.html. In this process by default; "
        "--workers N on a local Dask cluster, --address on a running one.",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="timm names or arch.tag, glob patterns ('vit_*'), hf-hub:org/name, a text file of names (# "
        "comments), or 'paper' (the paper's 483 models)",
    )
    p.add_argument(
        "--images",
        default=None,
        help="labels CSV (file,class_index), or a folder (its labels.csv is used when there is one)",
    )
    p.add_argument("--out", default="aliasscope-sweep", help="the store (default aliasscope-sweep/)")
    p.add_argument("--num-images", type=_positive_int, default=100, help="images per model (100)")
    p.add_argument(
        "--transforms", nargs="+", default=None, choices=transforms, metavar="T", help="default: all"
    )
    p.add_argument(
        "--layer-transforms",
        nargs="*",
        default=["translate_x", "rotate", "scale"],
        choices=transforms,
        metavar="T",
        help="transforms of the exact decomposition by op kind (translate_x rotate scale; none: skip it)",
    )
    p.add_argument("--layer-images", type=_positive_int, default=32, help="images of the decomposition (32)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: from the device")
    p.add_argument("--device", default="cpu", help="cpu or cuda (each worker its own GPU); default cpu")
    p.add_argument(
        "--allow-random",
        action="store_true",
        help="random init where no pretrained weights are bundled or cached (flagged in the table)",
    )
    p.add_argument("--generator", default="central", choices=generators, help="Lie derivative generator")
    p.add_argument("--seed", type=int, default=0, help="seed of random init (plus a per-model offset)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads per model")
    p.add_argument(
        "--workers", type=_positive_int, default=None, help="start a local Dask cluster of N worker processes"
    )
    p.add_argument("--address", default=None, help="join a running Dask scheduler (tcp://host:8786)")
    p.add_argument(
        "--retries", type=int, default=2, help="times a model whose worker died is retried elsewhere (2)"
    )
    p.add_argument("--retry-failed", action="store_true", help="measure stored failed models again")
    p.add_argument("--merge", action="store_true", help="only merge the store at --out (and draw)")
    p.add_argument("--results-csv", default=None, help="timm's results-imagenet.csv: joined by arch.tag")
    p.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw figures/ and sweep.html (default: yes)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=sweep_command)
    return p


def sweep_command(args: argparse.Namespace) -> Any:
    """Run ``aliasscope sweep``; returns the merged table."""
    from .run import merge, run_sweep

    if args.merge:
        if not (Path(args.out) / "models").is_dir():
            raise FileNotFoundError(f"--merge: {args.out} holds no sweep (no models/ folder); pass its --out")
        frame = merge(args.out, args.results_csv)
    else:
        if not args.models or not args.images:
            given = (("--models", args.models), ("--images", args.images))
            missing = " and ".join(name for name, value in given if not value)
            raise ValueError(f"aliasscope sweep needs {missing} (or --merge to merge an existing --out)")
        frame = run_sweep(
            args.models, args.images, args.out, num_images=args.num_images, transforms=args.transforms,
            layer_transforms=args.layer_transforms, layer_images=args.layer_images,
            batch_size=args.batch_size, device=args.device, allow_random=args.allow_random,
            generator=args.generator, seed=args.seed, threads=args.threads, workers=args.workers,
            address=args.address, retries=args.retries, retry_failed=args.retry_failed,
            results_csv=args.results_csv, progress=not args.quiet,
        )  # fmt: skip
    written = ["sweep.parquet", "sweep.csv", "resolution.csv"]
    if args.report and not frame.empty:
        from .report import write_report

        written += write_report(frame, args.out)
    print(f"{len(frame)} models in {args.out}/: {', '.join(written)}")
    return frame
