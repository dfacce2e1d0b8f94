"""The HTML report of ``aliasscope diagnose``: one self-contained file (figures embedded as PNG data
URIs, no scripts or styles fetched from anywhere) built from the run's ``summary.json`` content.

The report is a view of the summary: it computes nothing but the plain-language reading of the
numbers (which ops dominate, which fix targets them).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

__all__ = ["FIX_FOR_KIND", "advice", "render_report", "write_report"]

FIX_FOR_KIND: dict[str, tuple[str, str]] = {
    "nonlinearity": (
        "filtered_activation",
        "evaluate the nonlinearity at 2x resolution between band-limited up- and downsampling "
        "(aliasscope fix --fix filtered_activation)",
    ),
    "downsampling": (
        "blurpool",
        "blur before subsampling (aliasscope fix --fix blurpool), or adaptive polyphase sampling "
        "(--fix polyphase, exact for circular shifts with --fix circular_padding+polyphase)",
    ),
    "pooling": ("blurpool", "replace strided pooling by blur-pooling (aliasscope fix --fix blurpool)"),
    "linear": (
        "circular_padding",
        "a stride-1 convolution breaks equivariance only at the image border (zero padding) or where the "
        "generator's stencil does: try --fix circular_padding, or compare --generator fourier",
    ),
    "patch_embed": (
        "blurpool",
        "the patch embedding is a stride-p convolution: it aliases whatever the image has above the "
        "patch Nyquist frequency; a blur before it (or training with shifts) helps",
    ),
    "position_embed": (
        "",
        "a learned position embedding is not translation equivariant by construction; only retraining "
        "with relative or smooth position codes removes it",
    ),
    "attention": (
        "",
        "attention mixes tokens by content, which commutes with integer token shifts; its share comes "
        "from sub-token shifts between patches",
    ),
    "normalisation": (
        "filtered_activation",
        "a LayerNorm over channels acts per pixel like a nonlinearity: --fix filtered_activation wraps it",
    ),
}
"""Per op kind: the fix to try first and why (used by :func:`advice`)."""


def advice(summary: dict[str, Any], transform: str | None = None, top: int = 3) -> list[str]:
    """Plain-language sentences: the ``top`` ops with the largest share of the Lie derivative under
    ``transform`` (default: the first attributed one), the dominant kind, and the fix to try."""
    layer = summary.get("layerwise") or {}
    if not layer:
        return ["No layer attribution in this run (use --layerwise)."]
    transform = transform or next(iter(layer))
    part = layer[transform]
    kinds = sorted(part["by_kind"].items(), key=lambda kv: -kv[1]["share"])
    lines = []
    ops = part["top"][:top]
    names = ", ".join(
        f"<code>{html.escape(r['name'])}</code> ({r['kind']}, {100 * r['share']:.1f}%)" for r in ops
    )
    lines.append(
        f"Under {transform.replace('_', ' ')}, the {len(ops)} ops with the largest share of the Lie "
        f"derivative are {names}; together {100 * sum(r['share'] for r in ops):.0f}% of it."
    )
    if kinds:
        kind, row = kinds[0]
        lines.append(
            f"By kind, <b>{kind}</b> ops carry {100 * row['share']:.0f}% ({row['ops']} ops)"
            + (
                f", then {kinds[1][0]} with {100 * kinds[1][1]['share']:.0f}%."
                if len(kinds) > 1 and kinds[1][1]["share"] > 0
                else "."
            )
        )
        seen = set()
        for kind, row in kinds[:2]:
            fix = FIX_FOR_KIND.get(kind)
            if fix is None or kind in seen or row["share"] < 0.05:
                continue
            seen.add(kind)
            lines.append(f"For the {kind} ops: {fix[1]}.")
    sp = summary.get("spectral")
    if sp and sp.get("join", {}).get("spearman_rho") is not None:
        rho = sp["join"]["spearman_rho"]
        lines.append(
            f"Across {sp['join']['ops']} ops the rank correlation of alias energy with the share is "
            f"{rho:.2f} (p = {sp['join']['p_value']:.2g}): "
            + (
                "aliasing tracks where the Lie derivative comes from."
                if rho > 0.3 and sp["join"]["p_value"] < 0.05
                else "in this model the ops that alias most are not the ones that carry most of the Lie "
                "derivative, so look at borders and strides as well as nonlinearities."
            )
        )
    lines.append(
        "Measured on pretrained EfficientNet-Lite0/1/2 (README): without fine-tuning, every fix but "
        "polyphase costs more than 2 points of top-1; filtered activations lower the Lie derivative by "
        "31-44% and keep it lower after a short distillation."
    )
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "&ndash;"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k, _ in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="figure" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right} th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
img.figure{max-width:100%;border:1px solid #eee;margin:.5em 0} .ok{color:#2a7d2a} .bad{color:#b22}
.summary{background:#f7f9fc;border-left:4px solid #4c72b0;padding:.6em 1em} code{font-size:.95em}
.caption{color:#555;font-size:.92em;margin-top:-.2em}
"""

