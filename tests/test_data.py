"""Tests for aliasscope.data: image sources, labels, selection and error messages."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aliasscope.data import DEFAULT_PHOTOS, ImageBatch, list_images, load_images
from aliasscope.models import Preprocess

IMAGENET_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
SMALL = Preprocess(resize=36, crop=32, mean=0.0, std=1.0)


def _save_image(path: Path, value: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Path:
    """Write a flat-coloured image and return its path."""
    Image.new("RGB", size, (value, value, value)).convert(mode).save(path)
    return path


def _write_csv(path: Path, rows: list[dict[str, object]], columns: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Folder with five images of mixed extensions/modes plus files that must be ignored."""
    folder = tmp_path / "images"
    folder.mkdir()
    _save_image(folder / "a.png", 10)
    _save_image(folder / "b.JPG", 50)
    _save_image(folder / "c.jpeg", 90, mode="L")
    _save_image(folder / "d.bmp", 130)
    _save_image(folder / "e.PNG", 170, mode="RGBA")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    return folder


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def test_default_photos() -> None:
    batch = load_images()
    assert isinstance(batch, ImageBatch)
    assert batch.images.shape == (6, 3, 224, 224) and batch.images.dtype == torch.float32
    assert batch.labels is None and len(batch) == 6
    assert [Path(f).name for f in batch.files] == list(DEFAULT_PHOTOS)
    assert batch.images.min() >= 0.0 and batch.images.max() <= 1.0
    assert batch.images.std() > 0.1  # real photos, not blank


def test_folder_sorted_case_insensitive(image_folder: Path) -> None:
    batch = load_images(image_folder, SMALL)
    assert [Path(f).name for f in batch.files] == ["a.png", "b.JPG", "c.jpeg", "d.bmp", "e.PNG"]
    assert batch.images.shape == (5, 3, 32, 32) and batch.labels is None
    # flat greys survive resize/crop/RGB conversion (JPEG is lossy, hence the tolerance)
    means = batch.images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(means, torch.tensor([10, 50, 90, 130, 170]) / 255, atol=2 / 255, rtol=0)


def test_list_of_files_and_single_file(image_folder: Path) -> None:
    files = [image_folder / "d.bmp", str(image_folder / "a.png")]
    batch = load_images(files, SMALL)
    assert batch.files == [str(p) for p in files]
    single = load_images(image_folder / "a.png", SMALL)
    assert len(single) == 1


def test_csv_labels_align_with_files(image_folder: Path) -> None:
    rows = [
        {"file": "images/d.bmp", "class_index": 7, "name": "x"},
        {"file": str(image_folder / "a.png"), "class_index": 3, "name": "y"},
        {"file": "images/c.jpeg", "class_index": 0, "name": "z"},
    ]
    csv_path = _write_csv(image_folder.parent / "labels.csv", rows, ["name", "file", "class_index"])
    batch = load_images(csv_path, SMALL)
    assert batch.labels is not None and batch.labels.dtype == torch.long
    assert batch.labels.tolist() == [7, 3, 0]
    assert [Path(f).name for f in batch.files] == ["d.bmp", "a.png", "c.jpeg"]
    torch.testing.assert_close(batch.images[0].mean(), torch.tensor(130 / 255), atol=1e-3, rtol=0)


def test_imagenet_sample_csv_every_five() -> None:
    labels_csv = IMAGENET_SAMPLE / "labels.csv"
    if not labels_csv.is_file():
        pytest.skip(f"{labels_csv} not available")
    batch = load_images(labels_csv, SMALL, every=5, limit=4)
    with labels_csv.open() as handle:
        rows = list(csv.DictReader(handle))[::5][:4]
    assert batch.labels.tolist() == [int(r["class_index"]) for r in rows]
    assert [Path(f).name for f in batch.files] == [r["file"] for r in rows]


def test_every_and_limit(image_folder: Path) -> None:
    names = lambda batch: [Path(f).name for f in batch.files]  # noqa: E731
    assert names(load_images(image_folder, SMALL, every=2)) == ["a.png", "c.jpeg", "e.PNG"]
    assert names(load_images(image_folder, SMALL, limit=2)) == ["a.png", "b.JPG"]
    assert names(load_images(image_folder, SMALL, every=3, limit=1)) == ["a.png"]
    assert len(load_images(image_folder, SMALL, limit=50)) == 5
    with pytest.raises(ValueError, match="every"):
        load_images(image_folder, SMALL, every=0)
    with pytest.raises(ValueError, match="limit"):
        load_images(image_folder, SMALL, limit=0)


