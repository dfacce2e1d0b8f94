"""How a tensor maps onto an image grid, so that transforms and generators can act on it.

A :class:`Layout` gives every dimension of a tensor a *role*:

====  ==========================================================================================
role  meaning
====  ==========================================================================================
b     batch (images); the generator acts on each entry separately
c     channel or any other non-spatial index (heads, hidden units, classes)
h, w  rows and columns of a pixel grid (at most one pair per tensor)
n     a token sequence over a grid: ``num_prefix`` leading non-grid tokens (class, distillation,
      register) then ``grid[0] * grid[1]`` patch tokens in row-major order. A tensor may have
      several ``n`` dimensions (an attention matrix has two), all over the same grid.
====  ==========================================================================================

Common layouts have names: :data:`BCHW` (PyTorch feature maps), :data:`BHWC` (channels last, as in
timm ConvNeXt/Swin blocks), ``Layout.tokens(grid, num_prefix)`` for (B, N, C) token sequences, and
:data:`INVARIANT` for tensors with no spatial structure (logits, pooled features), on which every
spatial transform acts as the identity. A tensor with several spatial dimensions transforms on each
(``A -> P A P^T`` for an attention matrix), so its generator is the sum over them (product rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Layout",
    "BCHW",
    "BHWC",
    "INVARIANT",
    "WINDOW_ROLES",
    "infer_layout",
    "coarsens_grid",
    "map_spatial",
    "window_grid",
]

ROLES = ("b", "c", "h", "w", "n", "ho", "hi", "wo", "wi", "bw", "ni")
WINDOW_ROLES = frozenset({"ho", "hi", "wo", "wi", "bw", "ni"})
"""Roles of window-partitioned grids (Swin): a grid axis split into window index and position in the
window (``ho``/``hi``, ``wo``/``wi``), the batch merged with the window indices (``bw``, batch-major),
and the positions within a window flattened (``ni``, row-major)."""
_FACTORS = {"bw": ("b", "ho", "wo"), "ni": ("hi", "wi")}


@dataclass(frozen=True)
class Layout:
    """Roles of a tensor's dimensions (``roles=None``: invariant, any rank).

    Parameters
    ----------
    roles:
        One of ``"b", "c", "h", "w", "n"`` per dimension (or a window role of
        :data:`WINDOW_ROLES`), or ``None`` for an invariant tensor.
    grid:
        (rows, cols) of the token grid, required when a role is ``"n"``; the full pixel grid (H, W)
        with window roles.
    num_prefix:
        Leading non-grid tokens along every ``"n"`` dimension.
    window:
        (rows, cols) of a window, with window roles.
    """

    roles: tuple[str, ...] | None = None
    grid: tuple[int, int] | None = None
    num_prefix: int = 0
    window: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.roles is None:
            return
        bad = [r for r in self.roles if r not in ROLES]
        if bad:
            raise ValueError(f"unknown layout roles {bad}; valid roles: {', '.join(ROLES)}")
        factors = self.factors
        hs = sorted(f for f in factors if f in ("h", "ho", "hi"))
        ws = sorted(f for f in factors if f in ("w", "wo", "wi"))
        if hs not in ([], ["h"], ["hi", "ho"]) or ws not in ([], ["w"], ["wi", "wo"]) or bool(hs) != bool(ws):
            raise ValueError(
                f"a layout needs the rows and the columns of one grid (an 'h' and a 'w', or their "
                f"window parts) or neither, got {self.roles}"
            )
        if WINDOW_ROLES & set(self.roles) and (self.window is None or self.grid is None or "n" in self.roles):
            raise ValueError("a layout with window roles needs grid=(H, W) and window=(rows, cols), no 'n'")
        if "n" in self.roles and (self.grid is None or len(self.grid) != 2):
            raise ValueError("a layout with token dimensions ('n') needs grid=(rows, cols)")

    # -- constructors and names -------------------------------------------------------------
    @staticmethod
    def tokens(grid: tuple[int, int], num_prefix: int = 0) -> Layout:
        """A (B, N, C) token layout with ``num_prefix`` leading non-grid tokens."""
        return Layout(("b", "n", "c"), (int(grid[0]), int(grid[1])), int(num_prefix))

    @property
    def kind(self) -> str:
        """A short name: ``bchw``, ``bhwc``, ``tokens``, ``invariant`` or the roles joined."""
        if not self.is_image_like:
            return "invariant"
        named = {
            ("b", "c", "h", "w"): "bchw",
            ("b", "h", "w", "c"): "bhwc",
            ("b", "n", "c"): "tokens",
            ("bw", "ni", "c"): "windows",
            ("bw", "hi", "wi", "c"): "windows2d",
        }
        return named.get(self.roles, "".join(self.roles))

    def __str__(self) -> str:
        if self.windowed:
            return f"{self.kind}({self.grid[0]}x{self.grid[1]}/{self.window[0]}x{self.window[1]})"
        if "n" in (self.roles or ()):
            extra = f"+{self.num_prefix}" if self.num_prefix else ""
            return f"{self.kind}({self.grid[0]}x{self.grid[1]}{extra})"
        return self.kind

    @property
    def is_image_like(self) -> bool:
        """True when spatial transforms act on the tensor."""
        return self.roles is not None and any(r in ("h", "w", "n") or r in WINDOW_ROLES for r in self.roles)

    @property
    def factors(self) -> tuple[str, ...]:
        """The roles with merged window roles expanded (``bw`` -> b, ho, wo; ``ni`` -> hi, wi)."""
        return tuple(f for r in self.roles or () for f in _FACTORS.get(r, (r,)))

    @property
    def windowed(self) -> bool:
        """True when the grid is window-partitioned (Swin)."""
        return bool(WINDOW_ROLES & set(self.roles or ()))

    def _factor_sizes(self, shape: tuple[int, ...]) -> list[int]:
        """Sizes of :attr:`factors` for a tensor of ``shape`` (window layouts)."""
        (gh, gw), (wh, ww) = self.grid, self.window
        sizes: list[int] = []
        for r, n in zip(self.roles, shape, strict=True):
            if r == "bw":
                sizes += [n // ((gh // wh) * (gw // ww)), gh // wh, gw // ww]
            elif r == "ni":
                sizes += [wh, ww]
            else:
                sizes.append(n)
        return sizes

    def grid_size(self, x: torch.Tensor) -> tuple[int, int] | None:
        """(rows, cols) of the grid that ``x`` carries in this layout (its pixel or token grid, the
        full grid of a window-partitioned one); None when invariant."""
        if not self.is_image_like:
            return None
        if "h" in self.roles:
            return int(x.shape[self.roles.index("h")]), int(x.shape[self.roles.index("w")])
        return self.grid

    @property
    def num_tokens(self) -> int:
        """Length of an ``n`` dimension (prefix + grid)."""
        return self.num_prefix + self.grid[0] * self.grid[1] if self.grid else 0

    def check(self, x: torch.Tensor) -> None:
        """Raise a clear error when ``x`` cannot have this layout."""
        if self.roles is None:
            return
        if x.dim() != len(self.roles):
            raise ValueError(f"layout {self} needs a {len(self.roles)}-D tensor, got shape {tuple(x.shape)}")
        if self.windowed:
            (gh, gw), (wh, ww) = self.grid, self.window
            want = {"ho": gh // wh, "hi": wh, "wo": gw // ww, "wi": ww, "ni": wh * ww}
            for d, r in enumerate(self.roles):
                bad = (r in want and x.shape[d] != want[r]) or (
                    r == "bw" and x.shape[d] % ((gh // wh) * (gw // ww))
                )
                if bad or gh % wh or gw % ww:
                    raise ValueError(f"layout {self} does not fit dim {d} of shape {tuple(x.shape)}")
        for d, r in enumerate(self.roles):
            if r == "n" and x.shape[d] != self.num_tokens:
                raise ValueError(
                    f"layout {self} needs {self.num_tokens} tokens along dim {d}, got shape {tuple(x.shape)}"
                )

    # -- single-grid views (bchw, bhwc, tokens) ---------------------------------------------
    def _single_grid(self) -> None:
        if self.roles not in (("b", "c", "h", "w"), ("b", "h", "w", "c"), ("b", "n", "c")):
            raise ValueError(f"layout {self} is not a single (B, C, H, W)-like grid")

    def to_bchw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """View a bchw/bhwc/tokens tensor as (B, C, H, W); also returns the prefix tokens (or None)."""
        self._single_grid()
        self.check(x)
        if self.kind == "bchw":
            return x, None
        if self.kind == "bhwc":
            return x.permute(0, 3, 1, 2), None
        b, _, c = x.shape
        h, w = self.grid
        prefix = x[:, : self.num_prefix]
        return x[:, self.num_prefix :].reshape(b, h, w, c).permute(0, 3, 1, 2), prefix

    def from_bchw(self, img: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`to_bchw`; ``prefix`` fills the prefix tokens (zeros when None)."""
        self._single_grid()
        if self.kind == "bchw":
            return img
        if self.kind == "bhwc":
            return img.permute(0, 2, 3, 1)
        b, c = img.shape[:2]
        seq = img.permute(0, 2, 3, 1).reshape(b, -1, c)
        if prefix is None:
            prefix = seq.new_zeros(b, self.num_prefix, c)
        return torch.cat([prefix, seq], dim=1)


