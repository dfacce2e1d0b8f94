"""Cost of the spectral pass, in forward-pass equivalents (same model, images and run).

    python benchmarks/bench_spectral.py [--model tf_efficientnet_lite0] [--batch 2] [--upsample 2 4]

Prints the thread count, a plain forward pass, and ``spectral(model, images, upsample=s)`` for each
requested upsampling factor (warm-up first, best of 2), as seconds and ratios to the forward pass.
"""

from __future__ import annotations

import argparse
import warnings

import timm
import torch
from timing import best_time

from aliasscope.spectral import spectral


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--upsample", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model = timm.create_model(args.model).eval().to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"model {args.model}, batch {args.batch}x3x{args.size}x{args.size}, device {name}, "
        f"torch threads {torch.get_num_threads()}"
    )

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    t_fwd = best_time(fwd, args.device, 3, warmup=True)
    print(f"{'case':<30} {'seconds':>10} {'x forward':>10}")
    print(f"{'forward':<30} {t_fwd:>10.3f} {1.0:>10.1f}")
    for s in args.upsample:
        t = best_time(lambda s=s: spectral(model, x, upsample=s), args.device, 2, warmup=True)
        print(f"{f'spectral, upsample {s}':<30} {t:>10.3f} {t / t_fwd:>10.1f}")


if __name__ == "__main__":
    main()
