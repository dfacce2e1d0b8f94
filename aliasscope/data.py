"""Load real images (and optional ImageNet labels) into a preprocessed batch.

Sources: the photos bundled with scikit-image (default), a folder, a list of files, a single
image file, or a CSV file with ``file`` and ``class_index`` columns.

Examples
--------
>>> batch = load_images()  # doctest: +SKIP
>>> batch.images.shape  # doctest: +SKIP
torch.Size([6, 3, 224, 224])
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .models import Preprocess, to_rgb

__all__ = [
    "DEFAULT_PHOTOS",
    "IMAGE_EXTENSIONS",
    "ImageBatch",
    "default_preprocess",
    "list_images",
    "load_images",
    "read_image",
    "read_labels_csv",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""File extensions (matched case-insensitively) picked up when loading a folder."""

DEFAULT_PHOTOS: tuple[str, ...] = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
)
"""Real photos shipped inside ``skimage.data.data_dir`` (no download needed)."""

PathLike = str | os.PathLike[str]
Source = PathLike | Sequence[PathLike] | None
Transform = Callable[[Image.Image], torch.Tensor]
_Entry = tuple[Path, int | None]
_MAX_NAMED = 5


@dataclass
class ImageBatch:
    """A batch of preprocessed images with their source files and optional labels.

    Parameters
    ----------
    images : torch.Tensor
        Float tensor of shape ``(B, 3, H, W)``.
    labels : torch.Tensor or None
        Long tensor of shape ``(B,)`` (class indices), or ``None`` when unlabelled.
    files : list of str
        Source file of each image.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    files: list[str]

    def __post_init__(self) -> None:
        """Check that images, labels and files agree in length."""
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(self.images.shape)}")
        if self.images.shape[0] != len(self.files):
            raise ValueError(f"{self.images.shape[0]} images but {len(self.files)} files")
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels, dtype=torch.long)
            if self.labels.shape != (len(self.files),):
                shape = tuple(self.labels.shape)
                raise ValueError(f"labels must have shape ({len(self.files)},), got {shape}")

    def __len__(self) -> int:
        """Number of images."""
        return len(self.files)

    def to(self, device: str | torch.device) -> ImageBatch:
        """Return a copy with images and labels on ``device``."""
        labels = None if self.labels is None else self.labels.to(device)
        return ImageBatch(self.images.to(device), labels, list(self.files))

    def subset(self, indices: Sequence[int] | slice | torch.Tensor) -> ImageBatch:
        """Return the images selected by ``indices`` (a sequence of ints, a slice or an index tensor)."""
        if isinstance(indices, slice):
            index = torch.arange(len(self))[indices]
        else:
            index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        positions = index.tolist()
        files = [self.files[i] for i in positions]
        labels = None if self.labels is None else self.labels[index.to(self.labels.device)]
        return ImageBatch(self.images[index.to(self.images.device)], labels, files)


def default_preprocess() -> Preprocess:
    """Resize 256, center crop 224, no normalisation: pixels in [0, 1]."""
    return Preprocess(resize=256, crop=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _name_paths(paths: Sequence[Path]) -> str:
    """Readable list of the first few paths."""
    named = ", ".join(str(p) for p in paths[:_MAX_NAMED])
    more = f" (and {len(paths) - _MAX_NAMED} more)" if len(paths) > _MAX_NAMED else ""
    return named + more


def _require_files(paths: Sequence[Path], what: str) -> None:
    """Raise FileNotFoundError naming the first few of ``paths`` that are not files."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {what} not found: {_name_paths(missing)}")


def list_images(folder: PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name.

    Parameters
    ----------
    folder : str or os.PathLike
        Directory to scan (not recursive; hidden files are skipped).

    Returns
    -------
    list of pathlib.Path
        Files whose extension is in :data:`IMAGE_EXTENSIONS` (any case).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {folder}")
    return files


def _parse_class_index(value: str | None, row: int, csv_path: Path) -> int:
    """Parse one ``class_index`` cell as an integer."""
    try:
        return int((value or "").strip())
    except ValueError:
        raise ValueError(f"{csv_path}, row {row}: class_index must be an integer, got {value!r}") from None


def read_labels_csv(csv_path: PathLike) -> list[_Entry]:
    """Read ``(file, class_index)`` rows from a CSV file.

    Parameters
    ----------
    csv_path : str or os.PathLike
        CSV with a header containing ``file`` and ``class_index`` (other columns are ignored).
        Relative file paths are resolved against the CSV's folder.

    Returns
    -------
    list of (pathlib.Path, int)
        Image paths and class indices, in file order. File existence is not checked here.
    """
    csv_path = Path(csv_path)
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("file", "class_index") if c not in columns]
        if missing:
            raise ValueError(f"{csv_path} lacks column(s) {missing}; found columns {columns}")
        reader.fieldnames = columns
        entries = []
        for row_number, row in enumerate(reader, start=2):
            name = (row["file"] or "").strip()
            if not name:
                raise ValueError(f"{csv_path}, row {row_number}: empty 'file' cell")
            label = _parse_class_index(row["class_index"], row_number, csv_path)
            entries.append((csv_path.parent / name, label))
    if not entries:
        raise ValueError(f"{csv_path} has a header but no rows")
    return entries