# after load: every <img> must have decoded (naturalWidth > 0); the verdict goes into the page title
# and a data attribute, so that a headless browser's --dump-dom shows it
_CHECK = """
<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var broken = Array.prototype.filter.call(imgs, function (i) {
    return !(i.complete && i.naturalWidth > 0);
  });
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-broken-images', broken.length);
});
</script>
"""

_SETTINGS = ("model", "pretrained", "images", "num_images", "preprocess", "generator", "device", "dtype")
_SETTINGS += ("seed", "target")

FIGURE_CAPTIONS: dict[str, str] = {
    "attribution": "Layer attribution: each op's share of the Lie derivative in call order, coloured by op "
    "kind, stages marked; the black line is the cumulative share. Right: shares by kind per transform. "
    "Tall early bars mean the model breaks equivariance early; a staircase in the cumulative line shows "
    "which stages matter.",
    "transforms": "End-to-end Lie derivative per transform (mean over images, 95% interval, log scale): "
    "which symmetries the model breaks most.",
    "spectral": "Left: alias energy per op along depth (circles: pointwise ops measured at higher "
    "resolution; squares: energy that folds back at a stride). Right: radial power spectra of the op "
    "outputs; power right of the dashed Nyquist line is what a subsampling would alias.",
    "alias_vs_attribution": "One point per op: alias energy against its share of the Lie derivative. "
    "If aliasing explains the equivariance error, points rise to the right (positive rank correlation).",
    "where": "Where in the image the top ops' contributions sit: per-pixel contribution maps summed over "
    "channels, upsampled to the photo (red positive, blue negative). Bright borders point to padding; "
    "edges and textures point to aliasing.",
}


