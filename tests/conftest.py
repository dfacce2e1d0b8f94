"""Shared fixtures (helpers live in tests/helpers.py) and the thread count of the suite."""

from __future__ import annotations

import pytest
import torch
from helpers import smooth_cnn
from torch import nn

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def cnn() -> nn.Module:
    return smooth_cnn()
