"""What a model is, for the sweep's table: its architecture type (from its modules), family, size and
FLOPs per image.

Types follow the paper's grouping. A model *attends* when one of its modules is self-attention:
``nn.MultiheadAttention``, a module with query/key projections (``qkv``, ``qk``, ``q`` with ``k`` or
``kv``, ``query`` with ``key``, ``q_proj`` with ``k_proj``), or a class named ``...Attention``. Gates
(squeeze-excitation, CBAM's ``ChannelAttn``, ResNeSt's ``SplitAttn``) are not attention. A *spatial
convolution* has a kernel larger than one and is not a patchify (kernel equal to stride, as a ViT's
patch embedding):

=============  ==============================================
``ViT``        attends, no spatial convolution
``hybrid``     attends and has spatial convolutions
``Mixer-MLP``  neither: mixes tokens with linear layers
``CNN``        spatial convolutions, no attention
=============  ==============================================
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = ["ARCHITECTURE_TYPES", "architecture_type", "family", "flops_per_image", "parameter_count"]

ARCHITECTURE_TYPES = ("CNN", "ViT", "hybrid", "Mixer-MLP")
"""Every type :func:`architecture_type` gives."""

_ATTENTION = re.compile(r"Attention\d*$")
_GATES = re.compile(r"(Channel|Spatial|Light|Squeeze|Eca|Cbam|Gather|Excite|Split|Selective)", re.IGNORECASE)
_PROJECTIONS = (
    ("qkv",),
    ("qk",),
    ("q", "k"),
    ("q", "kv"),
    ("query", "key"),
    ("q_proj", "k_proj"),
    ("to_qkv",),
)


def _attends(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    name = type(module).__name__
    if _GATES.search(name):
        return False
    children = dict(module.named_children())
    if any(
        all(isinstance(children.get(p), nn.Linear | nn.Conv1d | nn.Conv2d) for p in group)
        for group in _PROJECTIONS
    ):
        return True
    return bool(_ATTENTION.search(name))


def _spatial_conv(module: nn.Module) -> bool:
    if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return False
    kernel, stride = tuple(module.kernel_size), tuple(module.stride)
    return any(k > 1 for k in kernel) and kernel != stride


def architecture_type(model: nn.Module) -> str:
    """``CNN``, ``ViT``, ``hybrid`` or ``Mixer-MLP`` from the model's modules (module docstring)."""
    attends = convolves = False
    for module in model.modules():
        attends = attends or _attends(module)
        convolves = convolves or _spatial_conv(module)
    if attends:
        return "hybrid" if convolves else "ViT"
    return "CNN" if convolves else "Mixer-MLP"


def family(name: str) -> str:
    """The timm module that defines architecture ``name`` (``resnet``, ``vision_transformer``, ...);
    the source prefix for other sources (``torchvision``, ``hf-hub``, ``python``, ...)."""
    import timm
    from timm.models import get_arch_name, is_model, model_entrypoint

    if name.startswith("hf-hub:"):
        return "hf-hub"
    arch = get_arch_name(name)
    if is_model(arch) and timm.is_model(arch):
        return model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
    return name.split(":", 1)[0] if ":" in name else "other"


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (each shared tensor once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def flops_per_image(model: nn.Module, image: torch.Tensor) -> float:
    """FLOPs of one forward pass of one image (torch's ``FlopCounterMode``: 2 per multiply-add, over
    the ops it has formulas for: convolutions, matmuls, attention). NaN when the count fails."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(image[:1])
    except Exception:  # noqa: BLE001 - a count is a column, never a reason to fail the model
        return float("nan")
    return float(counter.get_total_flops())
