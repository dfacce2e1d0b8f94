"""Cost of one transform's end-to-end Lie derivative, in forward-pass equivalents (same batch, same run).

    python benchmarks/bench_lie.py [--model tf_efficientnet_lite0] [--batch 16] [--threads 2] [--device cpu]

Prints the thread count, the median time of a plain forward pass, and the median-time ratio to it
of: aliasscope's ``lie_derivative`` (generator + one forward-mode jvp with the fast rules), the same
jvp with PyTorch's generic forward-mode rules, and the reference code's double-backward trick.
Timings are interleaved (round robin) so that background load hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import model_and_images, model_arguments, sync

from aliasscope import apply_generator, lie_derivative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser, "tf_efficientnet_lite0", 16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--transform", default="translate_x")
    args = parser.parse_args()

    device = args.device
    model, x = model_and_images(args, f", transform {args.transform}, {args.repeats} repeats")
    dx = apply_generator(x, args.transform)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def ours() -> None:
        lie_derivative(model, x, args.transform, output="softmax")

    def generic_jvp() -> None:
        with torch.no_grad():
            torch.func.jvp(lambda z: F.softmax(model(z), -1), (x,), (dx,))

    def double_backward() -> None:
        xr = x.clone().requires_grad_(True)
        y = F.softmax(model(xr), -1)
        v = torch.ones_like(y, requires_grad=True)
        (vj,) = torch.autograd.grad(y, [xr], [v], create_graph=True)
        torch.autograd.grad(vj, [v], [dx])

    cases: dict[str, Callable[[], None]] = {
        "forward": forward,
        "aliasscope lie_derivative": ours,
        "torch.func.jvp, generic rules": generic_jvp,
        "reference double-backward": double_backward,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["forward"])
    print(f"{'case':<32} {'median s':>10} {'x forward':>10}")
    for case, ts in times.items():
        med = statistics.median(ts)
        print(f"{case:<32} {med:>10.4f} {med / base:>10.2f}")


if __name__ == "__main__":
    main()
