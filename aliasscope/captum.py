"""Captum-native attribution of Lie derivatives: where in a layer, and where in the image.

Two attribution classes with captum's call shape (``attribute(inputs, target=..., ...)``), so
captum's tooling (:meth:`captum.attr.LayerAttribution.interpolate`,
:func:`captum.attr.visualization.visualize_image_attr`) works on what they return:

* :class:`LayerLieDerivative` (a :class:`captum.attr.LayerAttribution`): per neuron of a layer's
  output, ``dT/dh * v``, where ``T`` is the selected output of the model and ``v = J_f D h_in - D h``
  the layer's *local* Lie derivative (:mod:`aliasscope.decomposition._local`). Summed over a layer's
  neurons it is that layer's exact contribution to the Lie derivative of ``T``; summed over every op of the
  model it is the whole Lie derivative ``L_X T``. Built on :func:`aliasscope.decomposition.decompose`
  (``keep_maps=True``): one forward and one backward pass for every layer at once.
* :class:`LieDerivativeAttribution` (a :class:`captum.attr.GradientAttribution`): per input pixel
  and channel, ``dT/dx * D x`` (``D x``: the generator's tangent of the image), which sums to
  ``<dT/dx, D x>``, the Lie derivative of ``T`` whenever the model's output is invariant (logits).

``target`` follows captum (:func:`captum._utils.common._select_targets`): an int or a tuple (one
output index for every example), a list or 1-D tensor (one per example), or None for a forward
that returns one scalar per example. A softmax or any other head goes into ``forward_func``
(e.g. ``nn.Sequential(model, nn.Softmax(-1))``). Models are borrowed, as everywhere in aliasscope:
evaluated in eval mode and given back with the same train/eval flags and hooks, also on errors.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
    _select_targets,
)
from captum.attr import GradientAttribution, LayerAttribution
from torch import nn

from ._borrow import borrowed
from ._checks import check_model
from .capture import OpRecord
from .decomposition import Decomposition, decompose
from .generators import apply_generator, get_generator
from .layouts import BCHW, Layout, window_grid
from .lie import lie_derivative
from .transforms import get_transform

__all__ = ["LayerLieDerivative", "LieDerivativeAttribution"]

_PREFIX = "model."


class _Bound(nn.Module):
    """``x -> fn(x, *args)`` as a module, so that decompose/lie_derivative can run a forward with
    captum's ``additional_forward_args``, or a plain callable. Module paths get the prefix ``model.``."""

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple = ()) -> None:
        super().__init__()
        if isinstance(fn, nn.Module):
            self.model = fn
        else:
            self._fn = fn
        self.args = args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = self.model if hasattr(self, "model") else self._fn
        return fn(x, *self.args)


def _check_names(transform: str, generator: str) -> None:
    get_transform(transform)
    get_generator(generator)


def _single_input(inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, bool]:
    """The one (B, C, H, W) image tensor of captum-style ``inputs`` and whether it came as a tuple."""
    is_tuple = _is_tuple(inputs)
    tup = _format_tensor_into_tuples(inputs)
    if len(tup) != 1 or not isinstance(tup[0], torch.Tensor):
        raise ValueError(
            f"Lie derivative attributions take one image tensor (B, C, H, W), got {len(tup)} inputs; "
            "pass further model arguments as additional_forward_args"
        )
    return tup[0], is_tuple


def _extra_args(additional_forward_args: Any) -> tuple:
    args = _format_additional_forward_args(additional_forward_args)
    return () if args is None else tuple(args)


def _target_fn(target: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """captum's target selection as a ``(B, ...) output -> (B,)`` callable for :func:`decompose`."""

    def select(out: torch.Tensor) -> torch.Tensor:
        tgt = target.to(out.device) if isinstance(target, torch.Tensor) else target
        try:
            t = _select_targets(out, tgt)
        except (AssertionError, IndexError, RuntimeError) as err:
            raise ValueError(
                f"target {target!r} does not select one output per example from the model's output of "
                f"shape {tuple(out.shape)}: {err}"
            ) from err
        if t.dim() != 1 and t[0].numel() == 1:
            t = t.reshape(t.shape[0])
        if t.dim() != 1:
            raise ValueError(
                f"target={target!r} leaves {tuple(t.shape)} values, one scalar per example is needed: the "
                f"model's output has shape {tuple(out.shape)}; pass a class index (int), one per example "
                "(list or 1-D tensor), or a tuple of indices (image-like outputs)"
            )
        return t

    select.__name__ = "target" if target is None else f"target {target}"
    return select


def _chunks(b: int, size: int | None) -> Iterator[tuple[int, int]]:
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"internal_batch_size must be a positive int or None, got {size!r}")
    step = b if size is None else size
    for start in range(0, b, step):
        yield start, min(b, start + step)


