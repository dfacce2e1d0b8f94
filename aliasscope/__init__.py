"""aliasscope: where a vision model breaks its symmetries, layer by layer, and why.

The method is the Lie derivative of a network (Gruver, Finzi, Goldblum, Wilson, ICLR 2023):
``L_X F(x) = d/dt rho(-t) F(rho(t) x)`` at ``t = 0`` for continuous image transformations rho.

Pipeline, one module each: :mod:`~aliasscope.transforms` (the groups) -> :mod:`~aliasscope.generators`
(their derivatives on a pixel grid) -> :mod:`~aliasscope.lie` (end-to-end Lie derivatives and metrics)
-> :mod:`~aliasscope.capture` (every op, its kind and layout) -> :mod:`~aliasscope.decomposition` (exact
per-op attribution with a completeness check) / :mod:`~aliasscope.spectrum` (aliasing energy per op),
with :mod:`~aliasscope.models` / :mod:`~aliasscope.data` to load real models and photos; the op kinds
are one registry, :mod:`~aliasscope.kinds`. :func:`~aliasscope.diagnosis.diagnose` runs all of it (what
``aliasscope diagnose`` does) and returns a :class:`~aliasscope.diagnosis.Diagnosis`; the report's
figures are one registry, :mod:`~aliasscope.figures`.

Quick start::

    import aliasscope as asc
    model, preprocess = asc.load_model("tf_efficientnet_lite0")
    batch = asc.load_images(preprocess=preprocess)       # real photos bundled with scikit-image
    metrics = asc.equivariance_metrics(model, batch)     # per image x transform
    print(metrics)
    layers = asc.decompose(model, batch.images, "rotate", target="pred", output="softmax")
    print(layers)                                        # shares by op kind, top ops, completeness
"""

__version__ = "0.1.0"

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS: dict[str, str] = {
    "plot_alias_vs_attribution": "._plots",
    "plot_comparison": "._plots",
    "plot_layer_attribution": "._plots",
    "plot_lie_distribution": "._plots",
    "plot_spectral": "._plots",
    "plot_transforms": "._plots",
    "plot_where": "._plots",
    "render_report": "._report",
    "write_report": "._report",
    "resample": "._resampling",
    "LayerLieDerivative": ".captum",
    "LieDerivativeAttribution": ".captum",
    "KINDS": ".capture",
    "OpRecord": ".capture",
    "Recording": ".capture",
    "record": ".capture",
    "Comparison": ".comparison",
    "compare": ".comparison",
    "ImageBatch": ".data",
    "load_images": ".data",
    "Decomposition": ".decomposition",
    "SelfCheckWarning": ".decomposition",
    "decompose": ".decomposition",
    "Diagnosis": ".diagnosis",
    "diagnose": ".diagnosis",
    "register_figure": ".figures",
    "FIXES": ".fixes",
    "blurpool": ".fixes",
    "changes": ".fixes",
    "circular_padding": ".fixes",
    "filtered_activation": ".fixes",
    "polyphase": ".fixes",
    "GENERATORS": ".generators",
    "apply_generator": ".generators",
    "generator_names": ".generators",
    "Kind": ".kinds",
    "get_kind": ".kinds",
    "register_kind": ".kinds",
    "BCHW": ".layouts",
    "BHWC": ".layouts",
    "INVARIANT": ".layouts",
    "Layout": ".layouts",
    "infer_layout": ".layouts",
    "EquivarianceMetrics": ".lie",
    "equivariance_metrics": ".lie",
    "finite_difference": ".lie",
    "lie_derivative": ".lie",
    "BUNDLED_MODELS": ".models",
    "MissingWeightsError": ".models",
    "Preprocess": ".models",
    "available_pretrained": ".models",
    "load_model": ".models",
    "Spectrum": ".spectrum",
    "spectral": ".spectrum",
    "TRANSFORMS": ".transforms",
    "Transform": ".transforms",
    "get_transform": ".transforms",
    "transform_names": ".transforms",
}
"""Where each public name lives: imported on first use (PEP 562), so that ``aliasscope --help``
and ``import aliasscope`` do not load timm, matplotlib and captum before they are needed."""

if TYPE_CHECKING:  # what static tools see: the same names, imported eagerly
    from ._plots import (
        plot_alias_vs_attribution,
        plot_comparison,
        plot_layer_attribution,
        plot_lie_distribution,
        plot_spectral,
        plot_transforms,
        plot_where,
    )
    from ._report import render_report, write_report
    from ._resampling import resample
    from .captum import LayerLieDerivative, LieDerivativeAttribution
    from .capture import KINDS, OpRecord, Recording, record
    from .comparison import Comparison, compare
    from .data import ImageBatch, load_images
    from .decomposition import Decomposition, SelfCheckWarning, decompose
    from .diagnosis import Diagnosis, diagnose
    from .figures import register_figure
    from .fixes import FIXES, blurpool, changes, circular_padding, filtered_activation, polyphase
    from .generators import GENERATORS, apply_generator, generator_names
    from .kinds import Kind, get_kind, register_kind
    from .layouts import BCHW, BHWC, INVARIANT, Layout, infer_layout
    from .lie import EquivarianceMetrics, equivariance_metrics, finite_difference, lie_derivative
    from .models import BUNDLED_MODELS, MissingWeightsError, Preprocess, available_pretrained, load_model
    from .spectrum import Spectrum, spectral
    from .transforms import TRANSFORMS, Transform, get_transform, transform_names

__all__ = [
    "Comparison",
    "compare",
    "FIXES",
    "blurpool",
    "changes",
    "circular_padding",
    "filtered_activation",
    "polyphase",
    "__version__",
    # transforms and generators
    "TRANSFORMS",
    "Transform",
    "get_transform",
    "transform_names",
    "GENERATORS",
    "apply_generator",
    "generator_names",
    "resample",
    # layouts
    "Layout",
    "BCHW",
    "BHWC",
    "INVARIANT",
    "infer_layout",
    # Lie derivatives
    "lie_derivative",
    "finite_difference",
    "equivariance_metrics",
    "EquivarianceMetrics",
    # capture and decomposition
    "record",
    "Recording",
    "OpRecord",
    "KINDS",
    "Kind",
    "get_kind",
    "register_kind",
    "decompose",
    "Decomposition",
    "SelfCheckWarning",
    # the whole diagnosis (what `aliasscope diagnose` runs)
    "diagnose",
    "Diagnosis",
    # spectra
    "spectral",
    "Spectrum",
    # models and images
    "load_model",
    "Preprocess",
    "BUNDLED_MODELS",
    "available_pretrained",
    "MissingWeightsError",
    "load_images",
    "ImageBatch",
    # figures and report
    "plot_layer_attribution",
    "plot_transforms",
    "plot_spectral",
    "plot_alias_vs_attribution",
    "plot_where",
    "plot_comparison",
    "plot_lie_distribution",
    "register_figure",
    "render_report",
    "write_report",
    # captum (imported on first use: captum's import is slow)
    "LayerLieDerivative",
    "LieDerivativeAttribution",
]


def __getattr__(name: str):
    """Import a public name's module on first use and keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aliasscope' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
