"""Cost of the layer-wise decomposition, in forward-pass equivalents (same model, images, run).

    python benchmarks/bench_decompose.py --model resnet50 --batch 32 [--threads 2] [--device cpu]

Prints, for one transform: a plain forward pass; the exact scalar decomposition (one target per
image); the exact vector decomposition (the whole softmax, zero noise); the paper's probe estimator
with 100 probes computing every local Lie derivative once (aliasscope's ``method="probe"``); and
the same estimator as the paper's code runs it, recomputing every local Lie derivative for each
probe inside a fresh forward pass and running a full backward (weights included), as the loop of
its layer-wise code does. The paper-style estimator is timed over ``--paper-probes`` probes and
scaled to 100 (its cost is linear in the probe count); say so when quoting it.
"""

from __future__ import annotations

import argparse
import time
import warnings

import timm
import torch
import torch.nn.functional as F

from aliasscope.capture import record
from aliasscope.decompose import _is_zero_by_construction, decompose, local_lie_derivative


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def paper_style_probes(model, x, transform: str, num_probes: int) -> None:
    """The paper's layer-wise loop: for every probe a fresh forward pass with the per-layer Lie
    derivatives computed in it, then a full backward (weights included) of ``<z, softmax>``."""
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(num_probes):
        xr = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), record(model) as rec:
            f = F.softmax(model(xr), dim=-1)
        ops = [op for op in rec.ops if not _is_zero_by_construction(op)]
        vs = [local_lie_derivative(op, transform, "central") for op in ops]
        outs = [h for op in ops for h in op.outputs if h.requires_grad]
        z = torch.randn_like(f)
        grads = torch.autograd.grad(f, outs + params, grad_outputs=z, allow_unused=True)
        with torch.no_grad():
            k = 0
            for op, v_list in zip(ops, vs, strict=True):
                for v, h in zip(v_list, op.outputs, strict=True):
                    if h.requires_grad:
                        g = grads[k]
                        k += 1
                        if g is not None:
                            (g * v).flatten(1).sum(1).square()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--transform", default="translate_x")
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument(
        "--paper-probes", type=int, default=5, help="probes actually timed for the paper style"
    )
    parser.add_argument("--skip-vector", action="store_true")
    parser.add_argument("--group", type=int, default=None, help="ops pushed forward together (vector exact)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dev = args.device
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval().to(dev)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(
        f"model {args.model}, batch {args.batch}x3x{args.size}x{args.size}, device {name}, "
        f"torch threads {torch.get_num_threads()}, transform {args.transform}"
    )

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    fwd()
    t_fwd = _timed(fwd, dev, repeats=3)
    rows = [("forward", t_fwd)]
    kw = {"output": "softmax"}
    rows.append(
        (
            "scalar exact (target=pred)",
            _timed(lambda: decompose(model, x, args.transform, target="pred", **kw), dev),
        )
    )
    if not args.skip_vector:
        rows.append(
            (
                "vector exact (target=None)",
                _timed(
                    lambda: decompose(model, x, args.transform, target=None, group_size=args.group, **kw), dev
                ),
            )
        )
    rows.append(
        (
            f"probe x{args.probes}, v_i reused",
            _timed(
                lambda: decompose(
                    model, x, args.transform, target=None, method="probe", num_probes=args.probes, **kw
                ),
                dev,
            ),
        )
    )
    t_paper = _timed(lambda: paper_style_probes(model, x, args.transform, args.paper_probes), dev)
    rows.append(
        (
            f"probe x{args.probes}, paper style (timed x{args.paper_probes})",
            t_paper * args.probes / args.paper_probes,
        )
    )
    print(f"{'case':<46} {'seconds':>10} {'x forward':>10}")
    for case, t in rows:
        print(f"{case:<46} {t:>10.3f} {t / t_fwd:>10.1f}")
    scalar = rows[1][1]
    paper = rows[-1][1]
    print(f"scalar exact is {paper / scalar:.0f}x faster than {args.probes} paper-style probes")
    if not args.skip_vector:
        print(
            f"vector exact / {args.probes} reused probes = {rows[2][1] / rows[-2][1]:.2f}, "
            f"/ {args.probes} paper-style probes = {rows[2][1] / paper:.2f}"
        )


if __name__ == "__main__":
    main()
