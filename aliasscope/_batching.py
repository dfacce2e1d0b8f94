"""How many images go through a model at a time when the caller does not say."""

from __future__ import annotations

import torch

__all__ = ["auto_batch_size"]


def auto_batch_size(device: torch.device | str) -> int:
    """Images per pass when none is given: 16 on the CPU; on a CUDA device 64, 32 or 16 by its free
    memory (>= 48 GiB, >= 20 GiB, less). Larger batches mean fewer passes and kernel launches; the
    layer decomposition holds every op's output and gradient of a batch (on the CPU, decomposing 96
    lite0 images of 224 px peaks at 6.5 GB of memory in batches of 16, 16.5 GB all at once)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 16
    free = torch.cuda.mem_get_info(device)[0] / 2**30
    return 64 if free >= 48 else 32 if free >= 20 else 16
