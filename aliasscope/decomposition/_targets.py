"""The attributed scalar per image ``T``: class indices, ``"pred"`` or a callable on the output.

A class target ``k`` attributes ``T = F_k(x)`` (``output(model(x))`` at class ``k``), ``"pred"`` each
image's top class, a callable any ``(B, ...) -> (B,)`` map of the output. The exact scalar pass
differentiates ``T`` (:func:`target_values`); the self-checks recompute ``L_X T = dT/dF . L_X F``
from an independent ``L_X F`` with the same classes (:func:`picker`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._settings import Target


def per_image(target: Target | None, n: int) -> bool:
    """Whether ``target`` holds one class per image of ``n`` (a 1-D sequence or tensor of length
    ``n``): a batched run then splits it with the images."""
    one_d = isinstance(target, list | tuple) or (isinstance(target, torch.Tensor) and target.dim() == 1)
    return one_d and len(target) == n


def class_indices(target: Target, n: int, classes: int) -> torch.Tensor | None:
    """A class target as (n,) indices on the CPU, checked against ``classes``; None for "pred" or a
    callable (they need no per-batch input)."""
    if isinstance(target, str) or (callable(target) and not isinstance(target, torch.Tensor)):
        return None
    idx = torch.as_tensor(target)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(
            f"target must be an integer class index (or one per image), 'pred', None or a callable, got "
            f"{target!r} of dtype {idx.dtype}: a float or bool is not a class index"
        )
    idx = idx.long().cpu()
    idx = idx.expand(n) if idx.dim() == 0 else idx
    if idx.shape != (n,) or (idx < 0).any() or (idx >= classes).any():
        raise ValueError(f"target must be a class index in [0, {classes}) or one per image, got {target!r}")
    return idx


def describe(idx: torch.Tensor) -> str:
    """How a result names its class target: the class, or "per-image classes"."""
    return str(int(idx[0])) if (idx == idx[0]).all() else "per-image classes"


def picker(f: torch.Tensor, target: Target) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from the output to the attributed scalar per image, classes fixed as chosen on ``f``
    (``"pred"``: each image's top class here), for the independent checks of the total."""
    if callable(target) and not isinstance(target, torch.Tensor):
        return target
    if isinstance(target, str):
        idx = f.detach().argmax(1)
    elif isinstance(target, torch.Tensor) and target.dim() == 1 and target.device == f.device:
        idx = target
    else:
        idx = class_indices(target, f.shape[0], f.shape[1]).to(f.device)
    return lambda out: out.gather(1, idx.to(out.device)[:, None])[:, 0]


def target_values(f: torch.Tensor, target: Target, check: bool = True) -> tuple[torch.Tensor, str]:
    """The scalar per image that is attributed, and a description. ``check=False`` (a class-index
    tensor already validated on this output) runs no host-device synchronisation (CUDA graphs)."""
    if not check and isinstance(target, torch.Tensor):
        return f.gather(1, target[:, None])[:, 0], "per-image classes"
    if callable(target) and not isinstance(target, torch.Tensor):
        t = target(f)
        if not isinstance(t, torch.Tensor) or t.shape != (f.shape[0],):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            why = " (a reduction over the batch: reduce over the other dims only)" if got == () else ""
            raise ValueError(
                f"a target callable must return one scalar per image, a tensor of shape ({f.shape[0]},), "
                f"got {got}{why}; e.g. lambda f: f[:, 3] or lambda f: f.flatten(1).sum(1)"
            )
        return t, getattr(target, "__name__", "callable")
    if f.dim() != 2:
        raise ValueError(f"a class target needs (B, classes) outputs, got {tuple(f.shape)}; pass a callable")
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(f"unknown target {target!r}: use a class index, 'pred' or a callable")
        idx = f.detach().argmax(1)
        return f.gather(1, idx[:, None])[:, 0], "pred"
    idx = class_indices(target, f.shape[0], f.shape[1])
    return f.gather(1, idx.to(f.device)[:, None])[:, 0], describe(idx)