def _slice_target(target: Any, start: int, stop: int) -> Any:
    """The targets of examples ``start:stop`` (per-example lists and 1-D tensors are sliced)."""
    if isinstance(target, list):
        return target[start:stop]
    if isinstance(target, torch.Tensor) and target.numel() > 1:
        return target[start:stop]
    return target


def _slice_args(args: tuple, start: int, stop: int) -> tuple:
    """As captum's internal batching: every tensor argument is sliced along its first dimension."""
    return tuple(a[start:stop] if isinstance(a, torch.Tensor) else a for a in args)


def _batch_first(m: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """Captum's convention, examples along dim 0 (timm's stacked q, k, v has them along dim 1)."""
    roles = None if layout is None else layout.roles
    if roles is None or "b" not in roles or roles.index("b") == 0:
        return m
    return m.movedim(roles.index("b"), 0)


def _to_grid(m: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """(B, C, H, W) view of a bhwc or token map (prefix tokens dropped); other layouts unchanged."""
    if layout is None or not layout.is_image_like:
        return _batch_first(m, layout)
    if layout.kind == "bhwc":
        return m.permute(0, 3, 1, 2)
    if layout.windowed:
        return window_grid(m, layout)
    if layout.kind == "tokens":
        return layout.to_bchw(m)[0]
    return _batch_first(m, layout)


def _per_example_sum(obj: Any) -> torch.Tensor:
    """Sum over every non-batch entry of a tensor, or of all tensors in a tuple/list/dict."""
    if isinstance(obj, torch.Tensor):
        return obj.reshape(obj.shape[0], -1).double().sum(1)
    items = obj.values() if isinstance(obj, dict) else obj
    parts = [_per_example_sum(o) for o in items]
    if not parts:
        raise ValueError("no attributions to sum")
    return torch.stack([p.to(parts[0].device) for p in parts]).sum(0)


def _cat(parts: list[Any]) -> Any:
    """Concatenate chunk results (tensors, tuples, lists, dicts of them) along the batch."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    return type(first)(_cat(list(group)) for group in zip(*parts, strict=True))


def _total_lie(
    forward_func: Callable, x: torch.Tensor, target: Any, args: tuple, transform: str, generator: str
) -> torch.Tensor:
    """``L_X T`` per example by forward mode (:func:`aliasscope.lie.lie_derivative`), in float64."""
    model = forward_func if isinstance(forward_func, nn.Module) and not args else _Bound(forward_func, args)
    with borrowed(forward_func) if isinstance(forward_func, nn.Module) else nullcontext():
        lie = lie_derivative(model, x, transform, output="logits", generator=generator)
    return _target_fn(target)(lie).double()


# --------------------------------------------------------------------------------------------------
# LayerLieDerivative
# --------------------------------------------------------------------------------------------------


@dataclass
class _Op:
    """What LayerLieDerivative keeps of a recorded op (no activations)."""

    name: str
    unit: nn.Module | None
    module: str
    out_layout: Layout | None
    out_shape: tuple[int, ...] | None
    in_layouts: list[Layout | None]
    in_shapes: list[tuple[int, ...]]
    producers: list[tuple[int, int] | None]
    dtype: torch.dtype | None = None
    device: torch.device | None = None


@dataclass
class _Structure:
    """The op graph seen through decompose's ``select`` predicate: which op produced each input, from
    the recording's producer links (:attr:`aliasscope.capture.OpRecord.producers`)."""

    ops: list[_Op] = field(default_factory=list)
    _base: int = 0

    def add(self, op: OpRecord) -> None:
        if op.index == 0:  # a recording's first op: its links count from here
            self._base = len(self.ops)
        producers = [None if p is None else (self._base + p[0], p[1]) for p in op.producers]
        out = op.outputs[0] if op.outputs else None
        self.ops.append(
            _Op(
                name=op.name,
                unit=op.unit,
                module=op.module,
                out_layout=op.out_layouts[0] if op.out_layouts else None,
                out_shape=tuple(out.shape) if out is not None else None,
                in_layouts=list(op.in_layouts),
                in_shapes=[tuple(t.shape) for t in op.inputs],
                producers=producers,
                dtype=out.dtype if out is not None else None,
                device=out.device if out is not None else None,
            )
        )


class LayerLieDerivative(LayerAttribution, GradientAttribution):
    r"""Neuron-level contributions of a layer to the Lie derivative of a model's output.

    For a scalar target ``T`` (the model's output selected by ``target``) and a layer ``h = f(h_in)``
    whose local Lie derivative is ``v = J_f(h_in) D h_in - D h`` (``D``: the generator in that
    tensor's layout), :meth:`attribute` returns ``dT/dh * v`` elementwise, shaped like the layer's
    output. Summed over a layer's neurons it is the layer's contribution ``c = <dT/dh, v>`` (the
    values of :func:`aliasscope.decomposition.decompose`); summed over every op of the model it is the
    Lie derivative ``L_X T = sum_i c_i``, exactly (chain rule, no sampling; completeness to float
    precision). The convergence delta is ``L_X T - sum of the returned attributions``, per example:
    0 to float precision with ``layer=None``, the contribution of the other ops otherwise.

    Args:
        forward_func (torch.nn.Module): the model itself (layers are found by their path in it). Its
            output is what ``target`` selects from: logits for a classifier; put a softmax into the
            module (``nn.Sequential(model, nn.Softmax(-1))``) to explain probabilities.
        layer (torch.nn.Module, list of them, or None): the layer(s). A leaf module is one op (the
            one aliasscope's capture records under its path); a module with children (a ResNet
            stage, an EfficientNet block, a ViT ``Block``) is recorded as one op, so its map is
            ``dT/dh * v`` with ``v`` the whole block's local Lie derivative (the sum of what the ops
            inside contribute). Selected modules must not contain each other. ``None``: every
            recorded op, returned as a dict ``{op name: map}`` in call order (functional ops such as
            residual adds included; names as in :mod:`aliasscope.capture`).
        transform (str): a name from :data:`aliasscope.TRANSFORMS` (default ``"translate_x"``).
        generator (str): ``"central"`` (default), ``"paper"`` or ``"fourier"``.
        layouts (dict, optional): layouts of custom modules' outputs, passed to
            :func:`aliasscope.record`.

    Shapes (what makes ``LayerAttribution.interpolate`` and ``visualize_image_attr`` work):
        (B, C, H, W) maps are returned as they are; channels-last (B, H, W, C) maps (ConvNeXt, Swin
        blocks) are permuted to (B, C, H, W); ViT token maps (B, N, C) are reshaped to the patch grid
        (B, C, h, w), **dropping the prefix tokens** (class, distillation, register): their part of
        the contribution is not in the returned map and shows up in the convergence delta. Other
        layouts (attention matrices, per-head (B, heads, N, d) tensors, pooled (B, C) features) are
        returned as recorded, except that the examples are always moved to dim 0 (timm stacks q, k,
        v as (3, B, heads, N, d)). ``attribute(..., to_grid=False)`` returns every map as recorded
        (examples first), prefix tokens included, so that the maps sum to the contributions exactly.

    Reused modules (a ReLU module called k times): each call is its own op (``relu``, ``relu#1``,
    ...); the module's map is the **sum of its per-call maps** (all calls must give the same shape,
    else a ``ValueError`` names them), and its sum is the sum of the calls' contributions.

    Modules with several outputs: the map covers the first output; the others' part goes to delta.
    BatchNorm subclasses with an activation inside (timm's ``BatchNormAct2d``) are recorded op by op:
    their map is the sum of the maps of their ``batch_norm``, ``drop`` and ``act`` ops, exactly the
    block map for such a pointwise chain.
    """

    def __init__(
        self,
        forward_func: nn.Module,
        layer: nn.Module | Sequence[nn.Module] | None = None,
        transform: str = "translate_x",
        generator: str = "central",
        *,
        layouts: dict[str, Layout] | None = None,
    ) -> None:
        if not isinstance(forward_func, nn.Module):
            raise TypeError(
                "LayerLieDerivative needs the model itself (a torch.nn.Module) as forward_func, since "
                f"layers are located by their path in it; got {type(forward_func).__name__}. Wrap a "
                "function in an nn.Module whose submodules are the layers."
            )
        forward_func = check_model(forward_func)
        _check_names(transform, generator)
        LayerAttribution.__init__(self, forward_func, layer)
        GradientAttribution.__init__(self, forward_func)
        self.transform, self.generator = transform, generator
        self.layouts = dict(layouts or {})
        self.last_decomposition: Decomposition | None = None
        self._paths = {id(m): name for name, m in forward_func.named_modules()}
        self._layers = self._check_layers(layer)

    # -- captum's properties ------------------------------------------------------------------
    @property
    def multiplies_by_inputs(self) -> bool:
        """True: the maps carry the tangent factor ``v`` (the role captum's input multiplier plays),
        so they add up to the quantity explained, the Lie derivative (a global attribution)."""
        return True

    def has_convergence_delta(self) -> bool:
        """True: ``return_convergence_delta=True`` gives ``L_X T - sum of the attributions``."""
        return True

    # -- layers --------------------------------------------------------------------------------
    def _check_layers(self, layer: Any) -> list[nn.Module] | None:
        if layer is None:
            return None
        layers = [layer] if isinstance(layer, nn.Module) else list(layer)
        if not layers:
            raise ValueError("layer is an empty list; pass a module, a list of modules or None (every op)")
        for m in layers:
            if not isinstance(m, nn.Module):
                raise TypeError(f"layer must be an nn.Module or a list of them, got {type(m).__name__}")
            if id(m) not in self._paths:
                raise ValueError(f"layer {type(m).__name__} is not a submodule of the model")
            if m is self.forward_func:
                raise ValueError("layer is the whole model: pass layer=None for every op, or a submodule")
        ids = {id(m) for m in layers}
        if len(ids) != len(layers):
            raise ValueError("the same layer is listed twice")
        for m in layers:
            for name, sub in m.named_modules():
                if name and id(sub) in ids:
                    raise ValueError(
                        f"layer {self._paths[id(m)]!r} contains layer {self._paths[id(sub)]!r}; a module "
                        "with children is recorded as one op, so select nested modules in separate calls"
                    )
        return layers

    def _units(self, prefix: str) -> list[str]:
        if self._layers is None:
            return []
        return [
            prefix + glob.escape(self._paths[id(m)])
            for m in self._layers
            if next(m.children(), None) is not None and not _norm_with_children(m)
        ]

    # -- attribution ---------------------------------------------------------------------------
    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        return_convergence_delta: bool = False,
        *,
        internal_batch_size: int | None = None,
        to_grid: bool = True,
    ) -> Any:
        r"""Per-neuron contributions ``dT/dh * v`` of the layer(s) to the Lie derivative of ``T``.

        Args:
            inputs (Tensor or 1-tuple of Tensor): images (B, C, H, W), as the model takes them.
            target (int, tuple, Tensor, list or None): captum's target: which output entry ``T`` is,
                per example. ``None`` only for a forward that returns one scalar per example.
            additional_forward_args (Any): further arguments of the forward, after the images.
            attribute_to_layer_input (bool): attribute to the tensor(s) the layer *reads*, with the
                same rule ``dT/dh * v(h)``: every activation ``h`` carries the local Lie derivative
                ``v(h)`` of the op that produced it, so this is the map of the op just upstream
                (exactly 0 for the model's input and for ops whose local Lie derivative vanishes by
                construction: reshapes, eval-mode BatchNorm). A tuple when the layer reads several
                activations. Not with ``layer=None`` (there every tensor's map is its producer's).
            return_convergence_delta (bool): also return ``L_X T - sum of the attributions`` per
                example (a tensor read by two selected layers counts twice).
            internal_batch_size (int, optional): examples per decomposition (memory).
            to_grid (bool): return bhwc and token maps as (B, C, H, W) grids (the default).

        Returns:
            A tensor (one layer), a tuple (one layer's several inputs), a list (a list of layers)
            or a dict ``{op name: map}`` (``layer=None``); with ``return_convergence_delta``, the
            pair ``(attributions, delta)``.
        """
        x, _ = _single_input(inputs)
        if self._layers is None and attribute_to_layer_input:
            raise ValueError(
                "attribute_to_layer_input=True needs selected layers; with layer=None every op's output "
                "map is returned, and a layer's input map is the map of the op that produced it"
            )
        args = _extra_args(additional_forward_args)
        b = x.shape[0]
        results, deltas, parts = [], [], []
        for start, stop in _chunks(b, internal_batch_size):
            res, delta, d = self._attribute_chunk(
                x[start:stop],
                _slice_target(target, start, stop),
                _slice_args(args, start, stop),
                attribute_to_layer_input,
                to_grid,
            )
            results.append(res)
            deltas.append(delta)
            parts.append(d)
        self.last_decomposition = parts[0] if len(parts) == 1 else Decomposition.concat(parts)
        attributions = _cat(results)
        if return_convergence_delta:
            return attributions, torch.cat(deltas)
        return attributions

    def _attribute_chunk(
        self, x: torch.Tensor, target: Any, args: tuple, to_input: bool, to_grid: bool
    ) -> tuple[Any, torch.Tensor, Decomposition]:
        model: nn.Module = self.forward_func if not args else _Bound(self.forward_func, args)
        prefix = "" if not args else _PREFIX
        wanted = {id(m) for m in self._layers} if self._layers is not None else None
        keep_all = wanted is None or to_input
        inside = tuple(prefix + self._paths[id(m)] for m in self._layers or () if _norm_with_children(m))
        structure = _Structure()

        def select(op: OpRecord) -> bool:
            structure.add(op)
            return (
                keep_all
                or (op.unit is not None and id(op.unit) in wanted)
                or any(_within(op.module, path) for path in inside)
            )

        with borrowed(self.forward_func):
            d = decompose(
                model,
                x,
                self.transform,
                target=_target_fn(target),
                output="logits",
                generator=self.generator,
                select=select,
                layouts={prefix + k: v for k, v in self.layouts.items()},
                units=self._units(prefix),
                keep_maps=True,
            )
        if not structure.ops:
            raise RuntimeError("the decomposition recorded no ops")
        if prefix:
            d = _strip(d, prefix)
            for op in structure.ops:
                op.name = op.name[len(prefix) :] if op.name.startswith(prefix) else op.name
                op.module = op.module[len(prefix) :] if op.module.startswith(prefix) else op.module
        maps = d.maps or {}
        if self._layers is None:
            result: Any = {
                op.name: self._grid(self._map(op, maps), op.out_layout, to_grid)
                for op in structure.ops
                if op.out_shape is not None
            }
        else:
            per_layer = [self._layer_map(m, structure, maps, to_input, to_grid) for m in self._layers]
            result = per_layer[0] if isinstance(self.layer, nn.Module) else per_layer
        total = d.total.to(x.device)
        delta = (total - _per_example_sum(result).to(x.device)).to(x.dtype)
        return result, delta, replace(d, maps=None)

    @staticmethod
    def _grid(m: torch.Tensor, layout: Layout | None, to_grid: bool) -> torch.Tensor:
        return _to_grid(m, layout) if to_grid else _batch_first(m, layout)

    @staticmethod
    def _map(op: _Op, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        m = maps.get(op.name)
        if m is None:  # local Lie derivative 0 by construction: decompose keeps no map
            m = torch.zeros(op.out_shape, dtype=op.dtype, device=op.device)
        return m

    def _layer_map(
        self,
        module: nn.Module,
        structure: _Structure,
        maps: dict[str, torch.Tensor],
        to_input: bool,
        to_grid: bool,
    ) -> Any:
        path = self._paths[id(module)]
        if _norm_with_children(module):  # its ops, recorded one by one (see _norm_with_children)
            calls = [op for op in structure.ops if _within(op.module, path) and op.out_shape is not None]
            if to_input:
                calls = calls[:1]
        else:
            calls = [op for op in structure.ops if op.unit is module]
        if not calls:
            raise ValueError(
                f"layer {path!r} was not recorded as an op: it was not called in the forward pass, it "
                "computes from parameters only, or it sits inside a region recorded whole (op names: "
                "LayerLieDerivative(model, layer=None) lists them)"
            )
        if not to_input:
            per_call = [self._grid(self._map(op, maps), op.out_layout, to_grid) for op in calls]
            return _sum_calls(per_call, [op.name for op in calls], path)
        n_in = {len(op.producers) for op in calls}
        if len(n_in) != 1:
            raise ValueError(f"layer {path!r} reads a different number of activations in different calls")
        inputs = []
        for j in range(n_in.pop()):
            per_call = []
            for op in calls:
                shape, layout = op.in_shapes[j], op.in_layouts[j]
                prod = op.producers[j]
                if prod is None:
                    m = torch.zeros(shape, dtype=calls[0].dtype, device=calls[0].device)
                else:
                    p, k = prod
                    src = structure.ops[p]
                    if k == 0:
                        m = self._map(src, maps)
                    elif src.name in maps:
                        raise NotImplementedError(
                            f"layer {path!r} reads output {k} of op {src.name!r}; only an op's first "
                            "output has a map: select the op that produces it instead"
                        )
                    else:
                        m = torch.zeros(shape, dtype=src.dtype, device=src.device)
                per_call.append(self._grid(m, layout, to_grid))
            inputs.append(_sum_calls(per_call, [op.name for op in calls], path))
        return _format_output(len(inputs) > 1, tuple(inputs))

    def compute_convergence_delta(
        self,
        attributions: Any,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
    ) -> torch.Tensor:
        """``L_X T - sum of attributions`` per example, ``L_X T`` computed independently by forward
        mode (:func:`aliasscope.lie_derivative`)."""
        x, _ = _single_input(inputs)
        total = _total_lie(
            self.forward_func, x, target, _extra_args(additional_forward_args), self.transform, self.generator
        )
        return (total.to(x.device) - _per_example_sum(attributions).to(x.device)).to(x.dtype)


def _norm_with_children(module: nn.Module) -> bool:
    """A BatchNorm subclass with children (timm's ``BatchNormAct2d``: BN, then its activation).

    Its ops (``batch_norm``, ``drop``, ``act``) are recorded one by one and its map is the sum of
    their maps. They form a pointwise chain of one shape, where the sum of the per-op maps is exactly
    the block map ``dT/dh_out * v_block`` (a pointwise Jacobian moves a neuron's term along the chain
    without mixing neurons), and the per-op maps keep the BatchNorm's and the activation's parts apart.
    """
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and next(module.children(), None) is not None


def _within(op_module: str, path: str) -> bool:
    return op_module == path or op_module.startswith(path + ".")


def _sum_calls(maps: list[torch.Tensor], names: list[str], path: str) -> torch.Tensor:
    shapes = {tuple(m.shape) for m in maps}
    if len(shapes) != 1:
        raise ValueError(
            f"layer {path!r} is called {len(maps)} times with different output shapes "
            f"({', '.join(f'{n}: {tuple(m.shape)}' for n, m in zip(names, maps, strict=True))}); "
            "its per-call maps cannot be summed: use layer=None to get each call's map by op name"
        )
    out = maps[0]
    for m in maps[1:]:
        out = out + m
    return out


def _strip(d: Decomposition, prefix: str) -> Decomposition:
    def s(name: str) -> str:
        return name[len(prefix) :] if name.startswith(prefix) else name

    maps = {s(k): v for k, v in d.maps.items()} if d.maps else d.maps
    return replace(d, names=[s(n) for n in d.names], maps=maps)


# --------------------------------------------------------------------------------------------------
# LieDerivativeAttribution
# --------------------------------------------------------------------------------------------------


class LieDerivativeAttribution(GradientAttribution):
    r"""Where in the image the Lie derivative of a target comes from: ``dT/dx * D x`` per pixel.

    ``D x`` is the tangent of the image under the transform (the generator applied to ``x``); the
    attribution is the gradient of the selected output ``T`` times that tangent, per pixel and
    channel, shaped like the input. Its sum over pixels and channels is ``<dT/dx, D x>``, the Lie
    derivative ``L_X T`` of an invariant output (logits, probabilities). For an image-like output
    (a feature map) ``L_X T`` has the further term ``-<dT/dF, D F>``, which no pixel carries: it is the
    convergence delta.

    Args:
        forward_func (Callable or torch.nn.Module): the model (or any function of the images). An
            ``nn.Module`` is evaluated in eval mode and given back unchanged; a plain callable is
            called as it is.
        transform (str): a name from :data:`aliasscope.TRANSFORMS` (default ``"translate_x"``).
        generator (str): ``"central"`` (default), ``"paper"`` or ``"fourier"``.
    """

    def __init__(
        self,
        forward_func: Callable[..., torch.Tensor],
        transform: str = "translate_x",
        generator: str = "central",
    ) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be a model or a callable, got {type(forward_func).__name__}")
        if isinstance(forward_func, nn.Module):
            forward_func = check_model(forward_func)
        _check_names(transform, generator)
        GradientAttribution.__init__(self, forward_func)
        self.transform, self.generator = transform, generator

    @property
    def multiplies_by_inputs(self) -> bool:
        """True: the gradient is multiplied by the image's tangent ``D x`` (a global attribution)."""
        return True

    def has_convergence_delta(self) -> bool:
        """True: ``return_convergence_delta=True`` gives ``L_X T - sum of the attribution``."""
        return True

    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        *,
        internal_batch_size: int | None = None,
    ) -> Any:
        r"""``dT/dx * D x``, shaped like ``inputs`` (a 1-tuple in, a 1-tuple out, as in captum).

        Args:
            inputs (Tensor or 1-tuple of Tensor): images (B, C, H, W).
            target (int, tuple, Tensor, list or None): captum's target (see the module docstring).
            additional_forward_args (Any): further arguments of the forward, after the images.
            return_convergence_delta (bool): also return ``L_X T - sum of the attribution`` per
                example, ``L_X T`` by forward mode (:func:`aliasscope.lie_derivative`): 0 to float
                precision for invariant outputs.
            internal_batch_size (int, optional): examples per gradient pass.
        """
        x, is_tuple = _single_input(inputs)
        args = _extra_args(additional_forward_args)
        b = x.shape[0]
        attrs, deltas = [], []
        for start, stop in _chunks(b, internal_batch_size):
            xs = x[start:stop].detach().clone().requires_grad_(True)
            ts, extra = _slice_target(target, start, stop), _slice_args(args, start, stop)
            if isinstance(ts, torch.Tensor):
                ts = ts.to(xs.device)
            with borrowed(self.forward_func) if isinstance(self.forward_func, nn.Module) else nullcontext():
                try:
                    (grad,) = self.gradient_func(self.forward_func, (xs,), ts, extra or None)
                except AssertionError as err:
                    raise ValueError(
                        f"target={target!r} does not select one scalar per example from the output of "
                        f"forward_func ({err}); pass a class index (int), one per example (list or 1-D "
                        "tensor), or a tuple of indices"
                    ) from err
            with torch.no_grad():
                attr = grad * apply_generator(xs.detach(), self.transform, self.generator, BCHW)
            attrs.append(attr)
            if return_convergence_delta:
                total = _total_lie(self.forward_func, xs.detach(), ts, extra, self.transform, self.generator)
                deltas.append((total.to(x.device) - _per_example_sum(attr).to(x.device)).to(x.dtype))
        out = _format_output(is_tuple, (torch.cat(attrs),))
        if return_convergence_delta:
            return out, torch.cat(deltas)
        return out

    def compute_convergence_delta(
        self,
        attributions: torch.Tensor | tuple[torch.Tensor, ...],
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
    ) -> torch.Tensor:
        """``L_X T - sum of attributions`` per example (``L_X T`` by forward mode)."""
        x, _ = _single_input(inputs)
        total = _total_lie(
            self.forward_func, x, target, _extra_args(additional_forward_args), self.transform, self.generator
        )
        return (total.to(x.device) - _per_example_sum(attributions).to(x.device)).to(x.dtype)
