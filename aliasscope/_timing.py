"""Wall-clock timing that covers queued GPU work (used by :func:`aliasscope.comparison.compare` and the
benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["sync", "best_time"]


def sync(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: str, repeats: int = 1, warmup: bool = False) -> float:
    """Best wall-clock seconds of ``repeats`` calls of ``fn`` (after one untimed call if ``warmup``)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best
