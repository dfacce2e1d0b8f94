"""Before/after evaluation of models (an original and its anti-aliasing fixes) on the same images.

:func:`compare` measures, per model: the end-to-end Lie derivative per transform (mean and 95%
interval), the layer attribution by op kind, alias energy by op kind, top-1 accuracy and agreement with
the first model, Zhang's shift consistency, fractional-shift consistency, forward time and parameter
count. Pass images larger than the model's input by 32 pixels (``resize=256, crop=256`` for a
224-pixel model): evaluation uses their centre crop, and the consistency measures use crops at offsets
in ``[0, 32)^2``, as in Zhang (2019). The crop is the model's input size (timm's ``pretrained_cfg``)
unless ``crop=`` says otherwise; images too small for it and its 32-pixel margin are an error, never a
silently smaller crop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._timing import best_time
from .results import Result

__all__ = [
    "compare",
    "Comparison",
    "predict",
    "top1",
    "shift_consistency",
    "fractional_shift_consistency",
    "fft_shift",
]


def _crop(x: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return x[..., top : top + size, left : left + size]


def _centre(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return _crop(x, top, left, size)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """The top-1 class of each image (on the CPU), ``batch_size`` images per forward pass."""
    return torch.cat(
        [model(x[s : s + batch_size]).argmax(-1).cpu() for s in range(0, x.shape[0], batch_size)]
    )


def top1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy: the fraction of ``predictions`` (:func:`predict`) equal to ``labels``."""
    return (predictions == labels.cpu()).double().mean().item()


