"""How a tensor maps onto an image grid, so that transforms and generators can act on it.

=============  ==================================================================================
layout         meaning
=============  ==================================================================================
``bchw``       (B, C, H, W) feature maps, the PyTorch convention
``bhwc``       (B, H, W, C) channels-last maps (timm ConvNeXt / Swin blocks)
``tokens``     (B, N, C) token sequences: ``num_prefix`` leading tokens (class, distillation,
               register) that do not live on the grid, then ``grid[0] * grid[1]`` patch tokens in
               row-major order
``invariant``  anything that carries no spatial structure (logits, pooled features): every spatial
               transform acts on it as the identity, so its generator is 0
=============  ==================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["Layout", "BCHW", "BHWC", "INVARIANT", "infer_layout"]

LayoutKind = Literal["bchw", "bhwc", "tokens", "invariant"]


@dataclass(frozen=True)
class Layout:
    """The spatial layout of a tensor. Build one with the constants or :meth:`tokens`."""

    kind: LayoutKind
    grid: tuple[int, int] | None = None
    num_prefix: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("bchw", "bhwc", "tokens", "invariant"):
            raise ValueError(f"unknown layout kind {self.kind!r}; valid: bchw, bhwc, tokens, invariant")
        if self.kind == "tokens" and (self.grid is None or len(self.grid) != 2):
            raise ValueError("a tokens layout needs grid=(rows, cols)")

    @staticmethod
    def tokens(grid: tuple[int, int], num_prefix: int = 0) -> Layout:
        """A (B, N, C) token layout with ``num_prefix`` leading non-grid tokens."""
        return Layout("tokens", (int(grid[0]), int(grid[1])), int(num_prefix))

    @property
    def is_image_like(self) -> bool:
        """True when spatial transforms act on the tensor (everything but ``invariant``)."""
        return self.kind != "invariant"

    def check(self, x: torch.Tensor) -> None:
        """Raise a clear error when ``x`` cannot have this layout."""
        want = {"bchw": 4, "bhwc": 4, "tokens": 3}.get(self.kind)
        if want is not None and x.dim() != want:
            raise ValueError(f"a {self.kind} layout needs a {want}-D tensor, got shape {tuple(x.shape)}")
        if self.kind == "tokens":
            n = self.num_prefix + self.grid[0] * self.grid[1]
            if x.shape[1] != n:
                raise ValueError(
                    f"tokens layout with grid {self.grid} and {self.num_prefix} prefix tokens needs "
                    f"N = {n}, got shape {tuple(x.shape)}"
                )

    def to_bchw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """View ``x`` as (B, C, H, W); also returns the prefix tokens (or ``None``)."""
        self.check(x)
        if self.kind == "bchw":
            return x, None
        if self.kind == "bhwc":
            return x.permute(0, 3, 1, 2), None
        if self.kind == "tokens":
            b, _, c = x.shape
            h, w = self.grid
            prefix = x[:, : self.num_prefix]
            img = x[:, self.num_prefix :].reshape(b, h, w, c).permute(0, 3, 1, 2)
            return img, prefix
        raise ValueError("an invariant tensor has no image grid")

    def from_bchw(self, img: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`to_bchw`; ``prefix`` fills the prefix tokens (zeros when ``None``)."""
        if self.kind == "bchw":
            return img
        if self.kind == "bhwc":
            return img.permute(0, 2, 3, 1)
        if self.kind == "tokens":
            b, c = img.shape[:2]
            seq = img.permute(0, 2, 3, 1).reshape(b, -1, c)
            if prefix is None:
                prefix = seq.new_zeros(b, self.num_prefix, c)
            return torch.cat([prefix, seq], dim=1)
        raise ValueError("an invariant tensor has no image grid")


BCHW = Layout("bchw")
BHWC = Layout("bhwc")
INVARIANT = Layout("invariant")


def infer_layout(x: torch.Tensor, model: nn.Module | None = None) -> Layout:
    """Infer the layout of a model output (or any activation) from its shape and the model.

    2-D tensors and (B, C, 1, 1) maps are invariant; other 4-D tensors are BCHW; 3-D token tensors
    take their grid from ``model.patch_embed.grid_size`` and prefix count from
    ``model.num_prefix_tokens`` (timm's ViT family), never from N being a square.

    Raises
    ------
    ValueError
        When the layout cannot be inferred; the message says how to pass it explicitly.
    """
    if x.dim() == 2 or (x.dim() == 4 and x.shape[-2:] == (1, 1)):
        return INVARIANT
    if x.dim() == 4:
        return BCHW
    if x.dim() == 3 and model is not None:
        pe = getattr(model, "patch_embed", None)
        grid = getattr(pe, "grid_size", None)
        if grid is not None:
            layout = Layout.tokens(tuple(grid), getattr(model, "num_prefix_tokens", 0))
            if x.shape[1] == layout.num_prefix + layout.grid[0] * layout.grid[1]:
                return layout
    raise ValueError(
        f"cannot infer the spatial layout of a tensor of shape {tuple(x.shape)}; pass it explicitly, "
        "e.g. layout=Layout.tokens(grid=(14, 14), num_prefix=1), layouts.BHWC or layouts.INVARIANT"
    )
