"""Cost of ``aliasscope diagnose`` end to end: wall time of the command and its stages.

    python benchmarks/bench_diagnose.py --images DIR [--model resnet50] [--device cuda] [--no-pretrained]
        [--profile 30] [-- extra diagnose arguments]

Runs the command as a user does (a fresh process: start-up, model and image loading, the analyses,
CSV files, figures, report) and prints its wall time, the ``seconds`` it records in summary.json
(everything but the report) and the stages (``timings``: load, metrics, layerwise, spectral,
figures), with the GPU name and torch version. ``--profile N`` runs it under cProfile and prints the
N aliasscope functions with the largest cumulative time and the N functions with the largest own
time. Also times ``aliasscope --help`` (start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more aliasscope diagnose arguments (after --)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    import torch

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {name}, torch {torch.__version__}, threads {args.threads}, model {args.model}")
    aliasscope = [sys.executable, "-m", "aliasscope.cli"]
    print(f"aliasscope --help: {_help(aliasscope, env):.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        weights = "--pretrained" if args.pretrained else "--no-pretrained"
        cmd = [
            "diagnose", "--model", args.model, "--images", args.images, "--device", args.device,
            "--out", str(out), "--quiet", weights, *args.extra,
        ]  # fmt: skip
        if args.profile:
            stats = Path(tmp) / "profile.out"
            profiled = [sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "aliasscope.cli"]
            wall = run([*profiled, *cmd], env)
        else:
            wall = run([*aliasscope, *cmd], env)
        summary = json.loads((out / "summary.json").read_text())
        stages = ", ".join(f"{k} {v:.2f}" for k, v in summary.get("timings", {}).items())
        print(
            f"aliasscope {' '.join(cmd[:7])} ... {weights}: {summary['num_images']} images, "
            f"wall {wall:.1f} s, summary.json seconds {summary['seconds']:.1f} ({stages})"
        )
        if args.profile:
            import pstats

            profile = pstats.Stats(str(stats))
            profile.sort_stats("cumulative").print_stats("aliasscope", args.profile)
            profile.sort_stats("tottime").print_stats(args.profile)


def _help(aliasscope: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([*aliasscope, "--help"], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
