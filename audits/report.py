"""The audit report: plain-language summary, HTML (self-contained), PDF and JSON.

The HTML has no external assets: CSS is inline and plots are base64 PNGs. The
PDF is drawn with matplotlib's ``PdfPages`` (no extra dependency) and carries
the same sections. Suppressed groups appear only as "insufficient data".
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from audits.frame import INSUFFICIENT, AuditFrame

__all__ = ["METRIC_MEANING", "build_record", "plain_summary", "write_report"]

#: One plain sentence per metric: what it means for patients.
METRIC_MEANING: dict[str, str] = {
    "n": "How many scored encounters the group has.",
    "prevalence": "The share of these patients who actually had the outcome.",
    "auroc": "How well the score ranks a patient who will have the outcome above one who "
             "will not (0.5 is a coin toss, 1 is perfect).",
    "auprc": "How much of the model's high-risk list is made of patients who really have "
             "the outcome, averaged over all cut-offs.",
    "tpr": "Of the patients who will have the outcome, the share the model flags in time "
           "(sensitivity).",
    "fnr": "Of the patients who will have the outcome, the share the model misses.",
    "fpr": "Of the patients who will not have the outcome, the share flagged anyway "
           "(false alarms).",
    "ppv": "When the model flags a patient, how often the outcome really follows.",
    "npv": "When the model does not flag a patient, how often that patient is truly fine.",
    "selection_rate": "The share of patients the model flags for attention.",
    "brier": "Average squared gap between the predicted risk and what happened "
             "(lower is better).",
    "ece": "Average gap between predicted risk and observed outcome rate across risk "
           "levels (lower is better). Chance alone makes it larger in small groups, so "
           "differences in ECE are shown but never flagged; the calibration intercept is "
           "tested instead.",
    "calibration_in_the_large": "How much the model over- (positive) or under- (negative) "
                                "states these patients' average risk, in probability points.",
    "calibration_intercept": "Whether predicted risks are systematically too high (negative) "
                             "or too low (positive) for this group, on the log-odds scale.",
    "calibration_slope": "Whether risks are too extreme (below 1) or too timid (above 1) "
                         "for this group; 1 is ideal.",
    "missing_rate": "The share of patients for whom this kind of data was not available to "
                    "the model.",
}
_LABEL = {"n": "n", "prevalence": "Prevalence", "auroc": "AUROC", "auprc": "AUPRC",
          "tpr": "TPR (sensitivity)", "fnr": "FNR", "fpr": "FPR", "ppv": "PPV", "npv": "NPV",
          "selection_rate": "Selection rate", "brier": "Brier score", "ece": "ECE",
          "calibration_in_the_large": "Calibration-in-the-large",
          "calibration_intercept": "Calibration intercept",
          "calibration_slope": "Calibration slope", "missing_rate": "Missing rate"}
_MULT = {"bh": "Benjamini-Hochberg (false discovery rate)", "holm": "Holm (family-wise error)"}


def multiplicity_statement(audit: AuditFrame) -> str:
    """How the flags are corrected for multiple comparisons, in one sentence."""
    rules, tiers = audit.rules, getattr(audit, "n_tests_by_tier", {})
    share = rules.intersection_share
    return (f"{_MULT[rules.multiplicity]}, alpha {rules.alpha:g} split between "
            f"{tiers.get('single attribute', 0)} single-attribute tests (alpha "
            f"{rules.alpha * (1 - share):.3g}) and {tiers.get('intersection', 0)} "
            f"intersection tests (alpha {rules.alpha * share:.3g})")
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_STYLES = ("-", "--", "-.", ":")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _finding(row: dict[str, Any]) -> str:
    metric, label = row["metric"], row["comparison"]
    who, ref = f"{row['group']} ({row['dimension']})", row["reference"]
    lo, hi = row["difference_lower"], row["difference_upper"]
    if metric == "missing_rate":
        mod = label.split(":", 1)[1].replace("has_", "")
        return (f"{mod.capitalize()} data is missing for {row['value_group']:.0%} of {who} "
                f"patients versus {row['value_reference']:.0%} of {ref} patients "
                f"(difference {row['difference']:+.1%}, 95% CI {lo:+.1%} to {hi:+.1%}); the "
                f"model sees less about them.")
    if metric == "selection_rate":
        return (f"The model flags {row['value_group']:.0%} of {who} patients versus "
                f"{row['value_reference']:.0%} of {ref} patients (ratio {row['ratio']:.2f}, "
                f"95% CI {row['ratio_lower']:.2f} to {row['ratio_upper']:.2f}): outside the "
                f"four-fifths range.")
    if metric == "calibration_intercept":
        # Intercept a in logit P(y) = a + logit(score): a lower a means fewer outcomes
        # than the scores promise, i.e. overstated risk. exp(difference) is the odds
        # ratio of the outcome, group vs reference, at the same score.
        way = "overstates" if row["difference"] < 0 else "understates"
        change = math.exp(row["difference"]) - 1
        return (f"Compared with {ref} patients, the model {way} the risk of {who} patients: "
                f"at the same score, their odds of the outcome are {abs(change):.0%} "
                f"{'lower' if change < 0 else 'higher'} (calibration intercept difference "
                f"{row['difference']:+.2f} log-odds, 95% CI {lo:+.2f} to {hi:+.2f}). The same "
                f"risk score means something different for them.")
    name = {"tpr": "catches", "fpr": "raises false alarms for", "ppv": "is right when it flags"}
    return (f"The model {name.get(metric, metric)} {row['value_group']:.0%} of {who} patients "
            f"versus {row['value_reference']:.0%} of {ref} patients (difference "
            f"{row['difference']:+.1%}, 95% CI {lo:+.1%} to {hi:+.1%}).")


def _condensed_findings(flags: pd.DataFrame, max_findings: int = 10,
                        max_names: int = 6) -> list[str]:
    """One bullet per (audited attribute, metric): the clearest comparison in words,
    then every other affected group named once (intersections repeat a finding)."""
    order = flags.assign(single=flags["dimension"].str.count(" x ") == 0)
    order = order.sort_values(["single", "p_adjusted"], ascending=[False, True])
    by = "attribute" if "attribute" in order.columns else "dimension"
    bullets = []
    for (_, _), part in order.groupby([by, "comparison"], sort=False):
        rows = part.to_dict(orient="records")
        text = _finding({str(k): v for k, v in rows[0].items()})
        others = list(dict.fromkeys(
            f"{r['group']}" + ("" if r["dimension"] == rows[0]["dimension"]
                               else f" ({r['dimension']})") for r in rows[1:]))
        if others:
            shown = ", ".join(others[:max_names])
            more = f" and {len(others) - max_names} more" if len(others) > max_names else ""
            text += (f" The same gap is flagged for {len(others)} other group"
                     f"{'' if len(others) == 1 else 's'} (each against the same stratum at "
                     f"the reference level): {shown}{more}.")
        bullets.append("- " + text)
    if len(bullets) > max_findings:
        rest = len(bullets) - max_findings
        bullets = [*bullets[:max_findings],
                   f"- ... and {rest} more finding{'' if rest == 1 else 's'} in the "
                   f"disparity table."]
    return bullets


def plain_summary(audit: AuditFrame) -> list[str]:
    """The findings in plain sentences, most important first."""
    out = []
    ov = audit.overall
    out.append(f"{audit.n_rows:,} scored encounters from {audit.n_patients:,} patients were "
               f"audited at decision threshold {audit.threshold:g}. Overall the model ranks "
               f"patients with AUROC {ov['auroc']:.3f} and flags {ov['selection_rate']:.0%} of "
               f"them.")
    flags = audit.flags
    if flags.empty:
        out.append(f"No disparity met the flag rules after correcting for "
                   f"{getattr(audit, 'n_tests', 0)} comparisons. This is not proof of "
                   f"fairness: small groups have wide intervals.")
    else:
        out.append(f"{len(flags)} disparit{'y was' if len(flags) == 1 else 'ies were'} "
                   f"flagged (out of {getattr(audit, 'n_tests', 0)} comparisons, corrected for "
                   f"multiple testing):")
        out += _condensed_findings(flags)
    n_small = int(audit.suppressed.sum())
    if n_small:
        out.append(f"{n_small} group(s) are shown as \"{INSUFFICIENT}\": they had fewer than "
                   f"{audit.min_group_size} encounters, or are hidden so that a small group's "
                   f"size cannot be worked out by subtracting the others from a total.")
    out += [f"Note: {w}" for w in audit.warnings[:5]]
    return out


def build_record(audit: AuditFrame, *, audit_id: str, created: str | None = None
                 ) -> dict[str, Any]:
    """The machine-readable audit (what ``audit.json`` holds)."""
    t = audit.table
    return {
        "schema": "clinfuse.audit/1", "audit_id": audit_id,
        "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
        "run_by": t.run_by, "model_version": t.model_version,
        "data_window": {"start": t.window[0], "end": t.window[1]},
        "data_fingerprint": {"sha256": t.fingerprint, "source": t.source},
        "threshold": {"value": audit.threshold, "source": t.threshold_source},
        "n_refused": t.n_refused,
        "multiplicity": multiplicity_statement(audit),
        "summary": plain_summary(audit),
        "metric_meaning": METRIC_MEANING,
        "results": audit.to_dict(),
    }


# ----------------------------------------------------------------------------- figures
def _single_groups(audit: AuditFrame) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, g in enumerate(audit.groups):
        if len(g.dimension) == 1 and not audit.suppressed[i]:
            out.setdefault(g.dim_name, []).append(i)
    return out


def _curves_figure(audit: AuditFrame, kind: str) -> Figure:
    dims = _single_groups(audit)
    cols = max(1, min(2, len(dims)))
    rows = max(1, math.ceil(len(dims) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.3 * rows), squeeze=False)
    for ax, (dim, idx) in zip(axes.ravel(), dims.items(), strict=False):
        for k, i in enumerate(idx):
            style = {"color": _COLOURS[k % len(_COLOURS)], "linestyle": _STYLES[k % 4]}
            name = textwrap.shorten(audit.groups[i].name, 40, placeholder="...")
            if kind == "roc":
                if not audit.metric_shown("auroc", i):
                    # The table says "insufficient data"; so do the curve and legend
                    # (a curve's steps would count the group's few events).
                    ax.plot([], [], label=f"{name}: {INSUFFICIENT}", **style)
                    continue
                fpr, tpr = audit.roc(i)
                auc = audit._points["auroc"].iloc[i]
                ax.plot(fpr, tpr, label=f"{name} ({_fmt(float(auc), 2)})", **style)
            else:
                # A bin of a few patients swings between 0 and 1 and would look like
                # gross miscalibration; like every small cell, it is not shown.
                ms, my, cnt = audit.reliability(i)
                keep = cnt >= audit.min_group_size
                ax.plot(ms[keep], my[keep], marker="o", markersize=3, label=name, **style)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        ax.set_title(f"ROC by {dim}" if kind == "roc" else
                     f"Calibration by {dim} (risk bins of >= {audit.min_group_size} patients)",
                     fontsize=10)
        ax.set_xlabel("false-alarm rate (FPR)" if kind == "roc" else "predicted risk")
        ax.set_ylabel("sensitivity (TPR)" if kind == "roc" else "observed outcome rate")
        ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "upper left")
    for ax in axes.ravel()[len(dims):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


#: Forest-plot panels: each metric is drawn on the scale its rule uses, never mixed.
_PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("rates", ("tpr", "fpr", "ppv", "missing_rate"),
     "difference from the reference group (proportion; 0.10 = 10 percentage points)"),
    ("selection", ("selection_rate",),
     "selection-rate ratio to the reference group (four-fifths rule: 0.8 to 1.25)"),
    ("calibration", ("calibration_intercept",),
     "calibration intercept difference (log-odds; below 0: risk overstated)"),
)


def _row_label(r: Mapping[Any, Any]) -> str:
    """Full group and comparator names (cutting a name can turn "Black & 80+" into
    "Black", which reads as a different group)."""
    comp = str(r["comparison"])
    what = _LABEL.get(str(r["metric"]), str(r["metric"]))
    if ":" in comp:
        what += ": " + comp.split(":", 1)[1].replace("has_", "")
    return textwrap.fill(f"{r['group']} vs {r['reference']} - {what}", 60)


def _forest_figure(audit: AuditFrame, max_rows: int = 30) -> Figure:
    d = audit.disparities
    if d.empty or not d["tested"].any():
        fig = plt.figure(figsize=(8, 1.5))
        fig.text(0.05, 0.5, "No comparisons (every group below the minimum size).")
        return fig
    d = d[d["tested"]].copy()
    d["single"] = d["dimension"].str.count(" x ") == 0
    d = d.sort_values(["flagged", "single", "p_adjusted"], ascending=[False, False, True])
    d = d.head(max_rows)
    panels = [(name, d[d["metric"].isin(metrics)].iloc[::-1], xlabel)
              for name, metrics, xlabel in _PANELS]
    panels = [p for p in panels if len(p[1])]
    lines = [sum(int(_row_label(r).count("\n")) + 1 for r in part.to_dict(orient="records"))
             for _, part, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(10, 0.3 * sum(lines) + 1.1 * len(panels) + 0.6),
                             gridspec_kw={"height_ratios": [max(n, 1.5) for n in lines]})
    for ax, (name, part, xlabel) in zip(axes[:, 0], panels, strict=True):
        y = list(range(len(part)))
        colours = ["#D55E00" if f else "#0072B2" for f in part["flagged"]]
        if name == "selection":
            value, lo, hi = part["ratio"], part["ratio_lower"], part["ratio_upper"]
            ff = audit.rules.four_fifths
            ax.axvspan(ff, 1 / ff, color="#eeeeee", zorder=0)
            ax.axvline(1, color="grey", linewidth=0.8)
        else:
            value, lo, hi = part["difference"], part["difference_lower"], part["difference_upper"]
            ax.axvline(0, color="grey", linewidth=0.8)
        ax.hlines(y, lo, hi, colors=colours)
        ax.scatter(value, y, c=colours, zorder=3, s=14)
        ax.set_yticks(y, [_row_label(r) for r in part.to_dict(orient="records")], fontsize=7)
        ax.set_ylim(-0.7, len(part) - 0.3)
        ax.set_xlabel(xlabel, fontsize=8)
    axes[0, 0].set_title(f"Disparities with 95% CIs (not adjusted; flags are): the "
                         f"{len(d)} most important of "
                         f"{int(audit.disparities['tested'].sum())} tested comparisons "
                         f"(orange = flagged)", fontsize=10)
    fig.tight_layout()
    return fig


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------- tables
def _group_rows(record: dict[str, Any], metrics: Iterable[str]) -> list[list[str]]:
    rows = []
    for g in record["results"]["groups"]:
        if g["status"] != "ok":
            rows.append([g["dimension"], g["group"], g["n"], *[INSUFFICIENT] * 0,
                         INSUFFICIENT])
            continue
        cells = [g["dimension"], g["group"], f"{g['metrics']['n']['value']:.0f}"]
        for m in metrics:
            v = g["metrics"][m]
            if v["value"] is None:
                cells.append(v.get("status", "undefined"))
            else:
                cells.append(f"{v['value']:.3f} [{_fmt(v['lower'])}, {_fmt(v['upper'])}]")
        rows.append(cells)
    return rows


_TABLE_METRICS = ("prevalence", "auroc", "auprc", "tpr", "fpr", "ppv", "npv",
                  "selection_rate", "brier", "ece", "calibration_in_the_large",
                  "calibration_intercept", "calibration_slope")
_CSS = """body{font-family:Helvetica,Arial,sans-serif;max-width:1150px;margin:2em auto;
color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:2px solid #0072B2;
padding-bottom:.2em;margin-top:2em}table{border-collapse:collapse;font-size:.78em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eef3f8}.flag{background:#fde6d8}.summary{background:#f4f8fb;padding:1em 1.5em;
border-left:5px solid #0072B2}.muted{color:#666;font-size:.85em}img{max-width:100%}
dl.meaning dt{font-weight:bold}dl.meaning dd{margin:0 0 .4em 1em}"""


def _html_table(header: list[str], rows: list[list[str]], flagged: list[bool] | None = None
                ) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for k, r in enumerate(rows):
        cls = ' class="flag"' if flagged and flagged[k] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r)
                   + "</tr>")
    return "\n".join(out) + "</table>"


def _disparity_rows(record: dict[str, Any]) -> tuple[list[list[str]], list[bool]]:
    rows, flags = [], []
    disp = sorted(record["results"]["disparities"],
                  key=lambda r: (not r["flagged"], not r["tested"], r["p_adjusted"] or 1.0))
    for r in disp:
        if not r["tested"] and r["metric"] not in ("calibration_in_the_large",
                                                   "calibration_slope", "ece", "auroc"):
            continue
        # A ratio of two signed quantities centred at 0 (calibration intercepts, or
        # calibration-in-the-large) is meaningless, so only the difference is shown.
        signed = r["metric"] in _SIGNED
        rows.append([r["dimension"], r["group"], r["reference"],
                     r["comparison"].replace("missing_rate:has_", "missing: "),
                     r["family"] or "-", _fmt(r["difference"]),
                     f"[{_fmt(r['difference_lower'])}, {_fmt(r['difference_upper'])}]",
                     "-" if signed else _fmt(r["ratio"]),
                     "-" if signed else f"[{_fmt(r['ratio_lower'])}, {_fmt(r['ratio_upper'])}]",
                     _p(r["p_adjusted"]) if r["tested"] else "not tested",
                     "FLAG" if r["flagged"] else ""])
        flags.append(bool(r["flagged"]))
    return rows, flags


_SIGNED = ("calibration_intercept", "calibration_in_the_large")


def _p(v: Any) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return "<0.0001" if v < 1e-4 else f"{v:.4f}"


_DISP_HEADER = ["dimension", "group", "reference", "metric", "family", "difference", "95% CI",
                "ratio", "95% CI", "adjusted p", ""]


def _provenance_rows(record: dict[str, Any]) -> list[list[str]]:
    res = record["results"]
    return [["Audit id", record["audit_id"]], ["Created (UTC)", record["created"]],
            ["Run by", record["run_by"]],
            ["Model version", ", ".join(record["model_version"]) or "not recorded"],
            ["Data window", f"{record['data_window']['start']} to "
                            f"{record['data_window']['end']}"],
            ["Data fingerprint (sha256)", str(record["data_fingerprint"]["sha256"])],
            ["Decision threshold", f"{record['threshold']['value']:g} "
                                   f"({record['threshold']['source']})"],
            ["Rows / patients", f"{res['n_rows']:,} / {res['n_patients']:,}"],
            ["Refused rows excluded", str(record["n_refused"])],
            ["Sensitive attributes", ", ".join(res["sensitive"])
             + (" and pairwise intersections" if res["intersections"] == 2 else "")],
            ["Reference groups", "; ".join(f"{k}: {v}" for k, v in res["reference"].items()
                                           if " x " not in k)],
            ["Intervals", f"{res['ci_level']:.0%} percentile, patient-level Poisson bootstrap, "
                          f"{res['n_boot']} resamples over {res['n_bins']} score bins"],
            ["Multiple comparisons", str(record["multiplicity"])],
            ["Minimum group size", f"{res['min_group_size']} (smaller: \"{INSUFFICIENT}\")"]]


def _method_text(record: dict[str, Any]) -> str:
    rules = record["results"]["rules"]
    gaps = ", ".join(f"{_LABEL.get(k, k)} > {v:g}" for k, v in rules["min_gap"].items())
    return (f"A disparity is flagged only if its 95% CI excludes no difference, its size "
            f"exceeds the rule ({gaps}; calibration intercept in log-odds; selection rate: "
            f"four-fifths rule, whole CI of the ratio below {rules['four_fifths']:g} or above "
            f"{1 / rules['four_fifths']:.3g}), and its p-value stays below alpha after "
            f"correction for multiple comparisons ({record['multiplicity']}). The 95% CIs "
            f"are per comparison, so a CI can exclude no difference without a flag. Holm "
            f"keeps the "
            f"chance of even one false flag in the whole audit at alpha; intersections get "
            f"their own small share so that their many small cells do not drown the "
            f"single-attribute comparisons. The p-values: rates (TPR, FPR, PPV, missing "
            f"data) by Fisher's exact test, which stays valid for groups with few events; "
            f"the four-fifths rule by the Farrington-Manning score test; calibration by a "
            f"score test of equal calibration intercepts (does the same score mean the same "
            f"risk in both groups?). ECE is not tested: it is positive even for a perfectly "
            f"calibrated model, more so in small groups. Patients with several encounters "
            f"count once, through a design effect. Event-based comparisons (TPR, FPR, PPV, "
            f"calibration) are tested only when both groups have at least "
            f"{record['results'].get('min_events', 10)} patients in the denominator (for "
            f"calibration: of each outcome). "
            f"An intersection (e.g. Black & 65-79) is compared with the group that differs "
            f"only in the attribute being audited (White & 65-79), so an effect of the other "
            f"attribute is not mistaken for one of this attribute. Equalized-odds gaps (TPR "
            f"and FPR) are reported separately and never averaged, so opposite gaps cannot "
            f"cancel.")


def _count(v: Any) -> str:
    """A count as a whole number; a suppressed one ("<30") as it is."""
    return f"{v:.0f}" if isinstance(v, int | float) else str(v)


def _missing_rows(record: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in record["results"]["missingness_performance"]:
        if r["auroc_diff"] is None and r["brier_diff"] is None:
            rows.append([r["dimension"], r["group"], r["modality"], _count(r["n_missing"]),
                         _count(r["n_present"]), INSUFFICIENT, "", ""])
            continue
        rows.append([r["dimension"], r["group"], r["modality"], f"{r['n_missing']:.0f}",
                     f"{r['n_present']:.0f}",
                     f"{_fmt(r['auroc_missing'])} vs {_fmt(r['auroc_present'])}",
                     f"{_fmt(r['auroc_diff'])} [{_fmt(r['auroc_diff_lower'])}, "
                     f"{_fmt(r['auroc_diff_upper'])}]",
                     f"{_fmt(r['calibration_in_the_large_diff'])} "
                     f"[{_fmt(r['calibration_in_the_large_diff_lower'])}, "
                     f"{_fmt(r['calibration_in_the_large_diff_upper'])}]"])
    return rows


_MISS_HEADER = ["dimension", "group", "modality", "n missing", "n present",
                "AUROC missing vs present", "AUROC difference [95% CI]",
                "calibration-in-the-large difference [95% CI]"]


def _missing_rate_rows(record: dict[str, Any]) -> list[list[str]]:
    return [[r["dimension"], r["group"], r["modality"],
             f"{r['missing_rate']:.1%} [{r['lower']:.1%}, {r['upper']:.1%}]"]
            for r in record["results"]["missingness"] if " x " not in r["dimension"]]


def render_html(audit: AuditFrame, record: dict[str, Any]) -> str:
    """The self-contained HTML report."""
    figs = {k: _png(f) for k, f in (("forest", _forest_figure(audit)),
                                    ("roc", _curves_figure(audit, "roc")),
                                    ("cal", _curves_figure(audit, "calibration")))}
    plt.close("all")
    summary = record["summary"]
    bullets = "".join(f"<li>{html.escape(s[2:])}</li>" for s in summary if s.startswith("- "))
    paras = "".join(f"<p>{html.escape(s)}</p>" for s in summary if not s.startswith("- "))
    summary_html = paras.replace("</p>", "</p>", 1)
    if bullets:
        first, _, rest = summary_html.partition("</p>")
        second, _, rest2 = rest.partition("</p>")
        summary_html = f"{first}</p>{second}</p><ul>{bullets}</ul>{rest2}"
    disp_rows, disp_flags = _disparity_rows(record)
    meaning = "".join(f"<dt>{html.escape(_LABEL[k])}</dt><dd>{html.escape(v)}</dd>"
                      for k, v in METRIC_MEANING.items())
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Fairness audit {html.escape(record['audit_id'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Fairness audit: {html.escape(', '.join(record['model_version']) or 'model')}</h1>",
        f"<div class='summary'><h2 style='margin-top:0'>Summary</h2>{summary_html}</div>",
        "<h2>About this audit</h2>",
        _html_table(["", ""], _provenance_rows(record)),
        f"<p class='muted'>{html.escape(_method_text(record))}</p>",
        "<h2>Disparities</h2>",
        f"<img alt='forest plot of disparities' src='data:image/png;base64,{figs['forest']}'>",
        _html_table(_DISP_HEADER, disp_rows, disp_flags),
        "<h2>Metrics by group</h2><p class='muted'>Value [95% CI]. Groups under the minimum "
        "size show only \"insufficient data\".</p>",
        _html_table(["dimension", "group", "n", *[_LABEL[m] for m in _TABLE_METRICS]],
                    _group_rows(record, _TABLE_METRICS)),
        "<h2>ROC curves by group</h2>",
        f"<img alt='ROC curves' src='data:image/png;base64,{figs['roc']}'>",
        "<h2>Calibration by group</h2>",
        f"<img alt='reliability curves' src='data:image/png;base64,{figs['cal']}'>",
        "<h2>Missing data</h2><p>How often each kind of data was unavailable to the model, "
        "and how the model performs when it is missing.</p>",
        _html_table(["dimension", "group", "modality", "missing rate [95% CI]"],
                    _missing_rate_rows(record)),
        _html_table(_MISS_HEADER, _missing_rows(record)),
        "<h2>What each metric means for patients</h2>",
        f"<dl class='meaning'>{meaning}</dl>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _text_page(pdf: PdfPages, title: str, lines: list[str], *, mono: bool = False) -> None:
    per_page = 58 if mono else 44
    wrapped: list[str] = []
    for line in lines:
        wrapped += textwrap.wrap(line, 150 if mono else 105) or [""]
    for start in range(0, max(len(wrapped), 1), per_page):
        fig = plt.figure(figsize=(8.27, 11.69))
        fig.text(0.06, 0.96, title, fontsize=14, weight="bold")
        fig.text(0.06, 0.93, "\n".join(wrapped[start:start + per_page]), va="top",
                 fontsize=6 if mono else 8.5, family="monospace" if mono else "sans-serif",
                 linespacing=1.45)
        pdf.savefig(fig)
        plt.close(fig)


def render_pdf(audit: AuditFrame, record: dict[str, Any], path: Path) -> None:
    """The same report as a PDF (matplotlib PdfPages)."""
    prov = [f"{k}: {v}" for k, v in _provenance_rows(record)]
    disp_rows, _disp_flags = _disparity_rows(record)
    # One entry per comparison with the full group names (the HTML has every column).
    disp_lines = []
    for r in disp_rows[:150]:
        dim, group, ref, metric, _family, diff, ci, ratio, ratio_ci, p_adj, flag = r
        disp_lines.append(f"{flag or '    '}  {dim}: {group} vs {ref} | {metric} | difference "
                          f"{diff} {ci} | ratio {ratio} {ratio_ci} | adjusted p {p_adj}")
    if len(disp_rows) > 150:
        disp_lines.append(f"... {len(disp_rows) - 150} more comparisons in report.html and "
                          f"audit.json")
    group_lines = [" | ".join(r[:3] + r[3:10]) for r in _group_rows(record, _TABLE_METRICS[:7])]
    meaning = [f"{_LABEL[k]}: {v}" for k, v in METRIC_MEANING.items()]
    with PdfPages(path) as pdf:
        _text_page(pdf, "Fairness audit: summary",
                   [*record["summary"], "", *prov, "", _method_text(record)])
        for fig in (_forest_figure(audit), _curves_figure(audit, "roc"),
                    _curves_figure(audit, "calibration")):
            pdf.savefig(fig)
            plt.close(fig)
        _text_page(pdf, "Disparities (flagged first)", disp_lines, mono=True)
        _text_page(pdf, "Metrics by group: value [95% CI]",
                   [" | ".join(["dimension", "group", "n",
                                *[_LABEL[m] for m in _TABLE_METRICS[:7]]]), *group_lines],
                   mono=True)
        _text_page(pdf, "Missing data", [" | ".join(r) for r in _missing_rate_rows(record)]
                   + [""] + [" | ".join(_MISS_HEADER)]
                   + [" | ".join(r) for r in _missing_rows(record)], mono=True)
        _text_page(pdf, "What each metric means for patients", meaning)
        info = pdf.infodict()
        info["Title"] = f"Fairness audit {record['audit_id']}"
        info["Author"] = record["run_by"]


def write_report(audit: AuditFrame, out_dir: str | Path, *, audit_id: str,
                 created: str | None = None) -> dict[str, Any]:
    """Write ``audit.json``, ``report.html`` and ``report.pdf`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = build_record(audit, audit_id=audit_id, created=created)
    (out / "audit.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    (out / "report.html").write_text(render_html(audit, record), encoding="utf-8")
    render_pdf(audit, record, out / "report.pdf")
    return record
