"""Cost of the end-to-end Lie derivative, in forward-pass equivalents (same batch, same run).

    python benchmarks/bench_lie.py [--model tf_efficientnet_lite0] [--batch 16] [--threads 2] [--device cpu]
        [--batches 8] [--explicit-attention] [--reference-repeats 1]

Prints the GPU (or cpu), thread count, dtype, TF32 state, the median time of a plain forward pass
(eager, full float32: TF32 off, as every analysis runs) and, per case, the median time, its ratio
to that forward and the peak GPU memory of the call:

* ``lie_derivative``, 1 transform: one forward-mode jvp (eager);
* ``lie_derivative``, K transforms in one pass (``transforms=[...]``: the primal once, the K
  tangents together), and the old way, K calls one after the other;
* ``equivariance_metrics`` on ``--batches`` batches (on CUDA: the first batch eager, then one CUDA
  graph replayed; the per-batch figure includes the capture), for 1 and for K transforms;
* on CUDA, the replay of that graph alone (the steady state of a long run), for 1 and K transforms;
* the paper's recipe: ``softmax(model(T_t x))`` differentiated at ``t = 0`` by the double-backward
  trick through its float32 resampler, 1 transform, and K (one per transform, timed
  ``--reference-repeats`` times: on depthwise CNNs on a GPU one call takes seconds).

Timings are interleaved (round robin) so that background load hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from timing import model_and_images, model_arguments, sync

from aliasscope import equivariance_metrics, lie_derivative, transform_names
from aliasscope._borrow import borrowed
from aliasscope._lie_pass import GraphedMetricPass, MetricPass
from aliasscope._reference import reference_lie_derivative as reference
from aliasscope.layouts import infer_layout
from aliasscope.lie import _composed


def tf32_state() -> str:
    """The TF32 switches as torch reports them (the new per-backend API where torch has it)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        return f"matmul {matmul.fp32_precision}, conv {cudnn.conv.fp32_precision}"
    return f"matmul allow_tf32={matmul.allow_tf32}, cudnn allow_tf32={cudnn.allow_tf32}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser, "tf_efficientnet_lite0", 16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--batches", type=int, default=4, help="batches for equivariance_metrics")
    parser.add_argument("--transform", default="translate_x")
    parser.add_argument("--explicit-attention", action="store_true", help="timm fused_attn off")
    args = parser.parse_args()

    device = args.device
    model, x = model_and_images(args, f", transform {args.transform}, {args.repeats} repeats")
    if args.explicit_attention:
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    names = transform_names()
    k = len(names)
    many = x.repeat(args.batches, 1, 1, 1)
    cuda = device.startswith("cuda")

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def one() -> None:
        lie_derivative(model, x, args.transform, output="softmax")

    def together() -> None:
        lie_derivative(model, x, transforms=names, output="softmax")

    def one_by_one() -> None:
        for n in names:
            lie_derivative(model, x, n, output="softmax")

    def metrics_one() -> None:
        equivariance_metrics(model, many, [args.transform], batch_size=args.batch, progress=False)

    def metrics_all() -> None:
        equivariance_metrics(model, many, names, batch_size=args.batch, progress=False)

    replays = {}
    if cuda:
        with borrowed(model), torch.no_grad():
            for key, chosen in (("one", [args.transform]), ("all", names)):
                step = MetricPass(
                    _composed(model, "softmax"), chosen, "central", lambda y: infer_layout(y, model)
                )
                replays[key] = GraphedMetricPass.capture(step, x)[0]

    def replay_one() -> None:
        replays["one"](x)

    def replay_all() -> None:
        replays["all"](x)

    def ref_one() -> None:
        reference(model, x, args.transform)

    def ref_all() -> None:
        for n in names:
            reference(model, x, n)

    # (case, fn, transforms it computes, batches it computes, repeats); a case timed once is not warmed
    # up (the reference's K transforms take a minute on depthwise CNNs: its 1-transform case warms up)
    cases: list[tuple[str, Callable[[], None], int, int, int]] = [
        ("forward", forward, 1, 1, args.repeats),
        ("lie_derivative, 1 transform", one, 1, 1, args.repeats),
        (f"lie_derivative, {k} in one pass", together, k, 1, args.repeats),
        (f"lie_derivative, {k} calls", one_by_one, k, 1, args.repeats),
        (f"equivariance_metrics, 1 x {args.batches} batches", metrics_one, 1, args.batches, args.repeats),
        (f"equivariance_metrics, {k} x {args.batches} batches", metrics_all, k, args.batches, args.repeats),
        *(
            [
                ("graph replay, 1 transform", replay_one, 1, 1, args.repeats),
                (f"graph replay, {k} transforms", replay_all, k, 1, args.repeats),
            ]
            if cuda
            else []
        ),
        ("reference recipe, 1 transform", ref_one, 1, 1, args.reference_repeats),
        (f"reference recipe, {k} transforms", ref_all, k, 1, args.reference_repeats),
    ]
    times: dict[str, list[float]] = {c[0]: [] for c in cases}
    peak: dict[str, float] = {}
    failed: dict[str, str] = {}
    with borrowed(model):  # full float32 (TF32 off) for the forward too, as every analysis runs
        print(f"dtype {x.dtype}, TF32: {tf32_state() if cuda else 'n/a (cpu)'}")
        for r in range(-1, max(c[4] for c in cases)):  # r = -1: warm-up and peak memory
            for name, fn, _, _, repeats in cases:
                if r >= repeats or (r == -1 and repeats == 1 and name != "forward"):
                    continue
                if cuda and name not in peak:
                    torch.cuda.reset_peak_memory_stats()
                if name in failed:
                    continue
                sync(device)
                t0 = time.perf_counter()
                try:
                    fn()
                except RuntimeError as err:  # the reference has no double backward of fused attention
                    failed[name] = str(err).splitlines()[0][:70]
                    continue
                sync(device)
                if r >= 0:
                    times[name].append(time.perf_counter() - t0)
                if name not in peak:
                    peak[name] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        graphed = equivariance_metrics(model, many, names, batch_size=args.batch, progress=False).values
        eager = equivariance_metrics(
            model, many, names, batch_size=args.batch, progress=False, cuda_graph=False
        ).values
        diff = ((graphed - eager).abs().max() / eager.abs().max()).item()
        print(f"equivariance_metrics default vs cuda_graph=False: max relative difference {diff:.1e}")

    base = statistics.median(times["forward"])
    print(f"forward {1e3 * base:.2f} ms (batch {args.batch})")
    head = f"{'case':<40} {'median s':>9} {'x forward':>10} {'per transform':>14} {'peak GiB':>9}"
    print(head)
    print("-" * len(head))
    for name, _, transforms, batches, _ in cases:
        if name in failed:
            print(f"{name:<40} fails: {failed[name]}")
            continue
        med = statistics.median(times[name])
        ratio = med / base / batches
        print(f"{name:<40} {med:>9.4f} {ratio:>10.2f} {ratio / transforms:>14.2f} {peak[name]:>9.2f}")


if __name__ == "__main__":
    main()