def _crop_pairs(x: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image two crop offsets (top, left) in ``[0, H - size]^2``."""
    gen = torch.Generator().manual_seed(seed)
    span = x.shape[-1] - size + 1
    a = torch.randint(0, span, (x.shape[0], 2), generator=gen)
    b = torch.randint(0, span, (x.shape[0], 2), generator=gen)
    return a, b


def shift_consistency(
    model: nn.Module, images: torch.Tensor, size: int, *, seed: int = 0, batch_size: int = 32
) -> float:
    """Zhang (2019): fraction of images whose top-1 class agrees between two random ``size`` crops
    (offsets uniform in ``[0, H - size]^2``, one pair per image)."""
    if images.shape[-1] <= size or images.shape[-2] <= size:
        raise ValueError(
            f"shift consistency needs images larger than the crop {size}, got {tuple(images.shape)}"
        )
    a, b = _crop_pairs(images, size, seed)
    first = torch.stack([_crop(x, int(t), int(lft), size) for x, (t, lft) in zip(images, a, strict=True)])
    second = torch.stack([_crop(x, int(t), int(lft), size) for x, (t, lft) in zip(images, b, strict=True)])
    return (predict(model, first, batch_size) == predict(model, second, batch_size)).double().mean().item()


def fft_shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Band-limited translation of (B, C, H, W) images by per-image (dy, dx) pixels (Fourier phase
    shift; periodic, so crop away from the borders)."""
    h, w = x.shape[-2:]
    ky = torch.fft.fftfreq(h, device=x.device, dtype=torch.float64)
    kx = torch.fft.fftfreq(w, device=x.device, dtype=torch.float64)
    dy, dx = dy.to(x.device, torch.float64), dx.to(x.device, torch.float64)
    phase = torch.exp(
        -2j * math.pi * (dy.view(-1, 1, 1, 1) * ky.view(1, 1, -1, 1) + dx.view(-1, 1, 1, 1) * kx)
    )
    return torch.fft.ifft2(torch.fft.fft2(x.double()) * phase).real.to(x.dtype)


def fractional_shift_consistency(
    model: nn.Module, images: torch.Tensor, size: int, *, seed: int = 0, batch_size: int = 32
) -> float:
    """Fraction of images whose top-1 class is unchanged when the image is translated by a random
    sub-pixel amount (dy, dx uniform in [0, 1)) with a band-limited (Fourier) shift, both centre-cropped
    to ``size``."""
    gen = torch.Generator().manual_seed(seed + 1)
    d = torch.rand(images.shape[0], 2, generator=gen, dtype=torch.float64)
    moved = _centre(fft_shift(images, d[:, 0], d[:, 1]), size)
    still = _centre(images, size)
    return (predict(model, still, batch_size) == predict(model, moved, batch_size)).double().mean().item()


def _forward_ms(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Best wall-clock milliseconds per image of a forward pass on ``x`` (after one warm-up pass)."""

    def forward() -> None:
        with torch.no_grad():
            model(x)

    return 1000 * best_time(forward, x.device.type, repeats, warmup=True) / x.shape[0]


def _pct(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    return f"{100 * v:6.1f}" if isinstance(v, float) and v == v else f"{'-':>6}"


@dataclass
class Comparison(Result):
    """One row of measures per model (:attr:`rows`, also :attr:`table`), in the order the models were
    given; the per-kind layer shares and alias energies in :attr:`by_kind`; the settings in
    :attr:`settings`. :meth:`plot` draws :func:`aliasscope._plots.plot_comparison`."""

    default_figure = "plot_comparison"

    rows: list[dict[str, Any]]
    by_kind: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [r["model"] for r in self.rows]

    @property
    def table(self) -> list[dict[str, Any]]:
        """:attr:`rows`: one row of measures per model."""
        return self.rows

    def to_dict(self) -> dict[str, Any]:
        """Settings, rows and per-kind measures."""
        return {"settings": self.settings, "rows": self.rows, "by_kind": self.by_kind}

    def summary(self) -> str:
        """A text table: accuracy, consistency, cost and Lie derivative per transform."""
        transforms = self.settings.get("transforms", [])
        head = f"{'model':<34} {'top1':>6} {'agree':>6} {'shift':>6} {'frac':>6} {'ms/img':>7} " + " ".join(
            f"{t[:11]:>11}" for t in transforms
        )
        lines = [head]
        for r in self.rows:
            lie = " ".join(f"{r[f'lie_{t}']:11.4g}" for t in transforms)
            pcts = " ".join(
                _pct(r, k) for k in ("top1", "agreement", "shift_consistency", "fractional_shift_consistency")
            )
            lines.append(f"{r['model'][:34]:<34} {pcts} {r['forward_ms']:7.2f} {lie}")
        return "\n".join(lines)


def _crop_size(crop: int | None, images: torch.Tensor, model: nn.Module, input_size) -> int:
    """The side of the crops the models see (see :func:`compare`'s ``crop``)."""
    h, w = images.shape[-2:]
    if crop is not None:
        size = crop
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= min(h, w):
            raise ValueError(f"crop must be an integer in [16, {min(h, w)}] for images {h}x{w}, got {crop!r}")
        return size
    size = input_size(model)
    if size is None:  # a model without a configured input size: Zhang's protocol on these images
        size = w - 32
        if size < 16 or size > h:
            raise ValueError(f"images {h}x{w} are too small for compare's crops; pass crop= explicitly")
        return size
    if min(h, w) < size + 32:
        raise ValueError(
            f"compare evaluates {size}-pixel crops (the model's input size) and needs images {size + 32} "
            f"pixels wide for the shift-consistency offsets in [0, 32)^2, got {h}x{w}: load them with a "
            f"preprocess {size + 32} wide, e.g. dataclasses.replace(preprocess, crop={size + 32}, "
            f"resize=max(preprocess.resize, {size + 32})) as `aliasscope fix` does, or pass crop= "
            f"explicitly (e.g. crop={min(h, w) - 32 if min(h, w) - 32 >= 16 else min(h, w)}: smaller crops)"
        )
    return size


def _classes(name: str, model: nn.Module, x: torch.Tensor) -> int:
    """The number of classes of a classifier (one forward of one image)."""
    from ._borrow import borrowed, check_images

    x = check_images(x, model)
    with borrowed(model), torch.no_grad():
        y = model(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"compare needs classifiers with (B, classes) logits; model {name!r} returned {got}")
    return int(y.shape[1])


def compare(
    models: dict[str, nn.Module],
    images: Any,
    labels: torch.Tensor | None = None,
    transforms: Sequence[str] = ("translate_x", "rotate", "scale"),
    *,
    crop: int | None = None,
    generator: str = "central",
    layer_transform: str | None = "translate_x",
    layer_images: int = 16,
    spectral_images: int = 4,
    upsample: int = 4,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Comparison:
    """Measure every model on the same images (see the module doc).

    Parameters
    ----------
    models:
        Name -> model; the first is the reference for prediction agreement.
    images:
        (B, 3, H, W) tensor or :class:`~aliasscope.data.ImageBatch` (its labels are used when
        ``labels`` is None), already normalised for the models.
    crop:
        Side of the crops the models see. Default: the first model's input size (timm's
        ``pretrained_cfg``), which needs images ``crop + 32`` pixels wide (a ValueError otherwise);
        ``H - 32`` for models without one. An explicit ``crop`` may leave a smaller margin (shift
        consistency then uses offsets in ``[0, H - crop]``; NaN when ``crop == H``).
    layer_transform, layer_images:
        Transform and number of images for the exact layer attribution (target: the predicted class);
        None skips it.
    spectral_images, upsample:
        Images and upsampling factor of the alias energy per kind; 0 images skips it.
    """
    from tqdm.auto import tqdm

    from ._borrow import borrowed, check_images
    from ._checks import check_int, check_labels, check_model, check_transforms, expected_input_size
    from .decomposition import decompose as _decompose
    from .lie import equivariance_metrics
    from .spectrum import alias_of, spectral

    if not models:
        raise ValueError("compare needs at least one model")
    models = {name: check_model(m) for name, m in models.items()}
    transforms = check_transforms(transforms)
    batch_size = check_int("batch_size", batch_size)
    layer_images = check_int("layer_images", layer_images, minimum=0)
    spectral_images = check_int("spectral_images", spectral_images, minimum=0)
    if spectral_images:
        check_int("upsample (the upsampling factor)", upsample, minimum=2)
    if labels is None:
        labels = getattr(images, "labels", None)
    images = check_images(getattr(images, "images", images))
    size = _crop_size(crop, images, next(iter(models.values())), expected_input_size)
    centre = _centre(images, size)
    classes = {name: _classes(name, m, centre[:1]) for name, m in models.items()}
    if len(set(classes.values())) > 1:
        counts = ", ".join(f"{n!r} {c}" for n, c in classes.items())
        raise ValueError(
            f"the models have different numbers of classes ({counts}): top-1 and agreement compare class "
            "indices, so compare needs models over the same classes"
        )
    if labels is not None:
        labels = check_labels(labels, images.shape[0], next(iter(classes.values())))
    rows: list[dict[str, Any]] = []
    by_kind: dict[str, dict[str, dict[str, float]]] = {}
    reference: torch.Tensor | None = None
    for name, model in tqdm(models.items(), desc="models", disable=not progress):
        check_images(centre[:1], model)
        device = next(model.parameters()).device
        with borrowed(model):  # eval mode, given back as it came
            x = centre.to(device)
            pred = predict(model, x, batch_size)
            row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters())}
            row["top1"] = top1(pred, labels) if labels is not None else float("nan")
            reference = pred if reference is None else reference
            row["agreement"] = (pred == reference).double().mean().item()
            full = images.to(device)
            row["shift_consistency"] = (
                shift_consistency(model, full, size, seed=seed, batch_size=batch_size)
                if images.shape[-1] > size
                else float("nan")
            )
            row["fractional_shift_consistency"] = fractional_shift_consistency(
                model, full, size, seed=seed, batch_size=batch_size
            )
            row["forward_ms"] = _forward_ms(model, x[:batch_size])
        metrics = equivariance_metrics(
            model, x, list(transforms), generator=generator, batch_size=batch_size, progress=False
        )
        for t, (mean, lo, hi) in metrics.interval().items():
            row[f"lie_{t}"], row[f"lie_{t}_ci95_low"], row[f"lie_{t}_ci95_high"] = mean, lo, hi
        kinds: dict[str, dict[str, float]] = {}
        if layer_transform is not None and layer_images > 0:
            dec = _decompose(
                model,
                x[:layer_images],
                layer_transform,
                target="pred",
                generator=generator,
                batch_size=min(batch_size, 16),  # the decomposition keeps every activation of a batch
            )
            row["completeness_error"] = dec.completeness_error
            for kind, r in dec.by_kind().items():
                kinds.setdefault(kind, {})["share"] = r["share"]
        if spectral_images > 0:
            sp = spectral(model, x[:spectral_images], upsample=upsample, batch_size=batch_size)
            spectra = sp.by_kind()
            for kind, r in spectra.items():
                kinds.setdefault(kind, {})["alias"] = alias_of(r)
            nonlin = spectra.get("nonlinearity", {}).get("alias_ratio", float("nan"))
            down = spectra.get("downsampling", {}).get("stride_alias", float("nan"))
            row["alias_nonlinearity"], row["alias_downsampling"] = nonlin, down
        by_kind[name] = kinds
        rows.append(row)
    settings = {
        "transforms": list(transforms),
        "generator": generator,
        "images": int(images.shape[0]),
        "image_size": list(images.shape[-2:]),
        "crop": size,
        "layer_transform": layer_transform,
        "layer_images": min(layer_images, images.shape[0]),
        "spectral_images": min(spectral_images, images.shape[0]),
        "upsample": upsample,
        "seed": seed,
        "labelled": labels is not None,
    }
    return Comparison(rows, by_kind, settings)
