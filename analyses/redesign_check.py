"""Bitwise check for a redesign that must not change a number (issue 15).

    python analyses/redesign_check.py --write figures/redesign_baseline.json     # before
    python analyses/redesign_check.py --against figures/redesign_baseline.json   # after

Runs, on CPU in float64 with one thread, three random-init models (resnet18, convnext_atto,
vit_tiny_patch16_224 at 64 px) on seeded images: ``equivariance_metrics`` (every transform),
``decompose`` (scalar, translate_x and rotate; vector, rotate), ``spectral`` (s = 2) and ``compare``
(original vs blurpool), plus ``aliasscope diagnose`` on resnet18 (its CSV files). Every float is
stored as ``float.hex`` so that "the same" means bit for bit; ``--against`` lists every difference and
exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import timm
import torch

import aliasscope as asc
from aliasscope.cli import main as cli_main

MODELS = {
    "resnet18": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": 64},
}
_VOLATILE = {"seconds", "start", "end", "started", "finished", "argv", "command", "pid"}


def _volatile(key: str) -> bool:
    """Timings and run details, which differ from run to run by nature."""
    return key in _VOLATILE or key.endswith(("_ms", "_seconds", "_s"))


def _hex(value: Any) -> Any:
    """Floats as exact hex strings, recursively (NaN and inf spelled out)."""
    if isinstance(value, torch.Tensor):
        return _hex(value.double().flatten().tolist())
    if isinstance(value, float):
        return value.hex() if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _hex(v) for k, v in value.items() if not _volatile(str(k))}
    if isinstance(value, list | tuple):
        return [_hex(v) for v in value]
    return value


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, **MODELS[name]).eval()
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear) and head.weight.abs().max() == 0:
        torch.nn.init.normal_(head.weight, std=0.02)
    return model.double()


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if not _volatile(k)} for row in csv.DictReader(f)]


def measure() -> dict[str, Any]:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out: dict[str, Any] = {}
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    wide = torch.randn(4, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for name in MODELS:
        model = _model(name)
        res: dict[str, Any] = {}
        res["metrics"] = asc.equivariance_metrics(model, x, progress=False).values
        for t in ("translate_x", "rotate"):
            d = asc.decompose(model, x, t, target="pred", output="softmax")
            res[f"decompose_{t}"] = {"names": d.names, "values": d.values, "total": d.total}
        v = asc.decompose(model, x, "rotate", target=None, output="softmax")
        res["decompose_vector_rotate"] = {"values": v.values, "total": v.total}
        res["spectral"] = asc.spectral(model, x, upsample=2).table
        fixed = asc.blurpool(model, example=wide[:1, :, :64, :64])
        cmp = asc.compare(
            {"original": model, "blurpool": fixed}, wide, None, ["translate_x"], crop=64,
            layer_images=2, spectral_images=0, progress=False,
        )  # fmt: skip
        res["compare"] = cmp.rows
        out[name] = res
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "diag"
        argv = ["diagnose", "--model", "resnet18", "--no-pretrained", "--dtype", "float64", "--num-images",
                "2", "--spectral-images", "1", "--upsample", "2", "--no-report", "--quiet", "--out",
                str(folder)]  # fmt: skip
        if cli_main(argv) != 0:
            raise SystemExit("aliasscope diagnose failed")
        out["diagnose"] = {p.name: _csv_rows(p) for p in sorted(folder.glob("*.csv"))}
    return _hex(out)


def _diff(a: Any, b: Any, where: str, found: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                found.append(f"{where}/{k}: only in {'baseline' if k in a else 'new run'}")
            else:
                _diff(a[k], b[k], f"{where}/{k}", found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _diff(u, v, f"{where}[{i}]", found)
    elif a != b:
        found.append(f"{where}: {a!r} != {b!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="write the results (the baseline) here")
    group.add_argument("--against", type=Path, help="compare with this baseline, bit for bit")
    args = parser.parse_args()
    result = measure()
    if args.write:
        args.write.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.write}")
        return
    found: list[str] = []
    _diff(json.loads(args.against.read_text()), result, "", found)
    for line in found[:50]:
        print(line)
    print(f"{len(found)} differences from {args.against}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
