"""Command line: ``aliasscope diagnose`` measures a model's equivariance on real images, ``fix`` tests
anti-aliasing fixes, ``sweep`` measures many models into one table."""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._output import Interrupted, OutputFolder, interrupted_message, output_folder
from .generators import generator_names
from .transforms import transform_names

DEFAULT_MODEL = "tf_efficientnet_lite0"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _common_arguments(p: argparse.ArgumentParser, transforms: list[str] | None, out: str) -> None:
    """Model, images, transforms, generator, batching, device and output options shared by the
    sub-commands."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a timm name or arch.tag, hf-hub:org/name, torchvision:NAME, transformers:ORG/NAME, or a "
        f"checkpoint (.pth/.pt/.safetensors); default {DEFAULT_MODEL}",
    )
    p.add_argument("--arch", default=None, help="timm architecture of a checkpoint given to --model")
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pretrained weights: bundled, else the model's hub cache or download (default: yes; an error "
        "if they cannot be had, never random weights)",
    )
    p.add_argument(
        "--images",
        default=None,
        help="image folder, image file, or labels CSV (columns file,class_index); "
        "default: photos bundled with scikit-image",
    )
    p.add_argument("--num-images", type=_positive_int, default=None, help="use at most this many images")
    p.add_argument("--every", type=_positive_int, default=1, help="use every k-th image of the source")
    p.add_argument(
        "--transforms",
        nargs="+",
        default=transforms,
        choices=transform_names(),
        metavar="T",
        help=f"transforms to measure (default: {' '.join(transforms) if transforms else 'all'}): "
        f"{', '.join(transform_names())}",
    )
    p.add_argument(
        "--generator",
        default="central",
        choices=generator_names(),
        help="discretisation of the derivative (default: central; 'paper' reproduces the "
        "reference code, 'fourier' is band-limited)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per pass (default: 16 on the CPU; on a GPU 64, 32 or 16 by its free memory)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float64"),
        help="precision of model and images (default float32; float64 for derivative checks)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (probes, shift offsets; default 0)")
    p.add_argument("--out", default=out, help=f"output folder (default {out}/)")


def build_parser() -> argparse.ArgumentParser:
    """The ``aliasscope`` argument parser (one sub-command per job)."""
    parser = argparse.ArgumentParser(
        prog="aliasscope",
        description="Find where a vision model breaks its symmetries: Lie derivatives of image "
        "transformations (Gruver et al., ICLR 2023), measured on real images.",
    )
    parser.add_argument("--version", action="version", version=f"aliasscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    diag = sub.add_parser(
        "diagnose",
        help="measure the end-to-end Lie derivative of a model per transform",
        description="Load a model and images; measure the paper's end-to-end equivariance error "
        "(mean over classes of |L_X softmax|) per image and transform, attribute it to every op by the "
        "exact chain rule (with a completeness check), measure each op's aliasing energy, and write "
        "report.html (self-contained: figures, tables, advice), summary.json, metrics.csv, layers.csv, "
        "spectral.csv and figures/*.png|svg. With no arguments: pretrained tf_efficientnet_lite0 on the "
        "real photos bundled with scikit-image (about a minute on 2 CPU cores).",
    )
    _common_arguments(diag, None, "aliasscope-out")
    diag.add_argument(
        "--layerwise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="attribute the Lie derivative to every op (exact chain rule), write layers.csv (default: yes)",
    )
    diag.add_argument(
        "--layer-transforms",
        nargs="+",
        default=["translate_x", "rotate", "scale"],
        choices=transform_names(),
        metavar="T",
        help="transforms for --layerwise (default: translate_x rotate scale)",
    )
    diag.add_argument(
        "--target",
        default="pred",
        help="what --layerwise attributes: 'pred' (each image's top class, default), a class "
        "index, or 'all' (the whole softmax vector, the paper's setting; slower)",
    )
    diag.add_argument(
        "--spectral",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure aliasing energy per op and join it with the layer attribution: writes spectral.csv "
        "and a rank correlation into summary.json (default: yes)",
    )
    diag.add_argument(
        "--upsample",
        type=_positive_int,
        default=4,
        help="band-limited upsampling factor of --spectral (default 4)",
    )
    diag.add_argument(
        "--spectral-images",
        type=_positive_int,
        default=4,
        help="images used by --spectral (default 4; it works at s times the resolution)",
    )
    diag.add_argument(
        "--convergence",
        type=_positive_int,
        nargs="*",
        default=[2],
        metavar="S",
        help="further upsampling factors at which --spectral re-measures the pointwise ops, to check "
        "that --upsample is large enough; summary.json gets the largest relative change of any op's "
        "alias ratio (default: 2; '2 8' costs about 5x more; none to skip)",
    )
    diag.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write figures/*.png|svg and the self-contained report.html (default: yes)",
    )
    diag.add_argument(
        "--where-images",
        type=int,
        default=3,
        help="images shown in the 'where in the image' figure (default 3; 0 skips it)",
    )
    diag.add_argument("--quiet", action="store_true", help="no progress bars or table")
    diag.add_argument("--json", action="store_true", help="print summary.json to stdout instead of the table")
    diag.set_defaults(func=diagnose)

    fix = sub.add_parser(
        "fix",
        help="apply anti-aliasing fixes and compare the models before/after",
        description="Apply anti-aliasing fixes to a model (each --fix gives one variant; chain fixes with "
        "'+', e.g. circular_padding+polyphase) and compare every variant with the original: Lie derivative "
        "per transform, layer attribution and alias energy by op kind, top-1 accuracy and agreement, "
        "shift consistency (two random crops offset in [0,32)^2 of a 256 resize), sub-pixel shift "
        "consistency, forward time and parameters. Writes comparison.csv, comparison.json, changes.csv "
        "and comparison.png/svg.",
    )
    _common_arguments(fix, ["translate_x", "rotate", "scale"], "aliasscope-fix")
    fix.add_argument(
        "--fix",
        dest="fixes",
        action="append",
        default=None,
        metavar="NAME[+NAME]",
        help=f"a fix or a '+' chain of fixes, repeatable; names: {', '.join(_fix_names())} "
        "(default: each fix alone and circular_padding+polyphase)",
    )
    fix.add_argument("--filter-size", type=int, default=3, choices=(3, 5, 7), help="blurpool filter size (3)")
    fix.add_argument("--up", type=_positive_int, default=2, help="filtered_activation upsampling (2)")
    fix.add_argument(
        "--filter", default="ideal", choices=("ideal", "kaiser"), help="filtered_activation filter (ideal)"
    )
    fix.add_argument(
        "--layer-images", type=int, default=16, help="images for the layer attribution (16; 0 skips it)"
    )
    fix.add_argument(
        "--spectral-images", type=int, default=4, help="images for the alias energy (4; 0 skips it)"
    )
    fix.add_argument("--quiet", action="store_true", help="no progress bars or table")
    fix.add_argument(
        "--json", action="store_true", help="print comparison.json to stdout instead of the table"
    )
    fix.set_defaults(func=fix_command)

    from .sweep.command import add_parser as add_sweep_parser

    add_sweep_parser(sub, transform_names(), generator_names())
    return parser


def _fix_names() -> list[str]:
    from .fixes import FIXES

    return list(FIXES)


def _parse_fixes(specs: list[str] | None) -> list[list[str]]:
    from .fixes import parse_chain

    return [parse_chain(spec) for spec in specs or [*_fix_names(), "circular_padding+polyphase"]]


def fix_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``aliasscope fix``; returns the comparison JSON it writes."""
    start = time.perf_counter()
    chains = _parse_fixes(args.fixes)
    with output_folder(args.out, command=_command_line(args)) as out:
        text = _fix_into(out, args, chains)
        out.commit()
        if args.json:
            print(text)
        elif not args.quiet:
            print(f"wrote {out.describe()} into {out.display}/ ({time.perf_counter() - start:.1f} s)")
    return json.loads(text)


