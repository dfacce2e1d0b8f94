"""Shared fixtures (helpers live in tests/helpers.py) and the thread count of the suite."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never reaches for a network (read at hub import)

import pytest
import torch
from helpers import smooth_cnn
from torch import nn

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def cnn() -> nn.Module:
    return smooth_cnn()
