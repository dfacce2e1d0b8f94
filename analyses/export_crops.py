"""Write the 256-pixel evaluation crops of the ImageNet sample as JPEG (quality 95), small enough to
carry to the GPU machine (the originals are 107 MB; the device takes 64 MiB a call).

    python analyses/export_crops.py --out .carry/crops256 [--size 256] [--quality 95]

analyses/fixes.py loads images at the model's crop + 32 (resize and crop): for lite1 (crop 240) and
lite2 (crop 260) export ``--size 272`` and ``--size 292`` (quality 90 keeps a model's weights and its
crops within one device call's 64 MiB).

Each image is resized (shorter side ``size``, bilinear, as aliasscope's bundled models preprocess) and
centre-cropped to ``size`` x ``size``; labels.csv is copied with the new file names. Loading the crops
with ``Preprocess(resize=size, crop=size)`` is then the identity resize, and the centre 224 crop of
them is the standard evaluation input (up to JPEG rounding).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="../shared/data/imagenet-sample/labels.csv")
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (95)")
    args = parser.parse_args()
    src = Path(args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(src.open()))
    for row in rows:
        img = Image.open(src.parent / row["file"]).convert("RGB")
        w, h = img.size
        scale = args.size / min(w, h)
        img = img.resize((max(args.size, round(w * scale)), max(args.size, round(h * scale))), Image.BILINEAR)
        left, top = (img.width - args.size) // 2, (img.height - args.size) // 2
        name = Path(row["file"]).with_suffix(".jpg").name
        img.crop((left, top, left + args.size, top + args.size)).save(out / name, quality=args.quality)
        row["file"] = name
    with (out / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} crops of {args.size}x{args.size} to {out}")


if __name__ == "__main__":
    main()
