"""Many models at once (``aliasscope sweep``, issue 18, in progress): which models a request names,
resolved to current timm names (:mod:`.names`). The paper's own sweep list (Gruver et al. 2023:
483 unique timm names, 2022 spelling) ships as package data (:func:`paper_models`)."""

from __future__ import annotations

from .names import STATUSES, Resolved, expand, paper_models, resolution_rows, resolve, summary

__all__ = ["STATUSES", "Resolved", "expand", "paper_models", "resolution_rows", "resolve", "summary"]