def _entries_from_source(source: Source) -> list[_Entry]:
    """Resolve a ``load_images`` source into ``(path, label)`` entries (labels may be None)."""
    if source is None:
        import skimage.data

        return [(Path(skimage.data.data_dir) / name, None) for name in DEFAULT_PHOTOS]
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"image source not found: {path}")
        if path.is_dir():
            return [(p, None) for p in list_images(path)]
        if path.suffix.lower() == ".csv":
            return read_labels_csv(path)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return [(path, None)]
        raise ValueError(f"unsupported source {path}: expected a folder, a .csv file or an image file")
    entries = [(Path(p), None) for p in source]
    if not entries:
        raise ValueError("empty list of image files")
    return entries


def read_image(path: PathLike) -> Image.Image:
    """Open an image file with PIL, fully decoded and converted to RGB.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a readable image (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image file {path}: {exc}") from exc


def _describe_files(source: Source) -> str:
    """How to refer to the image files of ``source`` in error messages."""
    if isinstance(source, str | os.PathLike) and Path(source).suffix.lower() == ".csv":
        return f"image file(s) listed in {source}"
    return "image file(s)"


def _select(entries: list[_Entry], every: int, limit: int | None) -> list[_Entry]:
    """Keep every ``every``-th entry, then at most ``limit`` of them."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    return entries[::every][:limit]


def _stack(tensors: list[torch.Tensor], files: list[Path]) -> torch.Tensor:
    """Stack per-image tensors, naming the first file whose shape differs."""
    for tensor, path in zip(tensors, files, strict=True):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != tensors[0].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"preprocess returned {shape} for {path} but {tuple(tensors[0].shape)} for {files[0]}; "
                "it must return tensors of one shape"
            )
    return torch.stack(tensors).float()


def load_images(
    source: Source = None,
    preprocess: Transform | None = None,
    *,
    limit: int | None = None,
    every: int = 1,
) -> ImageBatch:
    """Load and preprocess images into an :class:`ImageBatch`.

    Parameters
    ----------
    source : str, os.PathLike, sequence of paths, or None
        ``None``: the scikit-image photos in :data:`DEFAULT_PHOTOS`. A folder: all image files in
        it, sorted. A ``.csv`` file: columns ``file`` and ``class_index`` give files (relative to
        the CSV's folder, or absolute) and labels. A single image file, or a list of files.
    preprocess : callable, optional
        PIL image -> tensor ``(3, H, W)``, e.g. the :class:`~aliasscope.models.Preprocess` returned
        by :func:`~aliasscope.models.load_model`. Default: :func:`default_preprocess` ([0, 1] pixels).
    limit : int, optional
        Maximum number of images (applied after ``every``).
    every : int
        Keep every ``every``-th image (in sorted / CSV order), starting with the first.

    Returns
    -------
    ImageBatch
        Images ``(B, 3, H, W)``, labels (CSV sources only, else ``None``) and file names.

    Raises
    ------
    FileNotFoundError
        The source, or a listed / CSV-referenced file, does not exist (paths named).
    ValueError
        Empty folder, unreadable image, malformed CSV, or bad ``every`` / ``limit``.
    """
    entries = _select(_entries_from_source(source), every, limit)
    paths = [path for path, _ in entries]
    _require_files(paths, _describe_files(source))
    transform = preprocess if preprocess is not None else default_preprocess()
    images = _stack([transform(read_image(path)) for path in paths], paths)
    labels = [label for _, label in entries]
    label_tensor = None if any(label is None for label in labels) else torch.tensor(labels, dtype=torch.long)
    return ImageBatch(images=images, labels=label_tensor, files=[str(p) for p in paths])