def _fix_into(out: OutputFolder, args: argparse.Namespace, chains: list[list[str]]) -> str:
    """The work of ``aliasscope fix`` into the open output folder; returns comparison.json's text."""
    from dataclasses import replace

    from ._batching import auto_batch_size
    from ._plots import plot_comparison
    from .comparison import compare
    from .data import load_images
    from .fixes import apply_fixes, changes

    model, preprocess = _load(args)
    wide = replace(preprocess, crop=preprocess.crop + 32, resize=max(preprocess.resize, preprocess.crop + 32))
    batch = load_images(args.images, wide, limit=args.num_images, every=args.every)
    _record(out, args, model, len(batch))
    batch.images = batch.images.to(_dtype(args))
    example = batch.images[:1, :, 16:-16, 16:-16].to(args.device)
    options = {
        "blurpool": {"filter_size": args.filter_size},
        "filtered_activation": {"up": args.up, "filter": args.filter},
    }
    models: dict[str, torch.nn.Module] = {"original": model}
    for chain in chains:
        models["+".join(chain)] = apply_fixes(model, chain, example=example, options=options)
    result = compare(
        models,
        batch.images,
        batch.labels,
        args.transforms or ["translate_x", "rotate", "scale"],
        crop=preprocess.crop,
        generator=args.generator,
        layer_images=args.layer_images,
        spectral_images=args.spectral_images,
        batch_size=args.batch_size or auto_batch_size(torch.device(args.device)),
        seed=args.seed,
        progress=not args.quiet,
    )
    result.settings.update(
        model=args.model,
        pretrained=bool(args.pretrained),
        image_source=args.images or "scikit-image bundled photos",
        preprocess=repr(wide),
        versions=_versions(),
    )
    out.write_csv("comparison.csv", result.rows)
    text = out.write_json("comparison.json", json.loads(result.to_json()))
    out.write_csv(
        "changes.csv", [{"variant": n, **c.as_dict()} for n, m in models.items() for c in changes(m)]
    )
    plot_comparison(result, out / "comparison")
    if not args.json and not args.quiet:
        print(result.summary())
    return text