def render_report(
    summary: dict[str, Any], figures: dict[str, str | Path], files: list[str] | None = None
) -> str:
    """The report as one HTML string: summary, figures (embedded), tables and settings; ``files``: the
    other files of the output folder, named at the end (default: those ``aliasscope diagnose`` can write)."""
    provenance = summary.get("provenance") or {}
    weights = provenance.get("weights") or ("pretrained" if summary.get("pretrained") else "random-init")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>aliasscope report: {html.escape(str(summary.get('model')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>aliasscope: where <code>{html.escape(str(summary.get('model')))}</code> "
        "breaks its symmetries</h1>",
        f"<p>Weights: {html.escape(str(weights))}; "
        f"{summary.get('num_images')} "
        f"images from {html.escape(str(summary.get('images')))}; {summary.get('generator')} generator; "
        f"device {summary.get('device')}; {summary.get('seconds')} s.",
    ]
    if summary.get("top1") is not None:
        parts.append(f" Top-1 accuracy on the labelled images: {100 * summary['top1']:.1f}%.")
    parts.append("</p><h2>Summary</h2><div class='summary'>")
    parts += [f"<p>{line}</p>" for line in advice(summary)]
    parts.append("</div>")

    order = ["transforms", "attribution", "where", "spectral", "alias_vs_attribution"]
    titles = {
        "transforms": "End-to-end Lie derivative per transform",
        "attribution": "Layer attribution",
        "where": "Where in the image",
        "spectral": "Aliasing energy per op",
        "alias_vs_attribution": "Alias energy vs attribution",
    }
    for key in order + [k for k in figures if k not in order]:
        if key not in figures:
            continue
        parts.append(f"<h2>{titles.get(key, key)}</h2>")
        parts.append(_image(Path(figures[key]), titles.get(key, key)))
        if key in FIGURE_CAPTIONS:
            parts.append(f"<p class='caption'>{FIGURE_CAPTIONS[key]}</p>")
        if key == "transforms" and summary.get("intervals"):
            rows = [
                {"transform": t, "mean": v[0], "low": v[1], "high": v[2]}
                for t, v in summary["intervals"].items()
            ]
            columns = [
                ("transform", "transform"),
                ("mean", "mean |L_X softmax|"),
                ("low", "95% low"),
                ("high", "95% high"),
            ]
            parts.append(_table(rows, columns))
        if key == "attribution":
            parts.append(_layer_tables(summary))
        if key == "spectral" and summary.get("spectral"):
            parts.append(_spectral_tables(summary["spectral"]))

    parts.append("<h2>Settings and versions</h2>")
    settings = {k: summary[k] for k in _SETTINGS if k in summary}
    if "weights" in provenance:
        settings["weights"] = provenance["weights"]
    settings.update({f"version {k}": v for k, v in summary.get("versions", {}).items()})
    rows = [{"setting": k, "value": str(v)} for k, v in settings.items()]
    parts.append(_table(rows, [("setting", "setting"), ("value", "value")]))
    if files is None:
        parts.append(
            "<p class='caption'>Files next to this report: summary.json, metrics.csv (per image and "
            "transform), layers.csv (per op and transform), spectral.csv (per op), figures/*.png|svg.</p>"
        )
    else:
        others = [f for f in files if f != "report.html" and "/" not in f]
        folders = sorted({f.split("/", 1)[0] + "/" for f in files if "/" in f})
        names = ", ".join(html.escape(f) for f in others + folders)
        parts.append(f"<p class='caption'>Files next to this report: {names or 'none'}.</p>")
    parts.append(_CHECK)
    parts.append("</body></html>")
    return "\n".join(parts)


def _layer_tables(summary: dict[str, Any]) -> str:
    layer = summary.get("layerwise") or {}
    if not layer:
        return ""
    out = ["<h3>Completeness check</h3>"]
    rows = []
    for t, part in layer.items():
        err = part["completeness_error"]
        ok = err == err and err < 1e-4
        verdict = "exact" if ok else "CHECK"
        rows.append({"transform": t, "ops": part["num_ops"], "error": err, "verdict": verdict})
    out.append(
        "<p class='caption'>The per-op contributions must add up to the end-to-end Lie derivative, "
        "computed separately: relative error ||total &minus; &Sigma; ops|| / ||total||.</p>"
    )
    columns = [("transform", "transform"), ("ops", "ops"), ("error", "relative error"), ("verdict", "")]
    out.append(_table(rows, columns))
    kinds = list(dict.fromkeys(k for part in layer.values() for k in part["by_kind"]))
    by_kind = [
        {"kind": k, **{t: 100 * part["by_kind"].get(k, {}).get("share", 0.0) for t, part in layer.items()}}
        for k in kinds
    ]
    out.append("<h3>Share by op kind (%)</h3>")
    out.append(_table(by_kind, [("kind", "kind")] + [(t, t) for t in layer]))
    first = next(iter(layer))
    out.append(f"<h3>Top ops under {html.escape(first)}</h3>")
    top = [{**r, "share": 100 * r["share"]} for r in layer[first]["top"]]
    columns = [
        ("order", "#"),
        ("name", "op"),
        ("kind", "kind"),
        ("shape", "shape"),
        ("share", "share %"),
        ("mean", "mean contribution"),
    ]
    out.append(_table(top, columns))
    return "\n".join(out)


def _spectral_tables(sp: dict[str, Any]) -> str:
    rows = [
        {"kind": k, **r}
        for k, r in sp.get("by_kind", {}).items()
        if any(v == v for m, v in r.items() if m != "ops")
    ]
    out = [
        f"<h3>Alias energy by op kind (mean over ops; {sp.get('images')} images, "
        f"upsample {sp.get('upsample')})</h3>",
        _table(
            rows,
            [
                ("kind", "kind"),
                ("ops", "ops"),
                ("alias_ratio", "alias ratio (pointwise)"),
                ("aliasing_error", "aliasing error"),
                ("stride_alias", "stride alias"),
                ("hf_fraction", "energy > Nyquist/2"),
            ],
        ),
    ]
    if sp.get("top"):
        out.append("<h3>Ops with the most alias energy</h3>")
        columns = [("name", "op"), ("kind", "kind"), ("alias", "alias energy"), ("lie_share", "Lie share")]
        out.append(_table(sp["top"], columns))
    conv = sp.get("convergence") or {}
    if conv:
        text = "; ".join(f"{k.replace('_', ' ')} = {v:.3g}" for k, v in conv.items())
        out.append(f"<p class='caption'>Convergence in the upsampling factor: {html.escape(text)}.</p>")
    return "\n".join(out)


def write_report(
    path: str | Path,
    summary: dict[str, Any],
    figures: dict[str, str | Path],
    files: list[str] | None = None,
) -> Path:
    """Write :func:`render_report` to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(summary, figures, files), encoding="utf-8")
    return path
