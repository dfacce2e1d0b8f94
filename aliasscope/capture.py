"""Recording every op of a forward pass: the stable import path of :mod:`aliasscope.recording`
(see its docstring), where the recorded data, the tracer, the collapse pass and the kind classifiers
live in modules of their own."""

from __future__ import annotations

from .kinds import KINDS
from .recording import PAPER_UNITS, OpRecord, Recording, record, select_ops
from .recording import _tensors as _tensors

__all__ = ["KINDS", "PAPER_UNITS", "OpRecord", "Recording", "record", "select_ops"]
