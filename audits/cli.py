"""Entry points for ``clinfuse audit`` and ``clinfuse audit compare`` (wired in services/)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from audits.frame import AuditFrame, FlagRules, Multiplicity
from audits.report import write_report
from audits.store import AuditStore, compare_records, load_record
from audits.table import AuditInputError, load_score_table, read_sidecar_sensitive

__all__ = ["main_audit", "main_compare"]


def _say(text: str, stream: TextIO | None = None) -> None:
    (stream or sys.stdout).write(text + "\n")


def main_audit(scores_csv: str | Path, sensitive: list[str] | None, out_dir: str | Path,
               run_by: str | None = None, *, manifest_sidecar: str | Path | None = None,
               threshold: float | str = "threshold",
               window: tuple[str | None, str | None] | None = None,
               min_group_size: int = 30, n_boot: int = 1000,
               multiplicity: Multiplicity = "holm", intersections: int = 2,
               reference: dict[str, str] | None = None, max_levels: int = 50,
               seed: int = 0) -> int:
    """Audit ``scores_csv`` and store the audit under ``out_dir``.

    ``sensitive`` wins over ``manifest_sidecar``; with neither, the usual
    columns present are used. ``run_by`` defaults to the OS user. Returns 0 on
    success (flags or not) and 2 on unusable input, with the reason on stderr.
    """
    try:
        if sensitive is None and manifest_sidecar is not None:
            sensitive = read_sidecar_sensitive(manifest_sidecar)
        table = load_score_table(scores_csv, sensitive=sensitive, threshold=threshold,
                                 window=window, max_levels=max_levels, run_by=run_by)
        audit = AuditFrame(scores=table, min_group_size=min_group_size, n_boot=n_boot,
                           intersections=intersections, reference=reference,
                           rules=FlagRules(multiplicity=multiplicity), seed=seed)
    except AuditInputError as exc:
        _say(f"clinfuse audit: {exc}", sys.stderr)
        return 2
    store = AuditStore(out_dir)
    audit_id = store.new_id()
    record = write_report(audit, store.path(audit_id), audit_id=audit_id)
    for line in record["summary"]:
        _say(line)
    _say(f"audit {audit_id} written to {store.path(audit_id)} "
         f"(report.html, report.pdf, audit.json)")
    return 0


def main_compare(a_dir: str | Path, b_dir: str | Path, *, as_json: bool = False,
                 argv: Sequence[str] | None = None) -> int:
    """Print what changed between two audit folders; 0 on success, 2 if unreadable."""
    try:
        diff = compare_records(load_record(a_dir), load_record(b_dir))
    except (FileNotFoundError, ValueError) as exc:
        _say(f"clinfuse audit compare: {exc}", sys.stderr)
        return 2
    if as_json:
        _say(json.dumps(diff, indent=2))
        return 0
    _say(f"Audit {diff['before']} -> {diff['after']}")
    for key, change in diff["provenance"].items():
        _say(f"  {key}: {change['before']} -> {change['after']}")
    for title, rows in (("Flags raised", diff["flags_raised"]),
                        ("Flags cleared", diff["flags_cleared"])):
        _say(f"{title}: {len(rows)}")
        for r in rows:
            _say(f"  {r['dimension']} = {r['group']}: {r['comparison']} "
                 f"difference {r['difference']:+.3f}")
    moved = [c for c in diff["metric_changes"] if c.get("intervals_separate")]
    _say(f"Metrics whose 95% intervals no longer overlap: {len(moved)}")
    for c in moved[:20]:
        _say(f"  {c['dimension']} = {c['group']}: {c['metric']} {c['before']:.3f} -> "
             f"{c['after']:.3f}")
    return 0
