"""The HTML report of ``aliasscope diagnose``: one self-contained file (figures embedded as PNG data
URIs, the per-image table as a CSV data URI; no scripts or styles fetched from anywhere) built from the
run's ``summary.json`` content.

The report is a view of the summary: it computes nothing but the plain-language reading of the
numbers (which ops dominate, which fix targets them, whether the spectral measure converged). When the
run's self-checks failed (``summary["checks"]["passed"]`` False) it shows the failures instead of any
ranking or advice.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

from .kinds import FIX_FOR_KIND
from .results import rows_to_csv

__all__ = [
    "CONVERGENCE_TOLERANCE",
    "FIX_FOR_KIND",
    "SHARE_DEFINITION",
    "SHARE_SHORT",
    "advice",
    "check_failures",
    "convergence_verdict",
    "per_image_rows",
    "render_report",
    "write_report",
]

SHARE_DEFINITION = (
    "share = an op's fraction of the summed |contribution| over all ops and images "
    "(sum over images of |c_op| / sum over ops and images of |c|); the sign is lost: contributions of "
    "opposite sign, which cancel in the total, both count"
)
"""What "share" means wherever the report, the figures and the text summary show one."""

SHARE_SHORT = "share = the op's fraction of the summed |contribution| over all ops and images; sign lost"
""":data:`SHARE_DEFINITION` in a few words, for table captions."""

_SHARE_HTML = html.escape(SHARE_DEFINITION, quote=False)
_SHORT_HTML = html.escape(SHARE_SHORT, quote=False)

CONVERGENCE_TOLERANCE = 0.10
"""The spectral measure counts as converged when no op's alias ratio changes by this much (relative)
between the two upsampling factors compared."""


def check_failures(summary: dict[str, Any]) -> list[str] | None:
    """The self-check failures of a run: None when its checks passed (or the summary has none, as
    older summaries do), else the list of failures (never empty)."""
    checks = summary.get("checks")
    if not isinstance(checks, dict) or checks.get("passed", True):
        return None
    return [str(f) for f in checks.get("failures") or []] or ["a self-check failed (no detail given)"]


def _is_lite(model: Any) -> bool:
    return bool(re.search(r"efficientnet_lite", str(model)))


def advice(summary: dict[str, Any], transform: str | None = None, top: int = 3) -> list[str]:
    """Plain-language sentences: the ``top`` ops with the largest share of the Lie derivative under
    ``transform`` (default: the first attributed one; the other transforms' top ops in one sentence
    each), the dominant kind, and the fix to try. Empty when the run's self-checks failed: its numbers
    are not a finding, so nothing is ranked or advised."""
    if check_failures(summary) is not None:
        return []
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
        f"Under {transform.replace('_', ' ')}, the {len(ops)} of {part['num_ops']} ops with the largest "
        f"share of the Lie derivative are {names}; together {100 * sum(r['share'] for r in ops):.0f}% of "
        "it."
    )
    lines.append(f"({_SHARE_HTML[0].upper() + _SHARE_HTML[1:]}.)")
    for other, p in layer.items():
        if other == transform or not p.get("top"):
            continue
        listed = ", ".join(
            f"<code>{html.escape(r['name'])}</code> ({100 * r['share']:.1f}%)" for r in p["top"][:top]
        )
        lines.append(f"Under {other.replace('_', ' ')}: {listed}.")
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
    if _is_lite(summary.get("model")):
        lines.append(
            "Measured on pretrained EfficientNet-Lite0/1/2 (README): without fine-tuning, every fix but "
            "polyphase costs more than 2 points of top-1; filtered activations lower the Lie derivative by "
            "31-44% and keep it lower after a short distillation."
        )
    else:
        lines.append(
            "Any fix changes the model: measure what it costs before adopting it (aliasscope fix compares "
            "top-1, shift consistency and the Lie derivative before and after)."
        )
    return lines


_KEY = re.compile(r"max_rel_change_s(\d+)_vs_s(\d+)$")


def convergence_verdict(
    convergence: dict[str, float] | None, tolerance: float = CONVERGENCE_TOLERANCE
) -> tuple[bool | None, str]:
    """A plain verdict on the spectral measure's convergence in the upsampling factor, from
    ``summary["spectral"]["convergence"]`` (:meth:`aliasscope.spectrum.Spectrum.convergence_summary`):
    ``(True, "converged: ...")``, ``(False, "NOT converged: ... raise --upsample ...")``, or
    ``(None, ...)`` when it was not checked. With a factor above ``--upsample`` measured, that
    comparison decides (it tests the factor used); otherwise the largest factor below it."""
    found = []
    for key, value in (convergence or {}).items():
        m = _KEY.match(key)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), value))
    if not found:
        return None, (
            "Convergence in the upsampling factor not checked (run with --convergence S, e.g. 2 or 8)."
        )
    above = [f for f in found if f[0] > f[1]]
    f, u, value = max(above) if above else max(found)
    lo, hi = sorted((f, u))
    if value is None or value != value:
        return None, f"Convergence not measured: no op has an alias ratio to compare at s={lo} and s={hi}."

    def pct(v: float) -> str:  # two decimals where one would print the tolerance itself
        text = f"{100 * v:.1f}"
        return f"{100 * v:.2f}%" if float(text) == round(100 * tolerance, 1) else f"{text}%"

    text = f"the largest relative change of any op's alias ratio between s={lo} and s={hi} is {pct(value)}"
    others = [g for g in found if g[:2] != (f, u) and g[2] == g[2] and g[2] is not None]
    also = "".join(f"; s={min(a, b)} vs s={max(a, b)}: {pct(v)}" for a, b, v in sorted(others))
    if value < tolerance:
        return True, f"converged: {text} (< {100 * tolerance:.0f}%){also}."
    suggest = f"--upsample {2 * hi} --convergence {hi}" if f < u else f"--upsample {hi}"
    return False, (
        f"NOT converged: {text} (>= {100 * tolerance:.0f}%){also}: raise --upsample (e.g. {suggest})."
    )


def per_image_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per image: index, file, predicted class and its probability, label and whether it was
    predicted (when the images are labelled), and each transform's end-to-end Lie derivative (mean over
    classes of |L_X softmax|), from ``summary["metrics"]`` and ``summary["predictions"]``."""
    metrics = summary.get("metrics") or {}
    per = metrics.get("per_image") or {}
    files = metrics.get("files") or []
    pred = summary.get("predictions") or {}
    classes, probs, labels = (pred.get(k) for k in ("predicted_class", "probability", "label"))
    n = max([len(v) for v in per.values()] + [len(files), len(classes or [])])
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"image": i, "file": files[i] if i < len(files) else ""}
        if classes is not None:
            row["predicted_class"] = classes[i]
            row["predicted_probability"] = f"{probs[i]:.6g}" if probs else ""
        if labels is not None:
            row["label"] = labels[i]
            row["correct"] = int(classes is not None and classes[i] == labels[i])
        for t, values in per.items():
            v = values[i] if i < len(values) else None
            row[t] = "" if v is None else f"{v:.9g}"
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "&ndash;"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)

    def cell(v: Any) -> str:  # text left, numbers right
        return f"<td class='t'>{_fmt(v)}</td>" if isinstance(v, str) else f"<td>{_fmt(v)}</td>"

    body = "".join("<tr>" + "".join(cell(r.get(k)) for k, _ in columns) + "</tr>" for r in rows)
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
.caption{color:#555;font-size:.92em;margin-top:-.2em} td.t{text-align:left}
.failed{background:#fdecec;border:2px solid #b22;color:#7a1010;padding:.6em 1em;margin:1em 0}
.failed h2{color:#b22;border:none;margin:.2em 0}
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


def _caption(key: str, summary: dict[str, Any]) -> str:
    """The caption under figure ``key``: the registered figure's (:mod:`aliasscope.figures`), else
    none."""
    from .figures import figure_spec

    spec = figure_spec(key)
    return "" if spec is None else spec.caption(summary, key)


def _title(key: str) -> str:
    from .figures import figure_spec

    spec = figure_spec(key)
    return key if spec is None else spec.title_of(key)


def _failed_box(failures: list[str]) -> str:
    items = "".join(f"<li>{html.escape(f)}</li>" for f in failures)
    return (
        "<div class='failed' id='self-check-failed'><h2>Self-check failed: these numbers are not a "
        f"finding</h2><ul>{items}</ul><p>No ranking of ops and no advice is given for this run. The "
        "figures and tables below are shown only to diagnose the failure.</p></div>"
    )


def _per_image_link(summary: dict[str, Any]) -> str:
    rows = per_image_rows(summary)
    if not rows:
        return ""
    given = summary.get("provenance") or {}
    provenance = {k: v for k, v in given.items() if k not in ("versions", "command")}
    text = rows_to_csv(rows, constant_columns=provenance)  # the same columns as per_image.csv
    data = base64.b64encode(text.encode("utf-8")).decode("ascii")
    return (
        "<p>Per-image values and predictions: <a id='per-image-csv' download='per_image.csv' "
        f"href='data:text/csv;charset=utf-8;base64,{data}'>per_image.csv</a> ({len(rows)} rows: file, "
        "predicted class and probability, label when given, and each transform's Lie derivative).</p>"
    )


def render_report(
    summary: dict[str, Any], figures: dict[str, str | Path], files: list[str] | None = None
) -> str:
    """The report as one HTML string: self-check verdict, summary, figures (embedded), tables and
    settings; ``files``: the other files of the output folder, named at the end (default: those
    ``aliasscope diagnose`` can write). A failed self-check puts a red box with the failures at the
    top and leaves out the ranking tables, the advice and the plain-language summary of top offenders."""
    failures = check_failures(summary)
    provenance = summary.get("provenance") or {}
    weights = provenance.get("weights") or ("pretrained" if summary.get("pretrained") else "random-init")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>aliasscope report: {html.escape(str(summary.get('model')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>aliasscope: where <code>{html.escape(str(summary.get('model')))}</code> "
        "breaks its symmetries</h1>",
    ]
    if failures is not None:
        parts.append(_failed_box(failures))
    parts.append(
        f"<p>Weights: {html.escape(str(weights))}; "
        f"{summary.get('num_images')} "
        f"images from {html.escape(str(summary.get('images')))}; {summary.get('generator')} generator; "
        f"device {summary.get('device')}; {summary.get('seconds')} s."
    )
    if summary.get("top1") is not None:
        parts.append(f" Top-1 accuracy on the labelled images: {100 * summary['top1']:.1f}%.")
    if failures is None and isinstance(summary.get("checks"), dict):
        parts.append(" <span class='ok'>Self-checks passed.</span>")
    parts.append("</p><h2>Summary</h2><div class='summary'>")
    if failures is None:
        parts += [f"<p>{line}</p>" for line in advice(summary)]
    else:
        parts.append("<p class='bad'>Self-check failed: no ranking and no advice for this run.</p>")
    sp = summary.get("spectral")
    if sp:
        parts.append(f"<p>{_verdict_html(sp)}</p>")
    parts.append("</div>")

    from .figures import report_keys

    order = report_keys(summary)  # the figure registry's order (aliasscope.figures)
    placed_csv = False
    for key in order + [k for k in figures if k not in order]:
        if key not in figures:
            continue
        title = _title(key)
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(_image(Path(figures[key]), title))
        caption = _caption(key, summary)
        if caption:
            parts.append(f"<p class='caption'>{caption}</p>")
        if failures is not None and key != "transforms":
            parts.append("<p class='bad'>Self-check failed: shown for diagnosis, not a finding.</p>")
        if key == "transforms":
            if summary.get("intervals"):
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
            parts.append(_per_image_link(summary))
            placed_csv = True
        if key == "attribution":
            parts.append(_layer_tables(summary, failed=failures is not None))
        if key == "spectral" and sp:
            parts.append(_spectral_tables(sp, failed=failures is not None))
        if key == "convergence" and sp:
            parts.append(f"<p><b>{_verdict_html(sp)}</b></p>")
    if not placed_csv:
        parts.append(_per_image_link(summary))
    if "attribution" not in figures and summary.get("layerwise"):
        parts.append("<h2>Layer attribution</h2>" + _layer_tables(summary, failed=failures is not None))
    if "spectral" not in figures and sp:
        parts.append("<h2>Aliasing energy per op</h2>" + _spectral_tables(sp, failed=failures is not None))

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
            "transform), per_image.csv (per image: predictions and each transform's value), layers.csv "
            "(per op and transform), spectral.csv (per op), figures/*.png|svg.</p>"
        )
    else:
        others = [f for f in files if f != "report.html" and "/" not in f]
        folders = sorted({f.split("/", 1)[0] + "/" for f in files if "/" in f})
        names = ", ".join(html.escape(f) for f in others + folders)
        parts.append(f"<p class='caption'>Files next to this report: {names or 'none'}.</p>")
    parts.append(_CHECK)
    parts.append("</body></html>")
    return "\n".join(parts)


def _verdict_html(sp: dict[str, Any]) -> str:
    ok, text = convergence_verdict(sp.get("convergence"))
    cls = {True: "ok", False: "bad", None: ""}[ok]
    return f"<span class='{cls}' id='convergence-verdict'>Spectral convergence: {html.escape(text)}</span>"


def _layer_tables(summary: dict[str, Any], failed: bool = False) -> str:
    layer = summary.get("layerwise") or {}
    if not layer:
        return ""
    out = ["<h3>Completeness check</h3>"]
    rows = []
    for t, part in layer.items():
        err = part["completeness_error"]
        mass = part.get("completeness_error_mass", err)
        ok = mass == mass and mass < 1e-4
        verdict = "exact" if ok else "CHECK"
        row = {"transform": t, "ops": part["num_ops"], "error": err, "mass": mass, "verdict": verdict}
        rows.append(row)
    out.append(
        "<p class='caption'>The per-op contributions must add up to the end-to-end Lie derivative, "
        "computed separately: ||total &minus; &Sigma; ops|| relative to ||total||, and relative to "
        "max(||total||, ||&Sigma; |ops| ||), which stays meaningful when the total cancels (an invariant "
        "net); the verdict reads the second, as the self-check does.</p>"
    )
    columns = [("transform", "transform"), ("ops", "ops"), ("error", "of |total|")]
    columns += [("mass", "of Σ |c_i|"), ("verdict", "")]
    out.append(_table(rows, columns))
    if failed:
        out.append("<p class='bad'>Self-check failed: shares by kind and the Top ops ranking left out.</p>")
        return "\n".join(out)
    kinds = list(dict.fromkeys(k for part in layer.values() for k in part["by_kind"]))
    by_kind = [
        {"kind": k, **{t: 100 * part["by_kind"].get(k, {}).get("share", 0.0) for t, part in layer.items()}}
        for k in kinds
    ]
    out.append("<h3>Share by op kind (%)</h3>")
    out.append(f"<p class='caption'>A kind's share is the sum of its ops' shares ({_SHORT_HTML}).</p>")
    out.append(_table(by_kind, [("kind", "kind")] + [(t, t) for t in layer]))
    for t, part in layer.items():
        out.append(
            f"<h3>Top ops under {html.escape(t)} (top {len(part['top'])} of {part['num_ops']} ops)</h3>"
        )
        top = [{**r, "rank": i, "share": 100 * r["share"]} for i, r in enumerate(part["top"], start=1)]
        columns = [
            ("rank", "rank"),
            ("order", "order (call)"),
            ("name", "op"),
            ("kind", "kind"),
            ("shape", "shape"),
            ("share", "share %"),
            ("mean", "mean contribution"),
        ]
        out.append(_table(top, columns))
    out.append(
        "<p class='caption'>rank: by share (1 = largest); order (call): the op's position in the "
        "model's call order (column <code>order</code> of layers.csv); mean contribution: the signed "
        f"contribution averaged over images; {_SHORT_HTML}.</p>"
    )
    return "\n".join(out)


def _spectral_tables(sp: dict[str, Any], failed: bool = False) -> str:
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
    if sp.get("top") and not failed:
        out.append("<h3>Ops with the most alias energy</h3>")
        top = [
            {
                **r,
                "rank": i,
                "lie_share": 100 * r["lie_share"] if r.get("lie_share") is not None else math.nan,
            }
            for i, r in enumerate(sp["top"], start=1)
        ]
        columns = [
            ("rank", "rank"),
            ("order", "order (call)"),
            ("name", "op"),
            ("kind", "kind"),
            ("alias", "alias energy"),
            ("lie_share", "share % (mean of transforms)"),
        ]
        out.append(_table(top, columns))
        out.append(
            "<p class='caption'>rank: by alias energy; share: the op's share of the Lie derivative, "
            f"averaged over the layer transforms ({_SHORT_HTML}).</p>"
        )
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
