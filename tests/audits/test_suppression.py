"""Small-cell suppression holds in every output: nothing suppressed can be recovered.

The recovery attempt is an honest adversary: it reads only what the outputs show
(the JSON record and the HTML tables), turns every shown count, and every count
derivable from a shown rate and a shown group size, into a known cell, then
solves every margin (a total equals the sum of its parts) for a single unknown
part, repeatedly, until nothing new is learnt. Every cell the audit suppresses
must stay unknown.
"""

from __future__ import annotations

import html as html_mod
import re
from typing import Any

import numpy as np
import pandas as pd
import pytest

from audits.frame import AuditFrame
from audits.report import _curves_figure, build_record, render_html, render_pdf

MIN = 30


def _cohort() -> pd.DataFrame:
    """600 encounters: 22 men miss imaging; a race level of 20 (primary suppression)."""
    rng = np.random.default_rng(7)
    n = 600
    sex = np.array(["female"] * 380 + ["male"] * 220)
    race = np.array((["A", "B", "C"] * 200)[:n])
    race[rng.choice(n, 20, replace=False)] = "D"
    has_image = np.ones(n, bool)
    has_image[rng.choice(np.arange(380), 90, replace=False)] = False  # women
    has_image[380 + rng.choice(np.arange(220), 22, replace=False)] = False  # 22 men
    score = rng.beta(1.5, 4.0, n)
    label = (rng.random(n) < score).astype(int)
    # Group "E" of 40 encounters with only 4 events: big enough to show, too few
    # events for an AUROC (min_events), so its ROC legend must carry no value.
    band = np.array(["x"] * 560 + ["E"] * 40)
    label[560:] = 0
    label[560:564] = 1
    return pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "score": score,
                         "label": label, "sex": sex, "race": race, "band": band,
                         "has_image": has_image})


@pytest.fixture(scope="module")
def audit() -> AuditFrame:
    return AuditFrame(scores=_cohort(), sensitive=["sex", "race", "band"], threshold=0.3,
                      min_group_size=MIN, n_boot=20, n_bins=1000)


@pytest.fixture(scope="module")
def record(audit: AuditFrame) -> dict[str, Any]:
    return build_record(audit, audit_id="t-1", created="2026-01-01T00:00:00+00:00")


def _true_cells(df: pd.DataFrame, sensitive: list[str]) -> dict[tuple[str, ...], int]:
    """Every count cell of the data: ("n", dim, group) and ("miss"/"pres", dim, group, mod)."""
    dims: list[tuple[str, ...]] = [(a,) for a in sensitive]
    dims += [(a, b) for k, a in enumerate(sensitive) for b in sensitive[k + 1:]]
    cells: dict[tuple[str, ...], int] = {("n", "overall", "all patients"): len(df)}
    cells[("miss", "overall", "all patients", "imaging")] = int((~df["has_image"]).sum())
    cells[("pres", "overall", "all patients", "imaging")] = int(df["has_image"].sum())
    for dim in dims:
        for levels, part in df.groupby(list(dim)):
            lv = levels if isinstance(levels, tuple) else (levels,)
            d, g = " x ".join(dim), " & ".join(map(str, lv))
            cells[("n", d, g)] = len(part)
            cells[("miss", d, g, "imaging")] = int((~part["has_image"]).sum())
            cells[("pres", d, g, "imaging")] = int(part["has_image"].sum())
    return cells


Cell = tuple[str, ...]


def _margins(cells: dict[Cell, int]) -> list[tuple[Cell, list[Cell]]]:
    """(total, parts) for every additive relation among the cells."""
    out: list[tuple[Cell, list[Cell]]] = []
    groups = {(k[1], k[2]) for k in cells if k[0] == "n"}
    for d, g in groups:  # missing + present = n
        out.append((("n", d, g), [("miss", d, g, "imaging"), ("pres", d, g, "imaging")]))
    for kind in ("n", "miss", "pres"):
        tail = ("imaging",) if kind != "n" else ()
        singles = {d for d, _ in groups if d != "overall" and " x " not in d}
        for d in singles:  # levels of one attribute sum to everyone
            out.append(((kind, "overall", "all patients", *tail),
                        [(kind, d2, g, *tail) for d2, g in groups if d2 == d]))
        for d in {d for d, _ in groups if " x " in d}:  # a x b cells sum to a's level
            a, b = d.split(" x ")
            for pos, attr in ((0, a), (1, b)):
                for lv in {g.split(" & ")[pos] for d2, g in groups if d2 == d}:
                    out.append(((kind, attr, lv, *tail),
                                [(kind, d, g, *tail) for d2, g in groups
                                 if d2 == d and g.split(" & ")[pos] == lv]))
    return [(t, ps) for t, ps in out if t in cells and all(p in cells for p in ps)]


