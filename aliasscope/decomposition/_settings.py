"""What one decomposition was asked for: every keyword of :func:`decompose`, validated once, frozen.

:func:`~aliasscope.decomposition.decompose` builds one :class:`Settings` from its keyword arguments
and hands it, whole, to every step (the methods, the CUDA-graph replay, the self-checks, the result),
instead of long parameter lists. A batch of a batched run gets its own copy
(:meth:`Settings.for_batch`): the target split with the images, no further batching.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..capture import OpRecord
from ..generators import get_generator
from ..layouts import Layout
from ..lie import Output, _output_fn
from ..transforms import get_transform

Target = int | Sequence[int] | torch.Tensor | str | Callable[[torch.Tensor], torch.Tensor]
"""The attributed scalar per image: a class index (or one per image), ``"pred"`` or a callable
mapping the (B, ...) output to (B,); ``None`` (in :class:`Settings`) is the whole output vector."""

Select = str | Sequence[str] | Callable[[OpRecord], bool] | None
"""Which ops a result lists: glob patterns on names or kind names, or a predicate (None: all)."""

METHODS = ("exact", "probe")
VERIFY = ("jvp", "fd", None)


@dataclass(frozen=True, eq=False)
class Settings:
    """The keyword arguments of :func:`~aliasscope.decomposition.decompose` (same names, same
    meanings, same defaults; see its docstring), checked on construction.

    ``eq=False``: settings hold tensors, dicts and callables, which have no useful equality.
    """

    transform: str
    target: Target | None = "pred"
    output: Output = "logits"
    method: str = "exact"
    generator: str = "central"
    select: Select = None
    layouts: dict[str, Layout] | None = None
    units: Sequence[str] | str = ()
    keep_maps: bool = False
    num_probes: int = 100
    group_size: int | None = None
    seed: int = 0
    progress: bool = False
    batch_size: int | None = None
    cuda_graph: bool | None = None
    verify: str | None = "jvp"

    def __post_init__(self) -> None:
        """Raise for an unknown transform, generator, method or verify, or a probe with a target
        (``batch_size`` is checked by ``decompose`` after the model and the images, ``output`` where
        its head is first used: the order of the errors is unchanged)."""
        get_transform(self.transform)
        get_generator(self.generator)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: 'exact', 'probe'")
        if self.method == "probe" and self.target is not None:
            raise ValueError("method='probe' estimates the norm of the whole output vector: use target=None")
        if self.verify not in VERIFY:
            raise ValueError(f"verify must be 'jvp', 'fd' or None, got {self.verify!r}")

    @property
    def vector(self) -> bool:
        """Whether the whole output vector is attributed (``target=None``)."""
        return self.target is None

    @property
    def head(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``output`` as a function of the model's output (None: the logits as they are)."""
        return _output_fn(self.output)

    def for_batch(self, target: Target | None, **changes: Any) -> Settings:
        """These settings for one batch of a batched run: its ``target`` (split with the images
        where there is one per image), no further batching and no CUDA graph, plus ``changes``."""
        return dataclasses.replace(self, target=target, batch_size=None, cuda_graph=False, **changes)
