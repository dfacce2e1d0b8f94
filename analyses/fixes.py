"""Every anti-aliasing fix on a pretrained model, before/after, on real labelled images; where a fix
costs more than 2 points of top-1, a short repair: BatchNorm statistics re-estimated and the fixed
model distilled towards the original on the other half of the images.

    python analyses/fixes.py --model tf_efficientnet_lite0 \\
        --images ../shared/data/imagenet-sample/labels.csv
        --out figures/fixes_lite0 [--device cuda] [--steps 300]

Images are loaded at the model's crop + 32 (256 for lite0) so that shift consistency can use crops at
offsets in [0, 32)^2. Writes comparison.csv/json/png/svg and changes.csv (all images, no repair) and
repaired.csv/json (held-out odd-indexed images; repair on the even-indexed ones).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from aliasscope import compare, load_images, load_model
from aliasscope.fixes import apply_fixes, changes
from aliasscope.results import rows_to_csv

VARIANTS = [
    ["blurpool"],
    ["filtered_activation"],
    ["circular_padding"],
    ["polyphase"],
    ["circular_padding", "polyphase"],
]
TRANSFORMS = ["translate_x", "translate_y", "rotate", "scale"]


def _augment(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random crops (offsets in [0, 32)^2) and horizontal flips of wide images."""
    span = x.shape[-1] - size + 1
    out = []
    for img in x:
        top, left = (int(v) for v in torch.randint(0, span, (2,), generator=gen))
        crop = img[:, top : top + size, left : left + size]
        out.append(crop.flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else crop)
    return torch.stack(out)


def repair(
    student: torch.nn.Module, teacher: torch.nn.Module, wide: torch.Tensor, size: int, steps: int
) -> dict:
    """Re-estimate BatchNorm statistics on augmented crops, then distil (KL to the teacher's softmax,
    Adam 1e-4, batch 32, BN frozen) for ``steps`` steps."""
    gen = torch.Generator().manual_seed(0)
    device = next(student.parameters()).device
    bns = [m for m in student.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    student.train()
    with torch.no_grad():
        for _ in range(4):
            for s in range(0, wide.shape[0], 64):
                student(_augment(wide[s : s + 64], size, gen).to(device))
    student.eval()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, wide.shape[0], (32,), generator=gen)
        x = _augment(wide[idx], size, gen).to(device)
        with torch.no_grad():
            target = F.log_softmax(teacher(x), -1)
        loss = F.kl_div(F.log_softmax(student(x), -1), target, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"    step {step}: KL {loss.item():.4f}", flush=True)
    return {
        "steps": steps,
        "kl_first": losses[0] if losses else None,
        "kl_last": sum(losses[-20:]) / max(len(losses[-20:]), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--images", default="../shared/data/imagenet-sample/labels.csv")
    parser.add_argument("--out", default="figures/fixes_lite0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--steps", type=int, default=300, help="distillation steps of a repair (0: none)")
    parser.add_argument("--layer-images", type=int, default=32)
    parser.add_argument("--spectral-images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, device {args.device}")
    start = time.perf_counter()
    model, pre = load_model(args.model, device=args.device)
    size = pre.crop
    wide_pre = replace(pre, resize=size + 32, crop=size + 32)
    batch = load_images(args.images, wide_pre, limit=args.num_images)
    images, labels = batch.images, batch.labels
    example = images[:1, :, 16:-16, 16:-16].to(args.device)
    models = {"original": model}
    for chain in VARIANTS:
        models["+".join(chain)] = apply_fixes(model, chain, example=example)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = compare(
        models,
        images.to(args.device),
        labels,
        TRANSFORMS,
        crop=size,
        layer_images=args.layer_images,
        spectral_images=args.spectral_images,
        batch_size=args.batch_size,
    )
    result.settings.update(model=args.model, images_source=args.images, preprocess=repr(wide_pre))
    result.to_csv(out / "comparison.csv")
    result.to_json(out / "comparison.json")
    result.plot(out / "comparison")
    rows_to_csv(
        [{"variant": n, **c.as_dict()} for n, m in models.items() for c in changes(m)], out / "changes.csv"
    )
    print(result.summary(), flush=True)

    # repair the variants that lose more than 2 points: fit on even-indexed images, test on odd ones
    base = result.rows[0]["top1"]
    broken = [r["model"] for r in result.rows[1:] if base - r["top1"] > 0.02]
    if broken and args.steps > 0:
        train, test = images[0::2], images[1::2]
        repaired = {"original": model}
        notes = {}
        for name in broken:
            print(f"repairing {name}", flush=True)
            student = copy.deepcopy(models[name])
            notes[name] = repair(student, model, train, size, args.steps)
            repaired[f"{name} (no repair)"] = models[name]
            repaired[f"{name} (repaired)"] = student
        held = compare(
            repaired,
            test.to(args.device),
            labels[1::2],
            TRANSFORMS,
            crop=size,
            layer_images=0,
            spectral_images=0,
            batch_size=args.batch_size,
        )
        held.settings.update(
            model=args.model, split="odd-indexed images; repaired on the even-indexed", repair=notes
        )
        held.to_csv(out / "repaired.csv")
        held.to_json(out / "repaired.json")
        held.plot(out / "repaired")
        print(held.summary())
    (out / "run.json").write_text(
        json.dumps({"seconds": round(time.perf_counter() - start, 1), "device": args.device})
    )
    print(f"done in {time.perf_counter() - start:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
