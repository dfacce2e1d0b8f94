"""Recording every op of a forward pass: the stable import path of :mod:`aliasscope._recording`
(see its docstring), where the recorded data, the tracer, the collapse pass and the kind classifiers
live in modules of their own."""

from __future__ import annotations

from ._recording import PAPER_UNITS, OpRecord, Recording, record, select_ops
from ._recording import _tensors as _tensors
from .kinds import KINDS

__all__ = ["KINDS", "PAPER_UNITS", "OpRecord", "Recording", "record", "select_ops"]
