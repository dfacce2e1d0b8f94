"""Sweep name resolution: the paper's list as package data, patterns and files, and each name's
status against the installed timm (renamed, remapped onto another model's weights, gone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm

from aliasscope.sweep import STATUSES, expand, paper_models, resolution_rows, resolve, summary

SHARED_LIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "paper-models.txt"


def test_the_paper_list_ships_with_the_package() -> None:
    names = paper_models()
    assert len(names) == 483 and len(set(names)) == 483
    if SHARED_LIST.exists():
        assert names == [line.strip() for line in SHARED_LIST.read_text().splitlines() if line.strip()]


def test_resolution_of_the_paper_list() -> None:
    resolved = resolve(paper_models())
    counts = summary(resolved)
    print("\npaper list against timm", timm.__version__, counts)
    assert list(counts) == list(STATUSES) and sum(counts.values()) == 483
    by_name = {r.requested: r for r in resolved}
    assert by_name["resnet50"].status == "current" and by_name["resnet50"].model.startswith("resnet50.")
    assert (by_name["adv_inception_v3"].status, by_name["adv_inception_v3"].model) == (
        "renamed",
        "inception_v3.tf_adv_in1k",
    )
    # timm maps the 32x16d/32x32d/32x48d Instagram ResNeXts onto the 32x8d checkpoint: never evaluated
    for name in ("ig_resnext101_32x16d", "ig_resnext101_32x32d", "ig_resnext101_32x48d"):
        assert by_name[name].status == "remapped" and by_name[name].model is None
        assert "resnext101_32x8d" in by_name[name].note
    assert by_name["ig_resnext101_32x8d"].status == "renamed"
    assert by_name["gluon_xception65"].status == "gone" and by_name["gluon_xception65"].model is None
    pretrained = set(timm.list_models(pretrained=True))
    for r in resolved:
        if r.status in ("current", "renamed"):
            assert r.model in pretrained, r
        elif r.status == "no_weights":
            assert timm.is_model(r.model) and not any(p.startswith(r.model + ".") for p in pretrained)
        else:
            assert r.model is None and r.note
    if timm.__version__ == "1.0.31":  # the counts of the README, for the timm they were measured with
        assert counts == {
            "current": 366,
            "renamed": 110,
            "remapped": 3,
            "no_weights": 1,
            "hub": 0,
            "source": 0,
            "gone": 3,
        }
    rows = resolution_rows(resolved)
    assert len(rows) == 483 and set(rows[0]) == {"requested", "model", "status", "note"}


def test_patterns_files_and_hub_names_expand_in_order_each_once(tmp_path: Path) -> None:
    listing = tmp_path / "models.txt"
    listing.write_text("# my models\nresnet18\n\nhf-hub:timm/resnet50.a1_in1k  # from the hub\nresnet18\n")
    names = expand([str(listing), "resnet1*", "resnet18", "convnext_atto.d2_in1k"])
    assert names[:2] == ["resnet18", "hf-hub:timm/resnet50.a1_in1k"]
    assert "resnet101" in names and names.count("resnet18") == 1 and names[-1] == "convnext_atto.d2_in1k"
    assert expand("paper") == paper_models()
    hub = resolve(["hf-hub:timm/resnet50.a1_in1k"])[0]
    assert (hub.status, hub.model) == ("hub", "hf-hub:timm/resnet50.a1_in1k")
    with pytest.raises(ValueError, match="matches no timm model"):
        expand("no_such_net_*")


def test_tags_and_unknown_names() -> None:
    tagged, bad_tag, unknown = resolve(["resnet50.a1_in1k", "resnet50.no_such_tag", "no_such_net"])
    assert (tagged.status, tagged.model) == ("current", "resnet50.a1_in1k")
    assert bad_tag.status == "gone" and "no_such_tag" in bad_tag.note
    assert unknown.status == "gone" and unknown.model is None


def test_other_model_sources_are_passed_on_and_a_checkpoint_is_a_model_not_a_list(tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(b"not a list of names")
    names = expand(["torchvision:resnet18", "python:my_nets:build", str(checkpoint), "resnet18"])
    assert names == ["torchvision:resnet18", "python:my_nets:build", str(checkpoint), "resnet18"]
    resolved = resolve(names)
    assert [r.status for r in resolved] == ["source", "source", "source", "current"]
    assert [r.model for r in resolved[:3]] == names[:3] and all(r.evaluated for r in resolved)
    assert "'torchvision'" in resolved[0].note and "'python'" in resolved[1].note
    assert "'checkpoint'" in resolved[2].note
