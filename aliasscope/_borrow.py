"""Models are borrowed, never changed: input checks and the context that gives a model back intact."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["borrowed", "check_images", "expected_in_channels"]

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


@contextmanager
def borrowed(model: nn.Module) -> Iterator[nn.Module]:
    """Use ``model`` in eval mode and give it back exactly as it came, even if an error is raised.

    Restores every submodule's train/eval flag and removes any hook registered on any submodule
    while borrowed. Parameters are never written by aliasscope's analyses. TF32 math is switched
    off while borrowed (full float32 precision) and the previous settings are restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    modules = list(model.modules())
    modes = [m.training for m in modules]
    hooks = [{name: set(getattr(m, name, {}).keys()) for name in _HOOK_DICTS} for m in modules]
    saved_precision = _full_float32()
    try:
        model.eval()
        yield model
    finally:
        _restore_precision(saved_precision)
        for m, mode, before in zip(modules, modes, hooks, strict=True):
            m.training = mode
            for name, keys in before.items():
                d = getattr(m, name, None)
                if d is None:
                    continue
                for k in [k for k in d if k not in keys]:
                    del d[k]


def _precision_knobs() -> list[tuple[object, str]]:
    """(object, attribute) pairs that control TF32: the new per-backend API where torch has it."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return [
            (torch.backends.cuda.matmul, "fp32_precision"),
            (torch.backends.cudnn.conv, "fp32_precision"),
            (torch.backends.cudnn.rnn, "fp32_precision"),
        ]
    return [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]


def _full_float32() -> list[tuple[object, str, object]]:
    """Switch TF32 off (it keeps 10 mantissa bits: enough to break float32 completeness checks at
    1e-3 on Ampere+ GPUs, where cuDNN convolutions use it by default); returns what to restore."""
    saved = [(obj, name, getattr(obj, name)) for obj, name in _precision_knobs()]
    for obj, name, _ in saved:
        setattr(obj, name, "ieee" if name == "fp32_precision" else False)
    return saved


def _restore_precision(saved: list[tuple[object, str, object]]) -> None:
    for obj, name, value in saved:
        setattr(obj, name, value)


def expected_in_channels(model: nn.Module) -> int | None:
    """Input channels the model expects: timm's ``pretrained_cfg['input_size'][0]``, else the first conv's."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        return int(cfg["input_size"][0])
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return None


def _param_dtype_device(model: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    for p in model.parameters():
        return p.dtype, p.device
    return None, None


def check_images(images: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
    """Validate a (B, C, H, W) image batch for ``model``; returns it on the model's device.

    Raises
    ------
    TypeError
        Not a floating-point tensor.
    ValueError
        Not 4-D, empty, too small, wrong channel count for the model, NaN/inf values, or a dtype
        that differs from the model's parameters.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}"
            + (" (add a batch dimension with images[None])" if images.dim() == 3 else "")
        )
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point, got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if images.is_meta:
        raise ValueError("images are on the meta device (shapes without data); pass real tensors")
    if min(images.shape[-2:]) < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"images contain NaN or inf values (batch indices {bad[:10]})")
    if model is None:
        return images
    want = expected_in_channels(model)
    if want is not None and images.shape[1] != want:
        raise ValueError(
            f"the model expects {want} input channels, but images have shape {tuple(images.shape)}"
        )
    dtype, device = _param_dtype_device(model)
    half = {torch.float16, torch.bfloat16}
    if images.dtype in half or dtype in half:
        raise ValueError(
            f"aliasscope computes in float32 or float64, but the {'model' if dtype in half else 'images'} "
            f"{'is' if dtype in half else 'are'} {dtype if dtype in half else images.dtype}: half precision "
            "has 8-11 mantissa bits, too few for derivatives and completeness checks (errors of several "
            "percent, reported as exact); pass model.float() and images.float()"
        )
    if dtype is not None and dtype != images.dtype:
        raise ValueError(
            f"images are {images.dtype} but the model's parameters are {dtype}: convert one of them "
            f"(e.g. model.double() and images.double())"
        )
    return images if device is None else images.to(device)
