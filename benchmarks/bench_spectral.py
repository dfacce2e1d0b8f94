"""Cost of the spectral pass, in forward-pass equivalents (same model, images and run).

    python benchmarks/bench_spectral.py [--model tf_efficientnet_lite0] [--batch 2] [--upsample 2 4]

Prints the thread count, a plain forward pass, and ``spectral(model, images, upsample=s)`` for each
requested upsampling factor (warm-up first, best of 2), as seconds and ratios to the forward pass.
"""

from __future__ import annotations

import argparse

import torch
from timing import best_time, model_and_images, model_arguments

from aliasscope.spectrum import spectral


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser, "tf_efficientnet_lite0", 2)
    parser.add_argument("--upsample", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    model, x = model_and_images(args)

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
