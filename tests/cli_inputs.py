"""What the CLI tests run on: a tiny random-init timm model, and photos written into a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TINY = ["--model", "test_efficientnet", "--no-pretrained", "--transforms", "translate_x", "rotate", "--quiet"]
LEAN = ["--no-layerwise", "--no-spectral", "--no-report"]  # each test turns on what it checks
PROVENANCE = ["model", "weights", "images", "num_images", "generator", "dtype", "device", "seed"]
PROVENANCE += ["aliasscope_version"]  # after every CSV's own columns


def photos(folder: Path, n: int = 3) -> Path:
    """``n`` random 40x50 RGB PNGs in ``folder`` (made if needed); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder
