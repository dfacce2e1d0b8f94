"""Checks of the arguments of aliasscope's public functions: one clear error naming the problem and
the fix, raised at the entry of the function (images are checked by :func:`aliasscope._borrow.check_images`).

The model output check (:func:`check_finite_output`) is cheap: it looks at the output the analysis
computes anyway, and only when that holds NaN/inf re-runs one forward pass with temporary hooks to
name the first module that produced them (the hooks are removed and the model is given back as it
came, :func:`aliasscope._borrow.borrowed`).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

__all__ = [
    "NonFiniteOutputError",
    "check_model",
    "check_int",
    "check_transforms",
    "check_device",
    "check_labels",
    "check_finite_output",
    "raise_nonfinite",
    "names_nonfinite_images",
    "check_units",
    "check_layouts",
    "selected_ops",
    "output_hint",
    "expected_input_size",
]


# -- models ---------------------------------------------------------------------------------------


def _compiled_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    return OptimizedModule


def _is_compiled(module: nn.Module) -> bool:
    cls = _compiled_type()
    return cls is not None and isinstance(module, cls)


_SCRIPTED = (
    "a TorchScript model (torch.jit.ScriptModule{kind}) cannot be analysed: aliasscope records the "
    "Python modules and torch calls of a forward pass, which TorchScript hides; it needs the Python "
    "nn.Module the model was made from: pass that instead"
)


def check_model(model: Any, *, unwrap_compiled: bool = True) -> nn.Module:
    """The ``nn.Module`` aliasscope can analyse, or one clear error.

    A ``torch.compile``d model (``OptimizedModule``) is unwrapped to the module it was compiled from
    (``model._orig_mod``: same weights, same results); ``unwrap_compiled=False`` refuses it instead
    (for :func:`aliasscope.capture.record`, where the caller runs the forward itself).

    Raises
    ------
    TypeError
        Not an ``nn.Module``; a TorchScript model (``torch.jit.script`` / ``torch.jit.trace``) or one
        with a TorchScript or compiled submodule.
    ValueError
        Parameters on the meta device (no data).
    """
    if _is_compiled(model):
        if not unwrap_compiled:
            raise TypeError(
                "a torch.compile'd model cannot be recorded (its forward runs through TorchDynamo): "
                "record the module it was compiled from, model._orig_mod, and call that inside the block"
            )
        model = model._orig_mod
    if isinstance(model, torch.jit.ScriptModule):
        traced = isinstance(model, torch.jit.TracedModule)
        raise TypeError(_SCRIPTED.format(kind=", made by torch.jit.trace" if traced else ""))
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for path, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            raise TypeError(
                f"submodule {path!r} is a TorchScript module ({type(m).__name__}), which aliasscope cannot "
                "record into; put back the Python nn.Module it was scripted or traced from"
            )
        if path and _is_compiled(m):
            raise TypeError(
                f"submodule {path!r} is torch.compile'd; aliasscope needs plain modules inside the model: "
                f"put back the original ({path}._orig_mod) and compile the whole model if you wish"
            )
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "the model's parameters are on the meta device (shapes without data): materialise them and "
            "load weights first (e.g. model.to_empty(device='cpu') then model.load_state_dict(...))"
        )
    return model


def expected_input_size(model: nn.Module) -> int | None:
    """Image side the model is configured for (timm's ``pretrained_cfg['input_size']``), else None."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and len(cfg.get("input_size", ())) == 3:
        h, w = cfg["input_size"][1:]
        return int(h) if h == w else None
    return None


# -- numbers, names, devices ----------------------------------------------------------------------


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; a ValueError naming ``name`` otherwise (floats and bools
    are refused, also 4.0: a factor or a count is an integer)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_transforms(transforms: Any) -> list:
    """A list of transforms: None gives all, one name (``"rotate"``) is one transform; each is
    checked against :data:`aliasscope.transforms.TRANSFORMS`."""
    from .transforms import Transform, get_transform, transform_names

    if transforms is None:
        return transform_names()
    if isinstance(transforms, str | Transform):
        transforms = [transforms]
    try:
        names = list(transforms)
    except TypeError:
        raise TypeError(
            f"transforms must be a transform name or a list of names, got {type(transforms).__name__}"
        ) from None
    if not names:
        raise ValueError(f"transforms is empty; pass at least one of {', '.join(transform_names())}")
    for name in names:
        get_transform(name)
    return names


def check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine, or a ValueError saying why not."""
    if isinstance(device, bool) or not isinstance(device, str | torch.device | int):
        raise TypeError(f"device must be a string like 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"unknown device {str(device)!r}: torch has no such device; use 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return dev
    if dev.type == "meta":
        raise ValueError("the meta device holds no data; use 'cpu' or 'cuda'")
    if dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as err:
            raise ValueError(
                f"device {str(device)!r} is not available in this torch build "
                f"({str(err).splitlines()[0][:160]}); use 'cpu' or 'cuda'"
            ) from None
    return dev


def check_labels(labels: Any, num_images: int, classes: int | None = None) -> torch.Tensor:
    """Labels as a (num_images,) long tensor of class indices in ``[0, classes)``."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.shape != (num_images,):
        raise ValueError(
            f"labels must hold one class index per image, shape ({num_images},), got {tuple(labels.shape)}"
        )
    if classes is not None:
        bad = labels[(labels < 0) | (labels >= classes)]
        if bad.numel():
            values = sorted(set(bad.tolist()))
            more = f" and {len(values) - 10} more" if len(values) > 10 else ""
            raise ValueError(
                f"labels {values[:10]}{more} are outside the model's {classes} classes (0..{classes - 1}); "
                "the labels must be class indices of this model's output"
            )
    return labels


# -- non-finite outputs ---------------------------------------------------------------------------


class NonFiniteOutputError(ValueError):
    """The model's output holds NaN/inf (the message names the images and the first module)."""


def _nonfinite(obj: Any) -> bool:
    leaves, _ = tree_flatten(obj)
    return any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all() for t in leaves
    )


def _bad_rows(t: torch.Tensor) -> list[int]:
    if t.dim() == 0:
        return [] if torch.isfinite(t) else [0]
    return (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()


def check_finite_output(
    model: nn.Module,
    images: torch.Tensor,
    output: Any,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int | None = None,
) -> None:
    """Nothing when ``output`` (what the analysis computed from ``images``) is finite; else
    :func:`raise_nonfinite`."""
    if isinstance(output, torch.Tensor) and output.is_floating_point() and not torch.isfinite(output).all():
        raise_nonfinite(model, images, head, batch_size)


def raise_nonfinite(
    model: nn.Module,
    images: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int | None = None,
) -> None:
    """Run ``head(model(images))`` again (``batch_size`` images at a time) with temporary forward hooks
    and raise :class:`NonFiniteOutputError` naming the images whose output holds NaN/inf and the first
    module that produced non-finite values. Returns (raises nothing) if the outputs are finite."""
    from ._borrow import borrowed

    paths = {id(m): p for p, m in model.named_modules()}
    found: list[str] = []
    stack: list[nn.Module] = []

    def name(m: nn.Module) -> str:
        path = paths.get(id(m), "")
        return f"{path!r} ({type(m).__name__})" if path else f"the model's own forward ({type(m).__name__})"

    def pre(m: nn.Module, args: tuple) -> None:
        if not found and stack and _nonfinite(args):
            found.append(f"{name(stack[-1])}, in its forward code before it calls {paths.get(id(m), '?')!r}")
        stack.append(m)

    def post(m: nn.Module, args: tuple, out: Any) -> None:
        if stack and stack[-1] is m:
            stack.pop()
        if not found and _nonfinite(out):
            own = [p for p in m.parameters(recurse=False) if not torch.isfinite(p).all()]
            found.append(name(m) + (" (its own parameters hold NaN/inf)" if own else ""))

    bad: list[int] = []
    model_bad = False
    step = batch_size or images.shape[0]
    with borrowed(model), torch.no_grad():
        for s in range(0, images.shape[0], step):
            chunk = images[s : s + step]
            handles = []
            if not found:
                for m in model.modules():
                    handles.append(m.register_forward_pre_hook(pre))
                    handles.append(m.register_forward_hook(post, always_call=True))
            stack.clear()
            try:
                y = model(chunk)
            finally:
                for h in handles:
                    h.remove()
            if not isinstance(y, torch.Tensor):
                return
            model_bad = model_bad or not torch.isfinite(y).all().item()
            out = head(y) if head is not None else y
            bad.extend(s + i for i in _bad_rows(out))
    if not bad:
        return
    shown = f"{bad[:10]}" + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    if model_bad:
        where = f"; the first module producing non-finite values is {found[0]}" if found else ""
        raise NonFiniteOutputError(
            f"the model's output contains NaN/inf for images {shown}{where}. Derivatives of a non-finite "
            "output mean nothing: check the weights (a checkpoint with NaN?), the input normalisation "
            "and overflow (float16)"
        )
    raise NonFiniteOutputError(
        f"the output contains NaN/inf for images {shown}, although the model's own output is finite: "
        "the output= head produces them (e.g. a log of 0)"
    )


def names_nonfinite_images(fn: Callable) -> Callable:
    """Decorate an analysis ``fn(model, images, ..., output=, batch_size=)`` that works on batches of
    the images: a :class:`NonFiniteOutputError` raised for one batch is raised again naming every
    image (indices into all of ``images``) whose output holds NaN/inf."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NonFiniteOutputError:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            images = getattr(a["images"], "images", a["images"])
            if a.get("batch_size") is not None and images.shape[0] > a["batch_size"]:
                from .lie import _output_fn

                output = a.get("output", "logits")
                model = check_model(a["model"])
                raise_nonfinite(model, images.to(_device(model)), _output_fn(output), a["batch_size"])
            raise

    return wrapped


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# -- names: op selection, units, layouts ----------------------------------------------------------


def _listing(names: Sequence[str], k: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (", ..." if len(names) > k else "")


def selected_ops(ops: Sequence[Any], select: Any) -> list[int]:
    """:func:`aliasscope.capture.select_ops`, with a ValueError when glob patterns or kind names
    match no op (a predicate may select none)."""
    from .capture import select_ops

    keep = select_ops(ops, select)
    if select is None or callable(select):
        return keep
    pats = [select] if isinstance(select, str) else list(select)
    names = [op.name for op in ops]
    kinds = list(dict.fromkeys(op.kind for op in ops))
    if not keep:
        close = difflib.get_close_matches(str(pats[0]).rstrip("*"), names, n=3, cutoff=0.5)
        hint = f"; close names: {_listing(close)}" if close else ""
        raise ValueError(
            f"select={select!r} matches no op{hint}; ops are named like {_listing(names)} "
            f"({len(names)} ops); kinds: {', '.join(kinds)}"
        )
    return keep


def _module_classes(model: nn.Module) -> set[str]:
    return {c.__name__ for m in model.modules() for c in type(m).__mro__}


def _unknown_path_error(what: str, key: str, paths: list[str], extra: str = "") -> ValueError:
    close = difflib.get_close_matches(key, paths, n=5, cutoff=0.5)
    hint = f"; close module paths: {_listing(close, 5)}" if close else f"; paths are like {_listing(paths)}"
    return ValueError(f"{what} {key!r} matches no module path{extra} of the model{hint}")


def check_units(model: nn.Module, units: Sequence[str]) -> None:
    """Each ``units`` entry is a glob on module paths or a module class name present in the model."""
    if isinstance(units, str):
        units = [units]
    paths = [p for p, _ in model.named_modules() if p]
    classes = _module_classes(model)
    for pat in units:
        if not isinstance(pat, str):
            raise TypeError(f"units must be module paths or class names (strings), got {pat!r}")
        if pat not in classes and not any(fnmatch.fnmatchcase(p, pat) for p in paths):
            raise _unknown_path_error("units entry", pat, paths, " or class name")


def check_layouts(model: nn.Module, layouts: Mapping[str, Any] | None) -> None:
    """Each ``layouts`` key is a module path of the model (``""``: the model itself)."""
    if not layouts:
        return
    if not isinstance(layouts, Mapping):
        raise TypeError(f"layouts must map module paths to Layouts, got {type(layouts).__name__}")
    paths = [p for p, _ in model.named_modules()]
    for key in layouts:
        if key not in paths:
            raise _unknown_path_error("layouts key", str(key), [p for p in paths if p])


# -- outputs that are not one tensor --------------------------------------------------------------


def output_hint(y: Any) -> str:
    """Why a non-tensor model output cannot be analysed, and the wrapper that fixes it."""
    expr = None
    if isinstance(y, Mapping) or hasattr(y, "logits"):
        if isinstance(getattr(y, "logits", None), torch.Tensor):
            expr = "self.model(x).logits"
        elif isinstance(y, Mapping):
            tensors = [k for k, v in y.items() if isinstance(v, torch.Tensor)]
            key = "logits" if "logits" in tensors else next(iter(tensors), None)
            expr = f"self.model(x)[{key!r}]" if key is not None else None
    elif isinstance(y, tuple | list):
        k = next((i for i, v in enumerate(y) if isinstance(v, torch.Tensor)), None)
        expr = f"self.model(x)[{k}]" if k is not None else None
    what = type(y).__name__
    if isinstance(y, Mapping):
        what += f" with keys {list(y)[:6]}"
    returns = f"returns {expr}" if expr else "returns the tensor to analyse"
    return (
        f"the model returned a {what}, not a tensor; aliasscope needs a model whose forward returns one "
        f"tensor (logits or a feature map). Pass a wrapper instead: an nn.Module that holds the model as "
        f"self.model and whose forward(x) {returns} (an output= callable cannot do this: it is applied "
        "to a tensor)"
    )