BCHW = Layout(("b", "c", "h", "w"))
BHWC = Layout(("b", "h", "w", "c"))
INVARIANT = Layout(None)


def map_spatial(x: torch.Tensor, layout: Layout, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum over the tensor's spatial groups of ``fn`` applied on that group's grid.

    ``fn`` maps an (M, 1, H, W) or (B, C, H, W) stack of images to the same shape (a linear,
    per-image operator such as a generator). Prefix tokens get 0. Returns a tensor shaped like ``x``.
    """
    layout.check(x)
    if not layout.is_image_like:
        return torch.zeros_like(x)
    roles = layout.roles
    if roles == ("b", "c", "h", "w"):
        return fn(x)
    if layout.windowed:
        return _map_windows(x, layout, fn)
    parts: list[torch.Tensor] = []
    if "h" in roles:
        dh, dw = roles.index("h"), roles.index("w")
        moved = x.movedim((dh, dw), (-2, -1))  # a view: (B, C, H, W) for BHWC, no copy
        parts.append(_on_grid(moved, fn).movedim((-2, -1), (dh, dw)))
    gh, gw = layout.grid or (0, 0)
    p = layout.num_prefix
    for d, r in enumerate(roles):
        if r != "n":
            continue
        grid = x.narrow(d, p, gh * gw).unflatten(d, (gh, gw)).movedim((d, d + 1), (-2, -1))
        dgrid = _on_grid(grid, fn).movedim((-2, -1), (d, d + 1)).flatten(d, d + 1)
        if p:  # prefix tokens (class, distillation, register) get 0
            zeros = dgrid.new_zeros((*dgrid.shape[:d], p, *dgrid.shape[d + 1 :]))
            dgrid = torch.cat([zeros, dgrid], dim=d)
        parts.append(dgrid)
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def _map_windows(x: torch.Tensor, layout: Layout, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` on the full grid a window-partitioned tensor stands for: windows put back in place,
    ``fn`` applied, and partitioned again."""
    img, sizes, order = _window_grid(x, layout)
    out = fn(img).reshape([sizes[k] for k in order])
    inverse = [0] * len(order)
    for i, k in enumerate(order):
        inverse[k] = i
    return out.permute(inverse).reshape(x.shape)


def window_grid(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A window-partitioned tensor (Swin) as the (B, C, H, W) grid it stands for (windows put back)."""
    return _window_grid(x, layout)[0]


def _window_grid(x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, list[int], list[int]]:
    factors = layout.factors
    sizes = layout._factor_sizes(tuple(x.shape))
    order = (
        [k for k, f in enumerate(factors) if f == "b"]
        + [k for k, f in enumerate(factors) if f == "c"]
        + [factors.index(f) for f in ("h", "ho", "hi") if f in factors]
        + [factors.index(f) for f in ("w", "wo", "wi") if f in factors]
    )
    grid = layout.grid
    lead_b = math.prod(sizes[k] for k, f in enumerate(factors) if f == "b")
    lead_c = math.prod(sizes[k] for k, f in enumerate(factors) if f == "c")
    img = x.reshape(sizes).permute(order).reshape(lead_b, lead_c, *grid)
    return img, sizes, order


def _on_grid(grid: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` on a (..., H, W) view: as is when 4-D (strides kept, no copy), else as (M, 1, H, W)."""
    if grid.dim() == 4:
        return fn(grid)
    lead = grid.shape[:-2]
    return fn(grid.reshape(-1, 1, *grid.shape[-2:])).reshape(*lead, *grid.shape[-2:])


def infer_layout(x: torch.Tensor, model: nn.Module | None = None) -> Layout:
    """Infer the layout of a model output (or input) from its shape and the model.

    2-D tensors and (B, C, 1, 1) maps are invariant; other 4-D tensors are BCHW; 3-D token tensors
    take their grid from ``model.patch_embed.grid_size`` and prefix count from
    ``model.num_prefix_tokens`` (timm's ViT family), never from N being a square.

    Raises
    ------
    ValueError
        When the layout cannot be inferred; the message says how to pass it explicitly.
    """
    if x.dim() <= 2 or (x.dim() == 4 and x.shape[-2:] == (1, 1)):
        return INVARIANT
    if x.dim() == 4:
        return BCHW
    if x.dim() == 3 and model is not None:
        pe = getattr(model, "patch_embed", None)
        grid = getattr(pe, "grid_size", None)
        if grid is not None:
            layout = Layout.tokens(tuple(grid), getattr(model, "num_prefix_tokens", 0))
            if x.shape[1] == layout.num_tokens:
                return layout
    raise ValueError(
        f"cannot infer the spatial layout of a tensor of shape {tuple(x.shape)}; pass it explicitly, "
        "e.g. layout=Layout.tokens(grid=(14, 14), num_prefix=1), layouts.BHWC or layouts.INVARIANT"
    )


def coarsens_grid(
    layout: Layout | None, x: torch.Tensor, out_layout: Layout | None, out: torch.Tensor
) -> bool:
    """Whether ``out`` (in ``out_layout``) lies on a grid of fewer positions than ``x`` (in ``layout``):
    a data move that does so is a patchify (space-to-depth), not an exactly equivariant relabelling."""
    if layout is None or out_layout is None:
        return False
    before, after = layout.grid_size(x), out_layout.grid_size(out)
    return before is not None and after is not None and after[0] * after[1] < before[0] * before[1]
