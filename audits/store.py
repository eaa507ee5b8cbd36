"""A folder store of audits: list, get, and compare two audits.

Layout: ``root/<audit_id>/{audit.json, report.html, report.pdf}``. An audit id is
``<UTC time>-v<sequence>``, so ids sort by time and never collide; an audit's
folder is written once and never changed (the service issue moves this into the
database).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["AuditStore", "compare_records", "load_record"]

_ID = re.compile(r"^\d{8}T\d{6}Z-v\d{4,}$")
_COMPARED = ("auroc", "tpr", "fpr", "ppv", "selection_rate", "brier",
             "calibration_in_the_large", "calibration_slope")


def load_record(path: str | Path) -> dict[str, Any]:
    """``audit.json`` of an audit folder (or the file itself)."""
    p = Path(path)
    p = p / "audit.json" if p.is_dir() else p
    try:
        data: dict[str, Any] = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FileNotFoundError(f"{path} is not an audit folder (no readable audit.json): "
                                f"{exc}") from exc
    if data.get("schema") != "clinfuse.audit/1":
        raise ValueError(f"{p} is not a clinfuse audit (schema {data.get('schema')!r})")
    return data


class AuditStore:
    """Audits kept as versioned folders under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def new_id(self, now: datetime | None = None) -> str:
        """The next audit id (``<UTC time>-v<n>``, n one more than the highest so far)."""
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        seq = max((int(p.name.rsplit("-v", 1)[1]) for p in self._dirs()), default=0) + 1
        return f"{stamp}-v{seq:04d}"

    def path(self, audit_id: str) -> Path:
        if not _ID.match(audit_id):
            raise KeyError(f"not an audit id: {audit_id!r} (expected like 20260101T120000Z-v0001)")
        return self.root / audit_id

    def _dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.is_dir() and _ID.match(p.name) and (p / "audit.json").exists())

    def list(self) -> list[dict[str, Any]]:
        """One summary per stored audit, oldest first."""
        out = []
        for p in self._dirs():
            rec = load_record(p)
            flags = [d for d in rec["results"]["disparities"] if d["flagged"]]
            out.append({"audit_id": rec["audit_id"], "created": rec["created"],
                        "run_by": rec["run_by"], "model_version": rec["model_version"],
                        "data_sha256": rec["data_fingerprint"]["sha256"],
                        "n_rows": rec["results"]["n_rows"], "n_flags": len(flags)})
        return out

    def get(self, audit_id: str) -> dict[str, Any]:
        p = self.path(audit_id)
        if not (p / "audit.json").exists():
            known = [d.name for d in self._dirs()]
            raise KeyError(f"no audit {audit_id!r} in {self.root}; stored: {known[-5:]}")
        return load_record(p)

    def latest(self) -> str | None:
        dirs = self._dirs()
        return dirs[-1].name if dirs else None

    def compare(self, a: str, b: str) -> dict[str, Any]:
        return compare_records(self.get(a), self.get(b))


def _metric_map(rec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(g["dimension"], g["group"]): g for g in rec["results"]["groups"]}


def _flag_keys(rec: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(d["dimension"], d["group"], d["comparison"]): d
            for d in rec["results"]["disparities"] if d["flagged"]}


def compare_records(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What changed from audit ``a`` to audit ``b``.

    Returns provenance changes, flags raised and cleared, and metric changes per
    group (single attributes and overall) whose intervals no longer overlap.
    """
    prov: dict[str, dict[str, Any]] = {}
    for field, get in (("model_version", lambda r: r["model_version"]),
                     ("data_window", lambda r: r["data_window"]),
                     ("data_sha256", lambda r: r["data_fingerprint"]["sha256"]),
                     ("threshold", lambda r: r["threshold"]["value"]),
                     ("sensitive", lambda r: r["results"]["sensitive"]),
                     ("rules", lambda r: r["results"]["rules"])):
        if get(a) != get(b):
            prov[field] = {"before": get(a), "after": get(b)}
    fa, fb = _flag_keys(a), _flag_keys(b)
    raised = [fb[k] for k in fb if k not in fa]
    cleared = [fa[k] for k in fa if k not in fb]
    ga, gb = _metric_map(a), _metric_map(b)
    changes = []
    for key in ga.keys() & gb.keys():
        x, y = ga[key], gb[key]
        if " x " in key[0]:
            continue
        if (x["status"] == "ok") != (y["status"] == "ok"):
            changes.append({"dimension": key[0], "group": key[1], "metric": "status",
                            "before": x["status"], "after": y["status"]})
            continue
        if x["status"] != "ok":
            continue
        for m in _COMPARED:
            u, v = x["metrics"].get(m, {}), y["metrics"].get(m, {})
            if u.get("value") is None or v.get("value") is None:
                continue
            separated = (u.get("upper") is not None and v.get("lower") is not None
                         and (v["lower"] > u["upper"] or v["upper"] < u["lower"]))
            changes.append({"dimension": key[0], "group": key[1], "metric": m,
                            "before": u["value"], "after": v["value"],
                            "change": v["value"] - u["value"], "intervals_separate": separated})
    changes.sort(key=lambda c: (not c.get("intervals_separate", True),
                                -abs(c.get("change", 0.0))))
    return {"before": a["audit_id"], "after": b["audit_id"], "provenance": prov,
            "flags_raised": raised, "flags_cleared": cleared,
            "flags_kept": [fb[k] for k in fb if k in fa], "metric_changes": changes}
