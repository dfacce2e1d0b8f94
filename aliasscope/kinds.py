"""The op kinds: one registry of :class:`Kind` records, read by capture, plots, report and spectral.

A kind is what an op is for the analysis (a nonlinearity, a strided conv, a position embedding...):
:mod:`aliasscope.capture` gives every recorded op one, the figures colour ops by it, the report
suggests a fix per kind, and the decomposition skips ops of a ``zero`` kind whose layout does not
change. Everything a kind needs is in its record here, so adding one is one entry in
:data:`_BUILTIN` (as ``recurrent`` was) or one :func:`register_kind` call, plus its test:

    register_kind(Kind("padding", "explicit padding of an activation (F.pad)", colour="#c49c94",
                       precedence=115, functions={"pad"}))

:data:`KINDS` (name -> description), :data:`KIND_COLOURS` (name -> colour) and :data:`FIX_FOR_KIND`
(name -> (fix, advice)) are views of the registry, kept in step with it by :func:`register_kind` and
:func:`unregister_kind` (edit the registry, not them). Recognising an op by its arguments (strides,
sizes, layouts) is code and stays in :mod:`aliasscope._recording.classify`; recognising it by its
function name is data and lives here (:attr:`Kind.functions`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from .layout_rules import ACTIVATIONS, NORMS, PERMUTES, RESHAPES

__all__ = [
    "FIX_FOR_KIND",
    "KINDS",
    "KIND_COLOURS",
    "UNKNOWN_COLOUR",
    "Fix",
    "Kind",
    "get_kind",
    "is_pointwise_kind",
    "is_zero_kind",
    "kind_colour",
    "kind_names",
    "kind_of_function",
    "kind_order",
    "precedence_order",
    "register_kind",
    "unregister_kind",
]


class Fix(NamedTuple):
    """The fix to try first for a kind: ``name`` is an :data:`aliasscope.fixes.FIXES` name, or ``""``
    where no fix function applies and only the ``advice`` (one sentence, shown in the report) does."""

    name: str
    advice: str


@dataclass(frozen=True)
class Kind:
    """One op kind.

    Attributes
    ----------
    name, description:
        The kind's name (what ``OpRecord.kind`` holds) and one line saying which ops it covers.
    colour:
        Its colour in every figure (any matplotlib colour).
    precedence:
        Its rank (lower first) when a module recorded as one op makes inner calls of several kinds:
        the module gets the first of them. Unique over the registry.
    fix:
        The suggested fix (:class:`Fix`), or None.
    zero:
        Whether an op of this kind whose output keeps its input's layout is exactly equivariant
        (its local Lie derivative is 0 by construction: pure data movement).
    pointwise:
        Whether an op of this kind acts position by position, so that the spectral measure evaluates
        it on an upsampled grid (:mod:`aliasscope.spectrum`).
    functions:
        Torch function names (:func:`aliasscope.layout_rules.func_name`) that mean this kind: for the
        inner calls of a module recorded whole, and for direct calls except those capture reads from
        their arguments (convolutions and pooling by stride, interpolation by size, softmax by its
        dim, reductions, indexing and arithmetic by their inputs). A name belongs to one kind at most.
    names_region:
        Whether a region recorded whole (its inner layouts unknown) that contains an op of this kind
        is recorded as this kind (rather than as ``block``), as a Swin window attention is.
    """

    name: str
    description: str
    colour: str
    precedence: int
    fix: Fix | None = None
    zero: bool = False
    pointwise: bool = False
    functions: frozenset[str] = field(default=frozenset())
    names_region: bool = False

    def __post_init__(self) -> None:
        # a plain (name, advice) tuple is a Fix, any collection of names a frozenset
        if self.fix is not None and not isinstance(self.fix, Fix):
            if not (isinstance(self.fix, tuple | list) and len(self.fix) == 2):
                raise TypeError(
                    f"op kind {self.name!r}: fix must be Fix(name, advice) or None, got {self.fix!r}"
                )
            object.__setattr__(self, "fix", Fix(*self.fix))
        if isinstance(self.functions, str):
            raise TypeError(f"op kind {self.name!r}: functions must be a collection of names, not one string")
        object.__setattr__(self, "functions", frozenset(self.functions))


_LAYOUT_FUNCTIONS = (
    RESHAPES
    | PERMUTES
    | {
        "contiguous",
        "clone",
        "to",
        "float",
        "double",
        "half",
        "type",
        "type_as",
        "detach",
        "getitem",
        "cat",
        "concat",
        "concatenate",
        "stack",
        "unbind",
        "select",
        "split",
        "chunk",
        "tensor_split",
        "expand",
        "expand_as",
        "broadcast_to",
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "identity",
        "_unpack_dual",
        "_make_dual",
    }
)

_BUILTIN: tuple[Kind, ...] = (
    Kind(
        "nonlinearity",
        "pointwise nonlinearities and gating (ReLU, GELU, SiLU, sigmoid gates, x * y)",
        colour="#d62728",
        precedence=70,
        fix=Fix(
            "filtered_activation",
            "evaluate the nonlinearity at 2x resolution between band-limited up- and downsampling "
            "(aliasscope fix --fix filtered_activation)",
        ),
        pointwise=True,
        functions=ACTIVATIONS,
    ),
    Kind(
        "downsampling",
        "strided convolutions and pooling, patch merging, resizing down",
        colour="#1f77b4",
        precedence=30,
        fix=Fix(
            "blurpool",
            "blur before subsampling (aliasscope fix --fix blurpool), or adaptive polyphase sampling "
            "(--fix polyphase, exact for circular shifts with --fix circular_padding+polyphase)",
        ),
    ),
    Kind(
        "upsampling",
        "transposed convolutions, resizing up, pixel shuffle",
        colour="#17becf",
        precedence=40,
    ),
    Kind(
        "normalisation",
        "batch/layer/group/RMS norm",
        colour="#9467bd",
        precedence=80,
        fix=Fix(
            "filtered_activation",
            "a LayerNorm over channels acts per pixel like a nonlinearity: "
            "--fix filtered_activation wraps it",
        ),
        functions=NORMS,
    ),
    Kind(
        "attention",
        "self-attention: softmax(q k^T) v, attention modules",
        colour="#ff7f0e",
        precedence=10,
        fix=Fix(
            "",
            "attention mixes tokens by content, which commutes with integer token shifts; its share comes "
            "from sub-token shifts between patches",
        ),
        functions=frozenset({"scaled_dot_product_attention"}),
        names_region=True,
    ),
    Kind(
        "patch_embed",
        "the patch embedding of a vision transformer or MLP-Mixer",
        colour="#8c564b",
        precedence=20,
        fix=Fix(
            "blurpool",
            "the patch embedding is a stride-p convolution: it aliases whatever the image has above the "
            "patch Nyquist frequency; a blur before it (or training with shifts) helps",
        ),
    ),
    Kind(
        "position_embed",
        "adding a learned or fixed position embedding to an activation",
        colour="#e377c2",
        precedence=50,
        fix=Fix(
            "",
            "a learned position embedding is not translation equivariant by construction; only retraining "
            "with relative or smooth position codes removes it",
        ),
    ),
    Kind(
        "pooling",
        "global pooling, means over space, class-token readout",
        colour="#2ca02c",
        precedence=90,
        fix=Fix("blurpool", "replace strided pooling by blur-pooling (aliasscope fix --fix blurpool)"),
    ),
    Kind(
        "linear",
        "stride-1 convolutions, linear layers, per-channel scales",
        colour="#7f7f7f",
        precedence=110,
        fix=Fix(
            "circular_padding",
            "a stride-1 convolution breaks equivariance only where it pads (the image border) or where the "
            "generator's stencil does: try --fix circular_padding, or compare --generator fourier",
        ),
        functions=frozenset({"conv1d", "conv2d", "conv3d", "linear"}),
    ),
    Kind(
        "token_mixing",
        "MLPs that mix tokens (MLP-Mixer)",
        colour="#bcbd22",
        precedence=60,
    ),
    Kind(
        "recurrent",
        "recurrent layers scanning the grid's rows or columns (LSTM, GRU, RNN; Sequencer)",
        colour="#ffbb78",
        precedence=65,
        functions=frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"}),
        names_region=True,
    ),
    Kind(
        "residual",
        "sums of two activations (skip connections)",
        colour="#aec7e8",
        precedence=100,
    ),
    Kind(
        "layout",
        "reshape, permute, slicing, concatenation, identity, dropout in eval",
        colour="#c7c7c7",
        precedence=130,
        zero=True,
        functions=_LAYOUT_FUNCTIONS,
    ),
    Kind(
        "block",
        "a module recorded as one op (its internals have no known layout)",
        colour="#98df8a",
        precedence=140,  # never the kind of an inner call (no functions): last
    ),
    Kind(
        "other",
        "anything else",
        colour="#dbdb8d",
        precedence=120,
    ),
)

UNKNOWN_COLOUR = "#333333"
"""The colour of a kind name that is not registered (a result from elsewhere), in every figure."""

_REGISTRY: dict[str, Kind] = {}
_BUILTIN_NAMES = frozenset(k.name for k in _BUILTIN)
_BY_FUNCTION: dict[str, str] = {}
_PRECEDENCE: list[str] = []

KINDS: dict[str, str] = {}
"""The op taxonomy, with one line each (a view of the registry)."""

KIND_COLOURS: dict[str, str] = {}
"""Colour of each op kind, the same in every figure (a view of the registry)."""

FIX_FOR_KIND: dict[str, tuple[str, str]] = {}
"""Per op kind that has one: the fix to try first and why (a view of the registry; used by
:func:`aliasscope._report.advice`)."""


def _sync() -> None:
    """Refill the views in place, so that every module holding them sees the change."""
    kinds = list(_REGISTRY.values())
    KINDS.clear()
    KINDS.update((k.name, k.description) for k in kinds)
    KIND_COLOURS.clear()
    KIND_COLOURS.update((k.name, k.colour) for k in kinds)
    FIX_FOR_KIND.clear()
    FIX_FOR_KIND.update((k.name, (k.fix.name, k.fix.advice)) for k in kinds if k.fix is not None)
    _BY_FUNCTION.clear()
    _BY_FUNCTION.update((f, k.name) for k in kinds for f in k.functions)
    _PRECEDENCE[:] = [k.name for k in sorted(kinds, key=_rank)]


def _check(kind: Kind, *, colour: bool = True) -> None:
    if not isinstance(kind, Kind):
        raise TypeError(f"register_kind takes a Kind, got {type(kind).__name__}")
    if not isinstance(kind.name, str) or not kind.name.isidentifier():
        raise ValueError(f"a kind's name must be an identifier (letters, digits, _), got {kind.name!r}")
    if kind.name in _REGISTRY:
        raise ValueError(f"op kind {kind.name!r} is already registered; kinds: {', '.join(_REGISTRY)}")
    if not isinstance(kind.description, str) or not kind.description.strip():
        raise ValueError(f"op kind {kind.name!r} needs a description (one line)")
    if colour:  # the built-in colours are checked by tests/test_kinds.py (importing matplotlib here is slow)
        from matplotlib.colors import is_color_like

        if not is_color_like(kind.colour):
            raise ValueError(f"op kind {kind.name!r}: {kind.colour!r} is not a matplotlib colour")
    if not isinstance(kind.precedence, int) or isinstance(kind.precedence, bool):
        raise TypeError(f"op kind {kind.name!r}: precedence must be an int, got {kind.precedence!r}")
    same = next((k.name for k in _REGISTRY.values() if k.precedence == kind.precedence), None)
    if same is not None:
        taken = ", ".join(f"{k.name} {k.precedence}" for k in sorted(_REGISTRY.values(), key=_rank))
        raise ValueError(f"op kind {kind.name!r}: precedence {kind.precedence} is {same!r}'s ({taken})")
    if not all(isinstance(s, str) for s in (*(kind.fix or ()), *kind.functions)):
        raise TypeError(f"op kind {kind.name!r}: a fix's name and advice and function names are strings")
    claimed = sorted(f for f in kind.functions if f in _BY_FUNCTION)
    if claimed:
        raise ValueError(
            f"op kind {kind.name!r}: function {claimed[0]!r} already means kind {_BY_FUNCTION[claimed[0]]!r} "
            "(a function name belongs to one kind)"
        )


def _rank(kind: Kind) -> int:
    return kind.precedence


def register_kind(kind: Kind) -> Kind:
    """Add an op kind to the registry (and so to :data:`KINDS`, :data:`KIND_COLOURS`,
    :data:`FIX_FOR_KIND`); returns it.

    Raises
    ------
    ValueError
        For a name already registered, an empty description, a colour matplotlib does not know, a
        precedence another kind has, or a function name another kind claims.
    TypeError
        For a field of the wrong type.
    """
    _check(kind)
    _REGISTRY[kind.name] = kind
    _sync()
    return kind


def unregister_kind(name: str) -> Kind:
    """Remove a kind added by :func:`register_kind` (the built-in kinds stay); returns it."""
    kind = get_kind(name)
    if kind.name in _BUILTIN_NAMES:
        raise ValueError(f"op kind {kind.name!r} is built in and cannot be removed")
    del _REGISTRY[kind.name]
    _sync()
    return kind


def get_kind(name: str | Kind) -> Kind:
    """Look a kind up by name (a :class:`Kind` passes through).

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    """
    if isinstance(name, Kind):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown op kind {name!r}; valid kinds: {', '.join(_REGISTRY)}") from None


def kind_names() -> list[str]:
    """The registered kinds' names, in registry order (the order of every figure's legend)."""
    return list(_REGISTRY)


def kind_of_function(name: str) -> str | None:
    """The kind a torch function name means (:attr:`Kind.functions`), or None."""
    return _BY_FUNCTION.get(name)


def precedence_order() -> list[str]:
    """Kind names by :attr:`Kind.precedence`, first to last."""
    return list(_PRECEDENCE)


def is_zero_kind(name: str) -> bool:
    """Whether ``name`` is a registered kind whose ops, layout unchanged, are exactly equivariant
    (:attr:`Kind.zero`)."""
    kind = _REGISTRY.get(name)
    return kind is not None and kind.zero


def is_pointwise_kind(name: str) -> bool:
    """Whether ``name`` is a registered kind whose ops act position by position (:attr:`Kind.pointwise`)."""
    kind = _REGISTRY.get(name)
    return kind is not None and kind.pointwise


def kind_colour(name: str) -> str:
    """A kind's colour; :data:`UNKNOWN_COLOUR` for a name that is not registered."""
    kind = _REGISTRY.get(name)
    return kind.colour if kind is not None else UNKNOWN_COLOUR


def kind_order(names: Iterable[str]) -> list[str]:
    """The distinct kind names among ``names``: the registered ones in registry order, then any
    others in the order first seen (so that a figure never drops a kind it was given)."""
    present = list(dict.fromkeys(names))
    known = set(present) & _REGISTRY.keys()
    return [k for k in _REGISTRY if k in known] + [k for k in present if k not in _REGISTRY]


for _kind in _BUILTIN:
    _check(_kind, colour=False)
    _REGISTRY[_kind.name] = _kind
    _sync()
del _kind
