"""Cost of the layer-wise decomposition, in forward-pass equivalents (same model, images, run).

    python benchmarks/bench_decompose.py --model resnet50 --batch 32 [--threads 2] [--device cpu]

Prints, for one transform: a plain forward pass; the exact scalar decomposition (one target per
image); the exact vector decomposition (the whole softmax, zero noise); the paper's probe estimator
with 100 probes computing every local Lie derivative once (aliasscope's ``method="probe"``); and
the same estimator as the paper's code runs it, recomputing every local Lie derivative for each
probe inside a fresh forward pass and running a full backward (weights included), as the loop of
its layer-wise code does. The paper-style estimator is timed over ``--paper-probes`` probes and
scaled to 100 (its cost is linear in the probe count); say so when quoting it.

Ratios are printed against the plain forward (TF32 as the device defaults) and against the forward in
full float32, which is what the decomposition runs. On a GPU it also times the scalar decomposition
of ``--graph-batches`` batches through ``decompose(batch_size=)``, which records the first batch as
a CUDA graph and replays it: per batch amortised over all, and one more batch (the replay alone).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import best_time, model_and_images, model_arguments

from aliasscope._borrow import borrowed
from aliasscope.capture import record
from aliasscope.decomposition import decompose, local_lie_derivative
from aliasscope.decomposition._local import is_zero_by_construction


def paper_style_probes(model, x, transform: str, num_probes: int) -> None:
    """The paper's layer-wise loop: for every probe a fresh forward pass with the per-layer Lie
    derivatives computed in it, then a full backward (weights included) of ``<z, softmax>``."""
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(num_probes):
        xr = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), record(model) as rec:
            f = F.softmax(model(xr), dim=-1)
        ops = [op for op in rec.ops if not is_zero_by_construction(op)]
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
    model_arguments(parser, "resnet50", 32)
    parser.add_argument("--transform", default="translate_x")
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument(
        "--paper-probes", type=int, default=5, help="probes actually timed for the paper style"
    )
    parser.add_argument("--skip-vector", action="store_true")
    parser.add_argument(
        "--only-scalar", action="store_true", help="time the forward and the scalar exact only"
    )
    parser.add_argument("--group", type=int, default=None, help="ops pushed forward together (vector exact)")
    parser.add_argument(
        "--graph-batches",
        type=int,
        default=12,
        help="GPU: batches decomposed by one replayed CUDA graph (decompose(batch_size=)); 0 skips it",
    )
    args = parser.parse_args()
    dev = args.device
    model, x = model_and_images(args, f", transform {args.transform}")

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    t_fwd = best_time(fwd, dev, repeats=3, warmup=True)
    with borrowed(model):  # what the decomposition runs: full float32 (TF32 off)
        t_fp32 = best_time(fwd, dev, repeats=3, warmup=True)
    kw = {"output": "softmax"}
    t = args.transform
    if dev.startswith("cuda") and args.graph_batches >= 3:
        many = torch.randn(args.graph_batches * args.batch, *x.shape[1:], device=dev)

        def graphed(n: int) -> None:
            decompose(model, many[: n * args.batch], t, target="pred", batch_size=args.batch, **kw)

        few = max(2, args.graph_batches // 3)
        t_all = best_time(lambda: graphed(args.graph_batches), dev, repeats=2, warmup=True)
        t_few = best_time(lambda: graphed(few), dev, repeats=2)
        replay = (t_all - t_few) / (args.graph_batches - few)
    cases = [  # name, function, warm up and take the best of 2 (cheap cases), or time one cold run
        ("scalar exact (target=pred)", lambda: decompose(model, x, t, target="pred", **kw), True),
        (
            "vector exact (target=None)",
            lambda: decompose(model, x, t, target=None, group_size=args.group, **kw),
            False,
        ),
        (
            f"probe x{args.probes}, v_i reused",
            lambda: decompose(model, x, t, target=None, method="probe", num_probes=args.probes, **kw),
            False,
        ),
        (
            f"probe x{args.probes}, paper style (timed x{args.paper_probes})",
            lambda: paper_style_probes(model, x, t, args.paper_probes),
            False,
        ),
    ]
    if args.skip_vector:
        cases = [c for c in cases if not c[0].startswith("vector")]
    if args.only_scalar:
        cases = cases[:1]
    rows = [("forward (warm, best of 3)", t_fwd)]
    if t_fp32 != t_fwd:
        rows.append(("forward, full float32 as decomposed (best of 3)", t_fp32))
    if dev.startswith("cuda") and args.graph_batches >= 3:
        rows.append(
            (
                f"scalar exact, CUDA graph: {args.graph_batches} batches / {args.graph_batches}",
                t_all / args.graph_batches,
            )
        )
        rows.append(("scalar exact, CUDA graph: each further batch", replay))
    for name, fn, warm in cases:
        if warm:  # first-call allocations are not the method's cost; the forward is timed warm too
            name += " (warm, best of 2)"
        secs = best_time(fn, dev, repeats=2 if warm else 1, warmup=warm)
        if "paper style" in name:
            secs *= args.probes / args.paper_probes
        rows.append((name, secs))
    print(f"{'case':<60} {'seconds':>10} {'x forward':>10} {'x fp32 fwd':>10}")
    for case, secs in rows:
        print(f"{case:<60} {secs:>10.4f} {secs / t_fwd:>10.1f} {secs / t_fp32:>10.1f}")
    by = {name.split(" (")[0]: secs for name, secs in rows}
    paper = next((v for k, v in by.items() if "paper style" in k), None)
    reused = next((v for k, v in by.items() if "v_i reused" in k), None)
    if paper:
        print(
            f"scalar exact is {paper / by['scalar exact']:.0f}x faster than {args.probes} paper-style probes"
        )
    if "vector exact" in by and paper and reused:
        print(
            f"vector exact / {args.probes} reused probes = {by['vector exact'] / reused:.2f}, "
            f"/ {args.probes} paper-style probes = {by['vector exact'] / paper:.2f}"
        )


if __name__ == "__main__":
    main()
