"""``clinfuse evaluate``: a trained artifact on a labelled manifest -> report.md/.json + plot.

Sections: overall metrics (AUROC, AUPRC, Brier, ECE with patient-bootstrap CIs),
the ablation table (the one fused model with modalities masked at inference),
the retrained no-image baseline against the fused model and against the fused
model with images withheld (paired patient-bootstrap AUROC differences), ECE by
missingness pattern, and a reliability diagram.

Before any of that the evaluation manifest's patients are checked against the
model's training patients (keyed hashes; the salt is ``<model>.salt``, the
training site's secret): an overlap is refused, since its metrics would be
optimistic.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from models.fusion import MODALITIES
from models.privacy import check_disjoint, hashed_ids
from pipelines.evaluation import (
    ablation_table,
    ece_by_missingness_pattern,
    evaluate,
    paired_auroc_difference,
    report_to_markdown,
)
from pipelines.manifest import read_manifest
from pipelines.model_inputs import ModelDataError
from pipelines.reliability import plot_reliability, reliability_curve
from pipelines.scoring import load_model
from pipelines.training import USER_ERRORS

__all__ = ["evaluate_model", "main_evaluate"]

log = logging.getLogger(__name__)


def _salt_for(model_dir: Path, salt_path: str | Path | None) -> bytes | None:
    path = Path(salt_path) if salt_path is not None else model_dir.with_name(
        model_dir.name + ".salt")
    if not path.is_file():
        return None
    return bytes.fromhex(path.read_text().strip())


def evaluate_model(model_dir: str | Path, manifest_path: str | Path, out_dir: str | Path, *,
                   n_boot: int = 1000, seed: int = 0,
                   trusted_keys: Sequence[str | Path] | None = None, device: str = "auto",
                   salt_path: str | Path | None = None, cache_dir: str | Path | None = None,
                   min_pattern_n: int = 100) -> dict[str, Any]:
    """Evaluate; writes ``report.md``, ``report.json`` and ``reliability.png`` to ``out_dir``.

    Raises
    ------
    PatientOverlapError
        A patient of the manifest was in the model's training data.
    ModelDataError, ManifestError, ArtifactError
        Unusable inputs.
    """
    model_dir = Path(model_dir)
    model = load_model(model_dir, trusted_keys=trusted_keys, device=device)
    manifest = read_manifest(manifest_path, strict=False)
    pids_all = manifest.frame["patient_id"].astype(str).to_numpy()
    warnings: list[str] = []
    salt = _salt_for(model_dir, salt_path)
    membership = (model.artifact.documents.get("training_data") or {}).get("membership") or {}
    if salt is not None and membership.get("train_patients") is not None:
        check_disjoint(membership["train_patients"], hashed_ids(sorted(set(pids_all)), salt))
    else:
        warnings.append("train/test patient overlap NOT checked: no salt file "
                        f"({model_dir.name}.salt) beside the model")
        log.warning(warnings[-1])
    with tempfile.TemporaryDirectory(prefix="clinfuse-eval-") as tmp:
        inputs = model.inputs(manifest, Path(cache_dir) if cache_dir else Path(tmp))
    rows = np.flatnonzero(inputs.in_population)
    if len(rows) == 0:
        raise ModelDataError(f"{manifest.path}: no row is in the model's population")
    y = manifest.frame["label"].to_numpy(int)[rows]
    pids = pids_all[rows]
    if len(np.unique(y)) < 2:
        raise ModelDataError(f"{manifest.path}: the scored rows have one class only; AUROC "
                             "needs both")
    mods = model.modalities
    availability = pd.DataFrame(inputs.available[rows][:, [MODALITIES.index(m) for m in mods]],
                                columns=list(mods))
    p = model.predict(inputs, rows)
    overall = evaluate(y, p, pids, n_boot=n_boot, seed=seed)
    sections: list[tuple[str, Any]] = [("Overall (fused model)", overall)]
    result: dict[str, Any] = {"overall": overall.to_dict(), "warnings": warnings,
                              "n_refused": int(len(inputs.in_population) - len(rows))}
    if len(mods) > 1:
        cache: dict[frozenset[str], np.ndarray] = {}

        def predict(subset: frozenset[str]) -> np.ndarray:
            if subset not in cache:
                cache[subset] = model.predict(inputs, rows, allowed=subset)
            return cache[subset]

        table = ablation_table(y, pids, predict, mods, availability, n_boot=n_boot, seed=seed)
        sections.append(("Ablation: modalities masked in the fused model", table))
        result["ablation"] = table.to_dict()
        base = model.predict_baseline(inputs, rows)
        if base is not None:
            no_image = predict(frozenset(mods) - {"image"})
            comparisons = {
                "fused vs retrained without image": paired_auroc_difference(
                    y, p, base, pids, n_boot=n_boot, seed=seed),
                "fused with image withheld vs retrained without image":
                    paired_auroc_difference(y, no_image, base, pids, n_boot=n_boot, seed=seed),
            }
            for name, diff in comparisons.items():
                sections.append((f"Paired AUROC: {name}", diff))
            result["baseline_comparisons"] = {k: v.to_dict() for k, v in comparisons.items()}
    patterns = ece_by_missingness_pattern(y, p, availability, pids, min_n=min_pattern_n,
                                          n_boot=n_boot, seed=seed)
    sections.append(("ECE by missingness pattern", patterns))
    result["ece_by_pattern"] = patterns.to_dict()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_reliability({"fused": reliability_curve(y, p)}, out / "reliability.png",
                     title=f"{model.config['model_name']} {model.config['model_version']}")
    cfg = model.config
    head = [f"# Evaluation of {cfg['model_name']} {cfg['model_version']}", "",
            f"Outcome: {cfg['outcome'].get('name')} ({cfg['outcome'].get('definition')}).",
            f"Manifest: `{manifest.path.name}`; {len(rows)} scored rows, "
            f"{result['n_refused']} refused (out of population or no input).", ""]
    head += [f"> Warning: {w}" for w in warnings]
    body = [f"## {title}\n\n{report_to_markdown(section)}" for title, section in sections]
    (out / "report.md").write_text("\n".join(head) + "\n\n" + "\n\n".join(body) + "\n\n"
                                   "![Reliability diagram](reliability.png)\n")
    result["model"] = {"name": cfg["model_name"], "version": cfg["model_version"]}
    (out / "report.json").write_text(json.dumps(result, indent=2, default=_json_default))
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, frozenset | set):
        return sorted(value)
    return str(value)


def main_evaluate(model: str | Path, manifest: str | Path, out_dir: str | Path,
                  n_boot: int = 1000, *, trusted_keys: Sequence[str | Path] | None = None,
                  device: str = "auto", seed: int = 0, stderr: TextIO | None = None) -> int:
    """CLI body of ``clinfuse evaluate``: 0 on success, 1 with a one-line reason otherwise."""
    stream = stderr if stderr is not None else sys.stderr
    try:
        evaluate_model(model, manifest, out_dir, n_boot=n_boot, seed=seed,
                       trusted_keys=trusted_keys, device=device)
    except (*USER_ERRORS, ModelDataError, ValueError) as exc:
        stream.write(f"clinfuse evaluate: {exc}\n")
        return 1
    stream.write(f"clinfuse evaluate: wrote {Path(out_dir) / 'report.md'}\n")
    return 0