def _versions() -> dict[str, str]:
    from .diagnosis import versions

    return versions()


def _command_line(args: argparse.Namespace) -> list[str]:
    """The command line of this run (as given to :func:`main`, else this process's)."""
    argv = getattr(args, "argv", None)
    return ["aliasscope", *(sys.argv[1:] if argv is None else argv)]


def _record(out: OutputFolder, args: argparse.Namespace, model: torch.nn.Module, num_images: int) -> None:
    """The run's provenance (every CSV's constant columns, every JSON's "provenance" object, the manifest)."""
    from .models import weights_source

    out.provenance.update(
        model=args.model,
        weights=weights_source(model),
        images=str(Path(args.images).resolve()) if args.images else "scikit-image bundled photos",
        num_images=num_images,
        generator=args.generator,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        aliasscope_version=__version__,
    )
    out.versions.update(_versions())


def _load(args: argparse.Namespace):
    """Check the device, seed the generators, load the model (in ``--dtype``) and its preprocessing."""
    from ._checks import check_device
    from .models import load_model

    try:
        check_device(args.device)
    except ValueError as err:
        raise ValueError(f"--device: {err}") from None
    torch.manual_seed(args.seed)
    model, preprocess = load_model(args.model, pretrained=args.pretrained, arch=args.arch, device=args.device)
    if args.dtype == "float64":
        model = model.double()
    return model, preprocess


def _dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.float64 if args.dtype == "float64" else torch.float32