def _num(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _html_tables(page: str) -> list[list[list[str]]]:
    tables = []
    for t in re.findall(r"<table>(.*?)</table>", page, flags=re.S):
        rows = [[html_mod.unescape(re.sub(r"<[^>]+>", "", c)).strip()
                 for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", r, flags=re.S)]
                for r in re.findall(r"<tr[^>]*>(.*?)</tr>", t, flags=re.S)]
        tables.append(rows)
    return tables


def _pdf_tables(lines: list[str]) -> list[list[list[str]]]:
    """The PDF's pipe-separated table lines as tables (a header line opens one)."""
    tables: list[list[list[str]]] = []
    for line in lines:
        if " | " not in line:
            continue
        cells = [c.strip() for c in line.split(" | ")]
        if cells[:2] == ["dimension", "group"] or not tables:
            tables.append([cells])
        else:
            tables[-1].append(cells)
    # The missing-rate lines come before their (absent) header: name it as the HTML does.
    for t in tables:
        if len(t[0]) == 4 and "%" in t[0][3]:
            t.insert(0, ["dimension", "group", "modality", "missing rate [95% CI]"])
    return tables


def _shown(record: dict[str, Any], page: str,
           extra_tables: list[list[list[str]]] | None = None) -> dict[tuple[str, ...], float]:
    """Every count the outputs show or let one compute from a shown rate x shown n."""
    res = record["results"]
    known: dict[tuple[str, ...], float] = {("n", "overall", "all patients"): res["n_rows"]}
    for g in res["groups"]:
        v = (g.get("metrics") or {}).get("n", {}).get("value")
        if v is not None:
            known[("n", g["dimension"], g["group"])] = v
        if isinstance(g.get("n"), int | float):
            known[("n", g["dimension"], g["group"])] = g["n"]
    rates: dict[tuple[str, str], float] = {}
    for r in res["missingness"]:
        rates[(r["dimension"], r["group"])] = r["missing_rate"]
    for r in res["disparities"]:
        for who, n_key in (("group", "n_group"), ("reference", "n_reference")):
            dim = r["dimension"]
            if r[n_key] is not None:
                known[("n", dim, r[who])] = r[n_key]
            if r["metric"] == "missing_rate":
                val = r["value_group" if who == "group" else "value_reference"]
                if val is not None:
                    rates[(dim, r[who])] = val
    for r in res["missingness_performance"]:
        for side, kind in (("n_missing", "miss"), ("n_present", "pres")):
            if isinstance(r[side], int | float):
                known[(kind, r["dimension"], r["group"], "imaging")] = r[side]
    # The HTML tables: group sizes, missing rates (to 0.1 %), missing/present counts.
    for rows in [*_html_tables(page), *(extra_tables or [])]:
        if not rows:
            continue
        head = rows[0]
        for row in rows[1:]:
            if len(row) < min(len(head), 5):
                continue  # a wrapped line's tail
            if head[:3] == ["dimension", "group", "n"] and _num(row[2]) is not None:
                known[("n", row[0], row[1])] = _num(row[2]) or 0.0
            if head[:4] == ["dimension", "group", "modality", "missing rate [95% CI]"]:
                rates.setdefault((row[0], row[1]), float(row[3].split("%")[0]) / 100)
            if head[:5] == ["dimension", "group", "modality", "n missing", "n present"]:
                for col, kind in ((3, "miss"), (4, "pres")):
                    if _num(row[col]) is not None:
                        known[(kind, row[0], row[1], "imaging")] = _num(row[col]) or 0.0
    for (d, g), rate in rates.items():
        n = known.get(("n", d, g))
        if n is not None:
            known[("miss", d, g, "imaging")] = round(rate * n)
    return known


def _recover(known: dict[Cell, float], margins: list[Any]) -> dict[Cell, float]:
    known = dict(known)
    changed = True
    while changed:
        changed = False
        for total, parts in margins:
            members = [total, *parts]
            unknown = [m for m in members if m not in known]
            if len(unknown) != 1:
                continue
            (u,) = unknown
            if u == total:
                known[u] = sum(known[p] for p in parts)
            else:
                known[u] = known[total] - sum(known[p] for p in parts if p != u)
            changed = True
    return known


def test_no_suppressed_cell_is_recoverable(audit: AuditFrame, record: dict[str, Any]) -> None:
    df = _cohort()
    cells = _true_cells(df, ["sex", "race", "band"])
    suppressed = {k for k, v in cells.items() if v < MIN}
    assert ("miss", "sex", "male", "imaging") in suppressed  # the 22 men missing imaging
    assert ("n", "race", "D") in suppressed
    page = render_html(audit, record)
    known = _recover(_shown(record, page), _margins(cells))
    # Whatever the adversary learnt must be true (else the extraction is wrong) ...
    wrong = {k: (v, cells[k]) for k, v in known.items() if k in cells and round(v) != cells[k]}
    assert not wrong
    # ... and must not include any cell below the minimum group size.
    leaked = sorted(k for k in suppressed if k in known)
    assert not leaked, f"suppressed cells recoverable from the outputs: {leaked}"


def test_pdf_text_leaks_nothing(audit: AuditFrame, record: dict[str, Any], tmp_path: Any,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every text the PDF draws (tables, titles, legends) joins the adversary's view."""
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.text import Text

    drawn: list[str] = []
    real_savefig = PdfPages.savefig

    def spy(self: PdfPages, figure: Any = None, **kw: Any) -> None:
        for t in figure.findobj(Text):
            drawn.extend(t.get_text().splitlines())
        real_savefig(self, figure, **kw)

    monkeypatch.setattr(PdfPages, "savefig", spy)
    render_pdf(audit, record, tmp_path / "report.pdf")
    assert any("insufficient data" in line for line in drawn)
    df = _cohort()
    cells = _true_cells(df, ["sex", "race", "band"])
    suppressed = {k for k, v in cells.items() if v < MIN}
    known = _recover(_shown(record, "", _pdf_tables(drawn)), _margins(cells))
    assert not {k for k, v in known.items() if k in cells and round(v) != cells[k]}
    leaked = sorted(k for k in suppressed if k in known)
    assert not leaked, f"suppressed cells recoverable from the PDF: {leaked}"
    hidden_auroc = [g["group"] for g in record["results"]["groups"]
                    if " x " not in g["dimension"] and g["dimension"] != "overall"
                    and (g["status"] != "ok" or g["metrics"]["auroc"]["value"] is None)]
    for line in drawn:
        for name in hidden_auroc:
            if line.startswith(name + " (") or line.startswith(name + ": "):
                assert not re.search(r"\d", line[len(name):]), f"PDF legend {line!r}"


def test_suppressed_groups_carry_no_numbers(audit: AuditFrame, record: dict[str, Any]) -> None:
    for g in record["results"]["groups"]:
        if g["status"] != "ok":
            assert set(g) <= {"dimension", "group", "n", "status"}
            assert not isinstance(g["n"], int | float)


def test_roc_legend_shows_no_value_for_hidden_metrics(audit: AuditFrame,
                                                      record: dict[str, Any]) -> None:
    fig = _curves_figure(audit, "roc")
    labels = [t.get_text() for ax in fig.axes for leg in [ax.get_legend()] if leg
              for t in leg.get_texts()]
    shown_auroc = {(g["dimension"], g["group"]) for g in record["results"]["groups"]
                   if g["status"] == "ok" and g["metrics"]["auroc"]["value"] is not None}
    hidden = [(g.dimension, g.name) for g in audit.groups
              if len(g.dimension) == 1 and (g.dim_name, g.name) not in shown_auroc]
    assert ("band", "E") in [(d[0], n) for d, n in hidden]
    for _dim, name in hidden:
        for lab in labels:
            if lab.startswith(name + " ") or lab == name:
                assert not re.search(r"\d", lab[len(name):]), f"ROC legend {lab!r} shows a value"


def test_complementary_suppression_hides_the_next_smallest_part() -> None:
    from audits.suppression import complementary_suppression

    # everyone = 100 = 22 + 30 + 48: the 22 alone would be 100 - 30 - 48.
    hidden = complementary_suppression(np.array([100, 22, 30, 48]),
                                       np.array([False, True, False, False]),
                                       [(0, [1, 2, 3])])
    assert hidden.tolist() == [False, True, True, False]
    # Nested margins: the 22 hides its complement 28, and nothing else needs to go.
    values = np.array([100, 50, 50, 22, 28, 25, 25])  # 0=1+2, 1=3+4, 2=5+6
    hidden = complementary_suppression(values, values < 23,
                                       [(0, [1, 2]), (1, [3, 4]), (2, [5, 6])])
    assert hidden[3] and hidden[4]  # 22 and its complement 28
    assert hidden.tolist() == [False, False, False, True, True, False, False]
