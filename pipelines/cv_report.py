"""``cv.html``: the cross-validation report (self-contained: inline CSS, base64 PNGs)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from audits.model_comparison import COMPARED_METRICS, ModelComparison

__all__ = ["write_cv_html"]

_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
        ".best{background:#fff6d6}.fused{font-weight:bold}.muted{color:#666;font-size:90%}"
        "img{max-width:100%}")
_MIN_BIN = 10  # rows a reliability bin needs to be drawn
_LABEL = {"auroc": "AUROC", "auprc": "AUPRC", "brier": "Brier", "ece": "ECE"}
_COLOURS = ("#000000", "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
            "#F0E442")


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(comparison: ModelComparison, models: list[str], kind: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, m in enumerate(models):
        style: dict[str, Any] = {"color": _COLOURS[i % len(_COLOURS)],
                                 "linewidth": 2.0 if i == 0 else 1.2}
        if kind == "roc":
            fpr, tpr = comparison.roc(m)
            ax.plot(fpr, tpr, label=f"{m} ({comparison.points[m]['auroc']:.3f})", **style)
        else:
            # A bin of a handful of rows swings between 0 and 1 and reads as gross
            # miscalibration; as in the audit report, such bins are not drawn.
            ms, my, cnt = comparison.reliability(m)
            keep = cnt >= _MIN_BIN
            ax.plot(ms[keep], my[keep], marker="o", markersize=3, label=m, **style)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.set_xlabel("false-alarm rate (FPR)" if kind == "roc" else "predicted risk")
    ax.set_ylabel("sensitivity (TPR)" if kind == "roc" else "observed outcome rate")
    ax.set_title("ROC, pooled out-of-fold scores" if kind == "roc"
                 else f"Reliability (10 equal-width bins of >= {_MIN_BIN} rows), pooled "
                      "out-of-fold scores",
                 fontsize=10)
    ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "upper left")
    fig.tight_layout()
    return fig


def _num(v: Any, digits: int = 3, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f"<tr class='{c}'>" + "".join(f"<td>{html.escape(v)}</td>" for v in r)
                   + "</tr>" for r, c in zip(rows, classes or [""] * len(rows), strict=True))
    return f"<table><tr>{head}</tr>{body}</table>"


def write_cv_html(result: dict[str, Any], comparison: ModelComparison, path: Path) -> None:
    """Write the report for ``result`` (what ``cv.json`` holds)."""
    models = list(result["models"])
    best = result["best_baseline"]
    rows, classes = [], []
    for m in models:
        d = result["models"][m]
        rows.append([m, *(f"{_num(d[k])} [{_num(d[k + '_ci'][0])}, {_num(d[k + '_ci'][1])}]"
                          for k in COMPARED_METRICS),
                     result["baselines"].get(m, "the fused model, trained per fold by "
                                                "clinfuse train")])
        classes.append("fused" if m == "fused" else "best" if m == best else "")
    split = result["split"]
    diff = result["fused_minus_best"]
    if diff is not None:
        verdict = (f"Fused − best baseline ({best}), paired patient bootstrap: AUROC "
                   f"{_num(diff['estimate'], signed=True)} [95% CI "
                   f"{_num(diff['ci'][0], signed=True)}, {_num(diff['ci'][1], signed=True)}].")
    else:
        verdict = "No baseline could run on this manifest."
    fold_rows = [[str(f["repeat"]), str(f["fold"]), str(f["n_train_patients"]),
                  str(f["n_test_patients"]), str(f["n_test_events"]), str(f["n_fused_refused"]),
                  str(f["fused_seconds"]), str(f["baselines_seconds"]),
                  str(f.get("image_features") or "-")] for f in result["folds"]]
    skipped = "".join(f"<li>{html.escape(b)}: {html.escape(why)}</li>"
                      for b, why in result["skipped_baselines"].items()) or "<li>none</li>"
    prov = result["comparison"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>Cross-validated evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Cross-validated evaluation: {html.escape(result['manifest']['name'])}</h1>",
        f"<p><b>{html.escape(verdict)}</b></p>",
        f"<p class='muted'>{result['manifest']['n_patients']} patients, "
        f"{result['manifest']['n_rows']} rows, {result['manifest']['n_events']} events. "
        f"Split: {html.escape(split['kind'])}, K = {split['k']}, {split['repeats']} "
        f"repeat(s) ({html.escape(split['rule'])}). Metrics on the pooled out-of-fold "
        f"scores of {result['n_scored_rows']} rows "
        f"({result['n_rows_not_scored_by_every_model']} not scored by every model are left "
        f"out); 95% CIs: {html.escape(prov['resampling'])}, {prov['n_boot']} replicates. "
        f"Wall time {result['wall_seconds']} s.</p>",
        "<h2>Models</h2>",
        _table(["model", *[f"{_LABEL[m]} [95% CI]" for m in COMPARED_METRICS], "what"],
               rows, classes),
        "<p class='muted'>Highlighted: the best baseline (highest out-of-fold AUROC).</p>",
        f"<h2>Skipped baselines</h2><ul>{skipped}</ul>",
        "<h2>ROC curves</h2>",
        f"<img alt='ROC curves' src='data:image/png;base64,"
        f"{_png(_figure(comparison, models, 'roc'))}'>",
        "<h2>Reliability</h2>",
        f"<img alt='reliability diagrams' src='data:image/png;base64,"
        f"{_png(_figure(comparison, models, 'reliability'))}'>",
        "<h2>Folds</h2>",
        _table(["repeat", "fold", "train patients", "test patients", "test events",
                "refused by fused", "fused s", "baselines s", "image features"], fold_rows),
        "</body></html>",
    ]
    path.write_text("\n".join(parts), encoding="utf-8")
