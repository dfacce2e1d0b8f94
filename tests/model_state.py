"""A model's state as aliasscope must give it back: weights, train/eval flags and hooks per module."""

from __future__ import annotations

import torch
from torch import nn

Snapshot = tuple[dict[str, torch.Tensor], list[bool], list[int]]


def _hooks(model: nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    ]


def snapshot(model: nn.Module) -> Snapshot:
    """Copies of the state dict, every module's training flag and every module's hook count."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()], _hooks(model)


def assert_unchanged(model: nn.Module, snap: Snapshot) -> None:
    """The model is exactly as :func:`snapshot` saw it."""
    state, modes, hooks = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert _hooks(model) == hooks