def diagnose(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``aliasscope diagnose``; returns the summary it writes."""
    start = time.perf_counter()
    with output_folder(args.out, command=_command_line(args)) as out:
        summary, text, metrics = _diagnose_into(out, args, start)
        out.commit()
        if args.json:
            print(text)
        elif not args.quiet:
            _print_summary(args, summary, metrics, out, start)
    return summary


def _diagnose_into(out: OutputFolder, args: argparse.Namespace, start: float):
    """The work of ``aliasscope diagnose`` into the open output folder: load, :func:`aliasscope.diagnose`,
    write the files and the report from the :class:`~aliasscope.diagnosis.Diagnosis`; returns the
    summary, its JSON text and the end-to-end metrics."""
    from .data import load_images
    from .diagnosis import diagnose as run_diagnosis
    from .diagnosis import parse_target
    from .figures import draw_figures

    if args.layerwise:
        parse_target(args.target)  # a bad --target fails before any work
    clock = time.perf_counter()
    setup = clock - start  # imports, the output folder and its lock
    model, preprocess = _load(args)
    batch = load_images(args.images, preprocess, limit=args.num_images, every=args.every)
    batch.images = batch.images.to(_dtype(args))
    loading = time.perf_counter() - clock
    result = run_diagnosis(
        model,
        batch,
        transforms=args.transforms,
        layer_transforms=args.layer_transforms if args.layerwise else None,
        target=args.target,
        generator=args.generator,
        batch_size=args.batch_size,
        spectral=args.spectral,
        upsample=args.upsample,
        spectral_images=args.spectral_images,
        convergence=tuple(args.convergence),
        progress=not args.quiet,
        preprocess=preprocess,
        settings={
            "model": args.model,
            "pretrained": bool(args.pretrained),
            "images": args.images or "scikit-image bundled photos",
            "device": args.device,
            "dtype": args.dtype,
            "seed": args.seed,
            "where_images": args.where_images,
        },
    )
    clock = time.perf_counter()
    _record(out, args, model, result.num_images)
    out.write_csv("metrics.csv", result.metrics.per_image())
    out.write_csv("per_image.csv", result.per_image_rows())
    if result.decompositions:
        out.write_csv("layers.csv", result.layers_rows())
    if result.join is not None:
        out.write_csv("spectral.csv", result.join.rows)
    writing, clock = time.perf_counter() - clock, time.perf_counter()
    figures = draw_figures(result, out / "figures", progress=not args.quiet) if args.report else {}
    result.timings.update(setup=setup, load=loading, write=writing, figures=time.perf_counter() - clock)
    result.timings["total"] = time.perf_counter() - start
    summary = result.to_dict()
    # strict JSON: NaN (a measure that does not apply) written as null; a "provenance" object added
    text = out.write_json("summary.json", summary)
    if args.report:
        from ._report import write_report

        write_report(out / "report.html", summary, figures, files=[*out.written(), "manifest.json"])
    return summary, text, result.metrics


def _print_summary(args: argparse.Namespace, summary: dict, metrics, out: OutputFolder, start: float) -> None:
    """The one-screen text summary at the end of ``diagnose``: a failed self-check replaces the
    ranking and the advice by the failures."""
    from ._report import advice, check_failures, convergence_verdict

    print(
        f"\nmodel {args.model}, {summary['provenance']['weights']}, {summary['num_images']} images, "
        f"{args.device}"
    )
    print(metrics.summary())
    if summary["top1"] is not None:
        print(f"top-1 accuracy: {100 * summary['top1']:.1f}% ({summary['num_images']} labelled images)")
    failures = check_failures(summary)
    if failures is not None:
        red, end = ("\033[1;31m", "\033[0m") if sys.stdout.isatty() else ("", "")
        print(f"\n{red}SELF-CHECK FAILED: these numbers are not a finding (no ranking, no advice){end}")
        for failure in failures:
            print(f"{red}  - {failure}{end}")
    elif summary.get("layerwise"):
        worst: dict[str, float] = {}
        for part in summary["layerwise"].values():
            for name, value in (part.get("checks") or {}).items():
                worst[name] = max(worst.get(name, 0.0), value)
        checked = ", ".join(f"{name} <= {value:.1e}" for name, value in worst.items())
        print(f"\nself-checks passed ({checked})")
        for line in advice(summary):
            print(html.unescape(re.sub(r"</?(code|b)>", "", line)))
    if summary.get("spectral"):
        print(f"spectral convergence: {convergence_verdict(summary['spectral'].get('convergence'))[1]}")
    print(f"\nwrote {out.describe()} into {out.display}/ ({time.perf_counter() - start:.1f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aliasscope`` console script; returns the exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except KeyboardInterrupt as err:  # Ctrl-C: the output folder was left as it was (or is complete)
        message = err.message if isinstance(err, Interrupted) else interrupted_message(args.out)
        print(f"aliasscope: {message}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, ImportError, KeyError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"aliasscope: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