def test_custom_callable_preprocess(image_folder: Path) -> None:
    def to_tensor(image: Image.Image) -> torch.Tensor:
        assert image.mode == "RGB"
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)

    batch = load_images(image_folder, to_tensor)
    assert batch.images.shape == (5, 3, 8, 8)


def test_preprocess_with_varying_shapes_is_rejected(image_folder: Path) -> None:
    _save_image(image_folder / "f.png", 0, size=(20, 10))
    with pytest.raises(ValueError, match="f.png"):
        load_images(image_folder, lambda im: torch.zeros(3, *im.size))


# --------------------------------------------------------------------------------------------------
# ImageBatch
# --------------------------------------------------------------------------------------------------


def test_image_batch_subset_and_to() -> None:
    batch = ImageBatch(
        torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2),
        torch.tensor([5, 6, 7, 8]),
        ["w", "x", "y", "z"],
    )
    picked = batch.subset([2, 0])
    assert picked.files == ["y", "w"] and picked.labels.tolist() == [7, 5]
    assert picked.images[:, 0, 0, 0].tolist() == [2.0, 0.0]
    assert batch.subset(slice(1, 3)).files == ["x", "y"]
    assert batch.subset(torch.tensor([3])).labels.tolist() == [8]
    moved = batch.to("cpu")
    assert moved.files == batch.files and moved is not batch and len(moved) == 4


def test_image_batch_validates_lengths() -> None:
    with pytest.raises(ValueError, match="files"):
        ImageBatch(torch.zeros(2, 3, 4, 4), None, ["only-one"])
    with pytest.raises(ValueError, match="labels"):
        ImageBatch(torch.zeros(2, 3, 4, 4), torch.tensor([1, 2, 3]), ["a", "b"])


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_missing_source(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_images(missing)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"no image files .* {re.escape(str(tmp_path))}"):
        load_images(tmp_path)
    with pytest.raises(ValueError, match="no image files"):
        list_images(tmp_path)


def test_corrupt_image_is_named(image_folder: Path) -> None:
    bad = image_folder / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image file .*broken\.jpg"):
        load_images(image_folder, SMALL)


def test_truncated_image_is_named(image_folder: Path) -> None:
    good = (image_folder / "a.png").read_bytes()
    (image_folder / "half.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"half\.png"):
        load_images(image_folder, SMALL)


def test_missing_file_in_list(image_folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ghost.png"):
        load_images([image_folder / "a.png", image_folder / "ghost.png"], SMALL)


def test_csv_missing_columns(image_folder: Path) -> None:
    csv_path = _write_csv(
        image_folder.parent / "bad.csv", [{"file": "images/a.png", "label": 1}], ["file", "label"]
    )
    with pytest.raises(ValueError, match=r"bad\.csv.*class_index"):
        load_images(csv_path)


def test_csv_rows_with_missing_files(image_folder: Path) -> None:
    names = ["a.png", "x1.png", "x2.png"]
    rows = [{"file": f"images/{name}", "class_index": i} for i, name in enumerate(names)]
    csv_path = _write_csv(image_folder.parent / "labels.csv", rows, ["file", "class_index"])
    with pytest.raises(FileNotFoundError) as info:
        load_images(csv_path, SMALL)
    message = str(info.value)
    assert "x1.png" in message and "x2.png" in message and "labels.csv" in message
    assert "a.png" not in message


def test_csv_non_integer_class_index(image_folder: Path) -> None:
    rows = [{"file": "images/a.png", "class_index": 1}, {"file": "images/b.JPG", "class_index": "cat"}]
    csv_path = _write_csv(image_folder.parent / "labels.csv", rows, ["file", "class_index"])
    with pytest.raises(ValueError, match=r"labels\.csv, row 3: class_index must be an integer, got 'cat'"):
        load_images(csv_path, SMALL)


def test_unsupported_source_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        load_images(path)
