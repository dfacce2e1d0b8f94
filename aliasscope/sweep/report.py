"""``sweep.html`` and ``figures/`` of a sweep, in the style of the diagnose report: self-contained
(figures inlined), the statistics over pretrained models only, random-init rows flagged."""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any

import numpy as np

from .._report import _CHECK, _CSS, _image, _table
from ..results import to_json_text
from .figures import accuracy, fit_statistics, plot_lie_vs_accuracy, plot_shares, plot_transform_panels

__all__ = ["statistics", "write_report"]

MAIN_TRANSFORM = "translate_x"
"""The transform of the paper's main figure (translation)."""


def statistics(frame: Any) -> list[dict[str, Any]]:
    """Per transform: R^2 and Spearman's rho of log10(Lie derivative) against top-1 over the
    pretrained models, with 95% bootstrap intervals (:func:`.figures.fit_statistics`)."""
    from .figures import pretrained_rows

    rows = pretrained_rows(frame)
    acc, label = accuracy(rows) if len(rows) else (None, "")
    out = []
    for column in [c for c in frame.columns if c.startswith("lie_") and not c.endswith(("_low", "_high"))]:
        if len(rows):
            s = fit_statistics(acc.to_numpy(), np.log10(rows[column].astype(float).to_numpy()))
        else:
            s = fit_statistics(np.array([]), np.array([]))
        out.append({"transform": column[4:], "accuracy": label, **s})
    return out


def _resolution(out: Path) -> list[dict[str, str]]:
    path = out / "resolution.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["status"] != "current"]


def write_report(frame: Any, out: str | Path) -> list[str]:
    """Draw the figures into ``out/figures/`` and write ``out/sweep.html`` and
    ``out/statistics.json``; returns the names written."""
    out = Path(out)
    figures = out / "figures"
    main = MAIN_TRANSFORM if f"lie_{MAIN_TRANSFORM}" in frame else None
    if main is None:
        lies = [c[4:] for c in frame.columns if c.startswith("lie_") and not c.endswith(("_low", "_high"))]
        main = lies[0] if lies else None
    drawn = []
    if main is not None:
        plot_lie_vs_accuracy(frame, main, figures / "lie_vs_accuracy")
        plot_transform_panels(frame, figures / "lie_vs_accuracy_per_transform")
        drawn += ["lie_vs_accuracy", "lie_vs_accuracy_per_transform"]
    if any(c.startswith("share_") for c in frame.columns):
        plot_shares(frame, figures / "shares_by_kind")
        drawn.append("shares_by_kind")
    stats = statistics(frame)
    (out / "statistics.json").write_text(to_json_text(stats))
    (out / "sweep.html").write_text(_page(frame, stats, drawn, figures, _resolution(out)))
    return ["statistics.json", "sweep.html", *(f"figures/{d}.png" for d in drawn)]


def _counts(frame: Any) -> str:
    status = frame["status"].value_counts().to_dict()
    ok = frame[frame["status"] == "ok"]
    trained = int(ok["pretrained"].fillna(False).astype(bool).sum()) if len(ok) else 0
    types = ok["type"].value_counts().to_dict() if len(ok) else {}
    parts = ", ".join(f"{n} {s}" for s, n in status.items())
    kinds = ", ".join(f"{n} {t}" for t, n in types.items())
    return (
        f"<p class='summary'><b>{len(frame)} models</b>: {html.escape(parts)}. "
        f"Measured: {html.escape(kinds)}; "
        f"<b>{trained} with pretrained weights</b>, {len(ok) - trained} with random init. Statistics and "
        "findings use the pretrained models only: a randomly initialised network's Lie derivative says "
        "nothing about a trained one (those rows are grey crosses, for coverage).</p>"
    )


def _page(frame: Any, stats: list[dict[str, Any]], drawn: list[str], figures: Path, resolution: list) -> str:
    captions = {
        "lie_vs_accuracy": "The paper's main figure: each model's mean Lie derivative over the images (95% "
        "BCa interval as a bar) against top-1; R² and Spearman's ρ of log10 Lie derivative against top-1 "
        "with 95% bootstrap intervals over models (pretrained only). The paper reports R² = 0.33 for "
        "translation over its pretrained models.",
        "lie_vs_accuracy_per_transform": "The same for every transform.",
        "shares_by_kind": "Shares of the exact decomposition by op kind (mean over its transforms), per "
        "model sorted by top-1, and against top-1 and size. Only models whose decomposition passed its "
        "self-checks.",
    }
    body = ["<h1>aliasscope sweep</h1>", _counts(frame)]
    body.append("<h2>Statistics (pretrained models)</h2>")
    body.append(
        _table(
            stats,
            [
                ("transform", "transform"),
                ("n", "models"),
                ("r2", "R²"),
                ("r2_low", "low"),
                ("r2_high", "high"),
                ("rho", "Spearman ρ"),
                ("rho_low", "low"),
                ("rho_high", "high"),
            ],
        )  # fmt: skip
    )
    for key in drawn:
        body.append(f"<h2>{html.escape(key.replace('_', ' '))}</h2>")
        body.append(_image(figures / f"{key}.png", key))
        body.append(f"<p class='caption'>{html.escape(captions.get(key, ''))}</p>")
    ok = frame[frame["status"] == "ok"]
    if len(ok):
        acc, _ = accuracy(ok)
        rows = ok.assign(accuracy=acc, params_m=ok["params"].astype(float) / 1e6).to_dict("records")
        body.append("<h2>Models</h2>")
        columns = [("requested", "requested"), ("model", "model"), ("type", "type"),
                   ("params_m", "params (M)"), ("gflops", "GFLOPs"), ("accuracy", "top-1"),
                   (f"lie_{MAIN_TRANSFORM}", MAIN_TRANSFORM), ("weights", "weights"),
                   ("seconds", "s")]  # fmt: skip
        body.append(_table(rows, [c for c in columns if c[0] in rows[0]]))
    if "decomposition_error" in ok:
        undecomposed = ok[ok["decomposition_error"].fillna("").astype(str) != ""]
        failed = ok[ok["checks_passed"].notna() & ~ok["checks_passed"].fillna(True).astype(bool)]
        if len(undecomposed) or len(failed):
            body.append("<h2>Decompositions not run or failing their self-checks</h2>")
            body.append("<p>These models' end-to-end values stand; their shares are not shown.</p>")
            rows = [
                {"requested": r["requested"], "problem": r["decomposition_error"]}
                for r in undecomposed.to_dict("records")
            ]
            rows += [{"requested": r["requested"], "problem": f"self-check failed: {r['check_failures']}"}
                     for r in failed.to_dict("records")]  # fmt: skip
            body.append(_table(rows, [("requested", "requested"), ("problem", "problem")]))
    bad = frame[frame["status"] != "ok"]
    if len(bad):
        body.append("<h2>Not measured</h2>")
        body.append(_table(bad.to_dict("records"), [("requested", "requested"), ("status", "status"),
                                                    ("error", "error")]))  # fmt: skip
    if resolution:
        body.append("<h2>Names that were renamed, remapped or are gone</h2>")
        body.append(_table(resolution, [("requested", "requested"), ("status", "status"), ("model", "model"),
                                        ("note", "note")]))  # fmt: skip
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>aliasscope sweep</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}{_CHECK}</body></html>"
    )
