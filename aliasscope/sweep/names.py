"""Model names of a sweep, resolved to what timm builds today.

A request is timm names, ``arch.tag`` names, glob patterns (``'vit_*'``, matched against
``timm.list_models``), ``hf-hub:org/name``, a text file (one per line, ``#`` comments), or ``paper``
(the paper's list, :func:`paper_models`). :func:`resolve` gives each name one status:

``current``
    A timm architecture (or ``arch.tag``) of today; with pretrained weights, the model is its
    default ``arch.tag``.
``renamed``
    A deprecated timm name that timm maps onto its new ``arch.tag`` (``adv_inception_v3`` ->
    ``inception_v3.tf_adv_in1k``).
``remapped``
    A deprecated name that timm maps onto *another* model's weights: several old names share one
    target and the target's architecture is not the one the old name names
    (``ig_resnext101_32x16d`` -> ``resnext101_32x8d.fb_wsl_ig1b_ft_in1k``). Not evaluated: its
    numbers would be another model's.
``no_weights``
    A current architecture with no pretrained weights in timm (random init only, flagged).
``hub``
    An ``hf-hub:`` name, passed on as it is.
``source``
    A model of another :data:`aliasscope.models.SOURCES` entry (``torchvision:``, ``transformers:``,
    ``python:``, a checkpoint file), passed on to :func:`aliasscope.models.load_model` as it is.
``gone``
    Not in timm any more (deprecated without a successor, or unknown).
"""

from __future__ import annotations

import fnmatch
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["STATUSES", "Resolved", "expand", "paper_models", "resolution_rows", "resolve", "summary"]

STATUSES = ("current", "renamed", "remapped", "no_weights", "hub", "source", "gone")
"""Every status :func:`resolve` gives, in the order :func:`summary` lists them."""

EVALUATED = ("current", "renamed", "no_weights", "hub", "source")
"""Statuses whose model a sweep builds (``no_weights`` only with random init allowed)."""


CHECKPOINTS = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")
"""File suffixes :func:`expand` takes for a checkpoint (a model), not a list of names."""


@dataclass(frozen=True)
class Resolved:
    """One requested name: the ``model`` to build (timm ``arch.tag``, an architecture without
    weights, or ``hf-hub:...``; None when it is not evaluated), its ``status`` and a ``note``."""

    requested: str
    model: str | None
    status: str
    note: str = ""

    @property
    def evaluated(self) -> bool:
        """Whether a sweep builds this model."""
        return self.status in EVALUATED


def paper_models() -> list[str]:
    """The paper's sweep list: its 483 unique timm model names, in 2022 timm spelling."""
    text = resources.files(__package__).joinpath("paper_models.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def expand(models: str | Sequence[str]) -> list[str]:
    """The names a request stands for, in order, each once: ``paper``, a text file, glob patterns
    (against every timm architecture), or names as they are (``arch``, ``arch.tag``, ``hf-hub:``,
    other model sources' specs; a checkpoint file is a model, not a list).
    Raises ValueError for a pattern that matches nothing (naming it)."""
    import timm

    items = [models] if isinstance(models, str) else list(models)
    out: list[str] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if item == "paper":
            out += paper_models()
        elif ":" not in item and Path(item).is_file() and Path(item).suffix.lower() not in CHECKPOINTS:
            lines = (line.split("#", 1)[0].strip() for line in Path(item).read_text().splitlines())
            out += expand([line for line in lines if line])
        elif any(c in item for c in "*?["):
            matched = sorted(fnmatch.filter(timm.list_models(), item))
            if not matched:
                raise ValueError(f"the pattern {item!r} matches no timm model (timm.list_models())")
            out += matched
        else:
            out.append(item)
    return list(dict.fromkeys(out))


def resolve(names: Iterable[str]) -> list[Resolved]:
    """Each name's status and the model a sweep builds for it (see the module docstring)."""
    import timm
    from timm.models import _registry as registry

    deprecated: dict[str, str | None] = dict(registry._deprecated_models)
    sharing: dict[str, list[str]] = defaultdict(list)
    for old, new in deprecated.items():
        if new is not None:
            sharing[new].append(old)
    architectures = set(timm.list_models())
    pretrained = set(timm.list_models(pretrained=True))
    out = []
    for name in names:
        out.append(_resolve_one(name, deprecated, sharing, architectures, pretrained))
    return out


def _resolve_one(name, deprecated, sharing, architectures, pretrained) -> Resolved:
    from timm.models import _registry as registry

    if name.startswith("hf-hub:"):
        return Resolved(name, name, "hub")
    source = _other_source(name)
    if source is not None:
        return Resolved(name, name, "source", f"built by the {source!r} model source")
    if name in deprecated:
        new = deprecated[name]
        if new is None:
            return Resolved(name, None, "gone", "deprecated in timm without a successor")
        arch = registry.get_arch_name(new)
        if len(sharing[new]) > 1 and arch not in name:
            note = f"timm maps it onto {new}: the weights of {arch}, not of this model"
            return Resolved(name, None, "remapped", f"{note} ({len(sharing[new])} old names share them)")
        if not registry.split_model_name_tag(new)[1]:  # an architecture: its default weights
            new = _default_tag(new) or new
        return Resolved(name, new, "renamed", f"timm's current name: {new}")
    arch, tag = registry.split_model_name_tag(name)
    if arch not in architectures:
        return Resolved(name, None, "gone", "not a timm model (timm.list_models())")
    if tag:
        if name in pretrained:
            return Resolved(name, name, "current")
        return Resolved(name, None, "gone", f"{arch} has no weights tagged {tag!r}")
    if not _has_weights(arch, pretrained):
        return Resolved(name, arch, "no_weights", "no pretrained weights in timm: random init only")
    return Resolved(name, _default_tag(arch) or arch, "current")


def _other_source(name: str) -> str | None:
    """The name of the model source other than timm's (and the bundled weights) that claims
    ``name``, else None."""
    from ..models import SOURCES

    claimed = next((source.name for source in SOURCES.values() if source.claims(name)), None)
    return None if claimed in ("bundled", "timm") else claimed


def _has_weights(arch: str, pretrained: set[str]) -> bool:
    return arch in pretrained or any(p.startswith(arch + ".") for p in pretrained)


def _default_tag(arch: str) -> str | None:
    """``arch.tag`` of the weights ``timm.create_model(arch, pretrained=True)`` loads."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    tag = getattr(cfg, "tag", None) if cfg is not None else None
    return f"{arch}.{tag}" if tag else None


def summary(resolved: Sequence[Resolved]) -> dict[str, int]:
    """How many names have each status (every status listed, zeros included)."""
    counts = Counter(r.status for r in resolved)
    return {status: counts.get(status, 0) for status in STATUSES}


def resolution_rows(resolved: Sequence[Resolved]) -> list[dict[str, str]]:
    """One row per name (requested, model, status, note): what was renamed, remapped or is gone."""
    return [
        {"requested": r.requested, "model": r.model or "", "status": r.status, "note": r.note}
        for r in resolved
    ]
