"""Small inline SVG charts: the risk trend and the modality contribution bars.

Drawn on the server as SVG with attributes only (no inline styles, which the
dashboard's Content-Security-Policy forbids) and a text alternative for screen
readers, so they need no JavaScript and no charting library.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

__all__ = ["Bars", "modality_bars", "trend_svg"]

_MODALITY_NAMES = {"image": "Imaging", "ehr": "Vital signs and labs", "note": "Clinical notes"}


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def trend_svg(points: list[tuple[datetime, float | None]], *,
              thresholds: list[tuple[str, float]] | None = None,
              width: int = 560, height: int = 170) -> tuple[str, str]:
    """(SVG markup, text description) of past risks over time, oldest first."""
    scored = sorted((_aware(t), p) for t, p in points if p is not None)
    if not scored:
        return "", "No scored predictions yet."
    left, right, top, bottom = 44, 12, 12, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([p for _, p in scored] + [t for _, t in thresholds or []] + [0.1])
    y_max = min(1.0, max(0.1, (int(peak * 10) + 1) / 10))
    t0, t1 = scored[0][0], scored[-1][0]
    span = (t1 - t0).total_seconds() or 1.0

    def x(t: datetime) -> float:
        if len(scored) == 1:
            return left + plot_w / 2
        return left + plot_w * (t - t0).total_seconds() / span

    def y(p: float) -> float:
        return top + plot_h * (1 - p / y_max)

    parts = [f'<svg class="trend" viewBox="0 0 {width} {height}" role="img" '
             f'aria-labelledby="trend-title trend-desc" xmlns="http://www.w3.org/2000/svg">']
    parts.append('<title id="trend-title">Risk trend</title>')
    steps = 4
    for k in range(steps + 1):
        p = y_max * k / steps
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(p):.1f}" '
                     f'y2="{y(p):.1f}"/>')
        parts.append(f'<text class="axis" x="{left - 6}" y="{y(p) + 4:.1f}" '
                     f'text-anchor="end">{100 * p:.0f}%</text>')
    for name, value in thresholds or []:
        if value <= y_max:
            parts.append(f'<line class="threshold" x1="{left}" x2="{width - right}" '
                         f'y1="{y(value):.1f}" y2="{y(value):.1f}"/>')
            parts.append(f'<text class="axis threshold-label" x="{width - right}" '
                         f'y="{y(value) - 4:.1f}" text-anchor="end">{escape(name)} '
                         f'{100 * value:.0f}%</text>')
    path = " ".join(f"{'M' if k == 0 else 'L'}{x(t):.1f},{y(p):.1f}"
                    for k, (t, p) in enumerate(scored))
    parts.append(f'<path class="line" d="{path}"/>')
    for t, p in scored:
        parts.append(f'<circle class="dot" cx="{x(t):.1f}" cy="{y(p):.1f}" r="3.5">'
                     f'<title>{t:%Y-%m-%d %H:%M} UTC: {100 * p:.1f}%</title></circle>')
    parts.append(f'<text class="axis" x="{left}" y="{height - 6}">{t0:%d %b %H:%M}</text>')
    if len(scored) > 1:
        parts.append(f'<text class="axis" x="{width - right}" y="{height - 6}" '
                     f'text-anchor="end">{t1:%d %b %H:%M}</text>')
    parts.append("</svg>")
    described = "; ".join(f"{t:%Y-%m-%d %H:%M} UTC {100 * p:.1f}%" for t, p in scored[-10:])
    desc = (f"{len(scored)} scored prediction{'s' if len(scored) != 1 else ''}, oldest first"
            f"{' (last 10 shown here)' if len(scored) > 10 else ''}: {described}.")
    return "".join(parts), desc


@dataclass(frozen=True)
class Bars:
    svg: str
    rows: list[tuple[str, float]]


def modality_bars(modalities: list[dict[str, object]], *, width: int = 560) -> Bars:
    """Horizontal bars of each modality's contribution in percentage points, around zero."""
    rows = [(_MODALITY_NAMES.get(str(m.get("modality")), str(m.get("modality"))),
             float(m.get("points", 0.0)))  # type: ignore[arg-type]
            for m in modalities]
    if not rows:
        return Bars("", [])
    label_w, value_w, row_h = 170, 80, 30
    plot_w = width - label_w - value_w
    extent = max(1.0, max(abs(v) for _, v in rows))
    zero = label_w + plot_w / 2
    height = row_h * len(rows) + 8
    parts = [f'<svg class="bars" viewBox="0 0 {width} {height}" role="img" '
             f'aria-labelledby="bars-title" xmlns="http://www.w3.org/2000/svg">',
             '<title id="bars-title">Contribution of each modality, in percentage points '
             'of risk</title>']
    for k, (name, v) in enumerate(rows):
        top = 4 + k * row_h
        length = (plot_w / 2) * abs(v) / extent
        x0 = zero if v >= 0 else zero - length
        cls = "bar-up" if v > 0 else "bar-down"
        parts.append(f'<text class="bar-label" x="{label_w - 10}" y="{top + 19}" '
                     f'text-anchor="end">{escape(name)}</text>')
        parts.append(f'<rect class="{cls}" x="{x0:.1f}" y="{top + 5}" '
                     f'width="{max(length, 1.5):.1f}" height="18" rx="2"/>')
        parts.append(f'<text class="bar-value" x="{width - 6}" y="{top + 19}" '
                     f'text-anchor="end">{v:+.1f} pts</text>')
    parts.append(f'<line class="zero" x1="{zero}" x2="{zero}" y1="0" y2="{height}"/>')
    parts.append("</svg>")
    return Bars("".join(parts), rows)
