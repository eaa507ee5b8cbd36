"""``clinfuse explain``: one prediction with its explanation, as JSON and as FHIR.

For one manifest row (``--example``, or ``--patient``'s latest by index time):

- modality attribution: exact Shapley values over the modalities present
  (:mod:`models.shapley`);
- EHR features: SHAP values (:mod:`models.explain_tabular`) against the
  artifact's summarised background, shown with raw values, units and reference
  ranges;
- image: occlusion saliency, cached per series, with PNG overlays;
- notes: sentence occlusion at the pooling step over the cached sentence vectors;
- a template rationale and the model's validation label.

Everything is computed on the calibrated logit, where it adds up, and shown in
percentage points of risk (:mod:`models.points`). Written to ``out_dir``:
``explanation.json`` (the dashboard's), ``risk_assessment.json`` (FHIR R4,
validated) and the overlay PNGs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from fhir_adapters.risk_assessment import (
    BasisReference,
    OutcomeCoding,
    RiskAssessmentError,
    RiskAssessmentInput,
    build_risk_assessment,
)
from models.explain_tabular import describe_features, ehr_shap, group_by_column
from models.explain_trees import tree_ehr_shap
from models.points import format_points, sigmoid, to_points
from models.privacy import summarise_background
from models.shapley import modality_shapley
from pipelines.feature_spec import DEFAULT_SPEC, FeatureSpec
from pipelines.manifest import CohortManifest, read_manifest
from pipelines.note_attribution import attribute_sentences
from pipelines.saliency_overlay import cached_saliency
from pipelines.scoring import LoadedModel, load_model

__all__ = ["ExplainError", "Explainer", "explain", "main_explain", "select_row",
           "validation_label"]

log = logging.getLogger(__name__)

NOT_VALIDATED = "Not validated for clinical use"
SCALE_NOTE = ("Attributions are computed on the calibrated logit, where they add up exactly; "
              "they are shown as percentage points of risk (each one's share of the change "
              "from the baseline risk).")
_MODALITY_TEXT = {"image": "imaging", "ehr": "vital signs and labs", "note": "clinical notes"}


class ExplainError(ValueError):
    """The example cannot be explained; the message says why (no patient values)."""


def validation_label(config: dict[str, Any]) -> str:
    """The model's validation status; "Not validated ..." unless a site validated it."""
    site = config.get("site_validation") or {}
    if isinstance(site, dict) and site.get("validated") is True and site.get("site"):
        when = f" on {site['date']}" if site.get("date") else ""
        return f"Validated for clinical use at {site['site']}{when}"
    return NOT_VALIDATED


def select_row(manifest: CohortManifest, *, example_id: str | None = None,
               patient_id: str | None = None) -> int:
    """Row index of ``example_id``, or of ``patient_id``'s latest example by index time."""
    frame = manifest.frame
    if (example_id is None) == (patient_id is None):
        raise ExplainError("give exactly one of an example id or a patient id")
    if example_id is not None:
        if "example_id" not in frame:
            raise ExplainError(f"{manifest.path} has no example_id column; use a patient id")
        hits = np.flatnonzero(frame["example_id"].astype(str).to_numpy() == str(example_id))
        if not len(hits):
            raise ExplainError(f"example {example_id!r} is not in {manifest.path}")
        return int(hits[0])
    ids = frame["patient_id"].astype(str).to_numpy()
    hits = np.flatnonzero((ids == str(patient_id)) | np.char.endswith(
        ids.astype(str), f"|{patient_id}"))
    if not len(hits):
        raise ExplainError(f"patient {patient_id!r} is not in {manifest.path}")
    if "index_time" in frame and len(hits) > 1:
        times = pd.to_datetime(frame["index_time"].iloc[hits], utc=True, errors="coerce")
        return int(hits[int(np.argmax(times.fillna(pd.Timestamp.min.tz_localize("UTC"))
                                      .to_numpy()))])
    return int(hits[-1])


def _iso(value: object) -> str | None:
    """A manifest index time as ISO 8601 (``T`` separator, zone kept); None if blank."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value) == "":
        return None
    ts = pd.Timestamp(value)  # type: ignore[arg-type]
    return None if pd.isna(ts) else ts.isoformat()


def _one_row(manifest: CohortManifest, row: int) -> CohortManifest:
    return dataclasses.replace(manifest, frame=manifest.frame.iloc[[row]].reset_index(drop=True))


class Explainer:
    """A loaded model plus caches; :meth:`explain_row` explains one manifest row.

    Parameters
    ----------
    model : LoadedModel
    cache_dir : Path
        Image tensors, sentence vectors and saliency maps are cached here.
    """

    def __init__(self, model: LoadedModel, cache_dir: Path) -> None:
        self.model = model
        self.cache_dir = Path(cache_dir)
        self._backgrounds: dict[str, tuple[np.ndarray, str]] = {}
        state = model.artifact.tensors.get("fusion", {})
        h = hashlib.sha256()
        for name in sorted(state):
            h.update(name.encode())
            h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
        h.update(json.dumps(getattr(model, "image_hashes", [])).encode())
        self.model_key = h.hexdigest()[:16]

    # -- pieces ----------------------------------------------------------------------

    def background(self, manifest: CohortManifest) -> tuple[np.ndarray, str]:
        """The SHAP background: the artifact's centroids, else this cohort's (cached)."""
        docs = self.model.artifact.documents
        stored = docs.get("shap_background") if isinstance(docs, dict) else None
        if isinstance(stored, dict) and stored.get("centroids") is not None:
            return np.asarray(stored["centroids"], dtype=np.float64), "artifact"
        key = str(manifest.path)
        if key not in self._backgrounds:
            if self.model.scaler is None:
                raise ExplainError("the model has no EHR features to explain")
            scaled = self.model.scaler.transform(
                self.model.encoding.transform(manifest.frame, str(manifest.path)))
            k = min(16, max(1, len(scaled) // 5))
            centroids = summarise_background(scaled, k=k, min_cluster_size=min(5, len(scaled)))
            self._backgrounds[key] = (centroids, "cohort k-means centroids (the artifact "
                                                 "stores no summarised background)")
        return self._backgrounds[key]

    def _spec_features(self) -> list[dict[str, Any]]:
        source = self.model.config.get("feature_source") or {}
        spec = source.get("spec") if isinstance(source, dict) else None
        if isinstance(spec, dict) and spec.get("features"):
            return list(spec["features"])
        return list(DEFAULT_SPEC.to_dict()["features"])

    def _image(self, sub: CohortManifest, X: dict[str, np.ndarray], mask: np.ndarray,
               out_dir: Path | None, slope: float) -> dict[str, Any] | None:
        from pipelines.model_inputs import load_images

        m = self.model
        if m.image is None or m.preprocess is None or "image" not in m.modalities or \
                not mask[m.modalities.index("image")]:
            return None
        images = load_images(sub, np.array([0]), m.preprocess,
                             int(m.config["image"]["spatial_dims"]), self.cache_dir)
        if not images.keys:
            return None
        fusion, row_mask = m.fusion, mask.reshape(1, -1)
        encoders = m.image

        def score(batch: Any) -> np.ndarray:
            aux = np.mean([e.predict_logit(batch, device="cpu") for e in encoders], axis=0)
            n = len(aux)
            Xb = {k: np.repeat(v[:1], n, axis=0) for k, v in X.items()}
            Xb["image"] = aux.reshape(-1, 1).astype(np.float32)
            return np.asarray(fusion.predict_logit(Xb, np.repeat(row_mask, n, axis=0)))

        summary, folder = cached_saliency(self.cache_dir, images.keys[0], self.model_key,
                                          images.tensors[0].float(), score,
                                          points_per_logit=100 * slope)
        summary = dict(summary)
        summary["series"] = str(sub.image_paths()[0])
        if out_dir is not None:
            for entry in summary["overlays"]:
                shutil.copyfile(folder / entry["file"], out_dir / entry["file"])
        return summary

    def _notes(self, sub: CohortManifest, X: dict[str, np.ndarray], mask: np.ndarray,
               logit: float, base: float) -> dict[str, Any] | None:
        from pipelines.notes import NoteEmbedder

        m = self.model
        note = sub.notes()[0]
        if m.note_encoder is None or note is None or "note" not in m.modalities or \
                not mask[m.modalities.index("note")]:
            return None
        embedding = NoteEmbedder(m.note_encoder, self.cache_dir / "notes").embed(note)
        result = attribute_sentences(m.fusion, X, mask, embedding,
                                     to_points=lambda v: to_points(v, logit, base),
                                     boilerplate=getattr(m, "note_boilerplate", None))
        return result.to_dict()

    # -- the explanation -------------------------------------------------------------

    def explain_row(self, manifest: CohortManifest, row: int, out_dir: Path | None = None
                    ) -> dict[str, Any]:
        """The explanation of one manifest row, as the dashboard's JSON document."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        m = self.model
        sub = _one_row(manifest, row)
        frame = sub.frame
        inputs = m.inputs(sub, self.cache_dir)
        refusal = inputs.refusal[0]
        head = {"example_id": str(frame["example_id"].iloc[0]) if "example_id" in frame
                else None,
                "patient_id": str(frame["patient_id"].iloc[0]),
                "index_time": _iso(frame["index_time"].iloc[0]) if "index_time" in frame
                else None,
                "model": {"name": m.config.get("model_name"),
                          "version": m.config.get("model_version")},
                "validation_label": validation_label(m.config),
                "scale": SCALE_NOTE}
        if refusal is not None:
            raise ExplainError(f"the model refuses this example: {refusal}")
        X = {k: v[:1] for k, v in inputs.X.items() if k in m.modalities}
        mask = m.mask(inputs.available)[0]
        timings["inputs"] = time.perf_counter() - t0

        t = time.perf_counter()
        shap_mod = modality_shapley(m.fusion, X, mask)
        logit, base = shap_mod.logit, shap_mod.baseline_logit
        p, p0 = float(sigmoid(logit)), float(sigmoid(base))
        slope = (p - p0) / (logit - base) if abs(logit - base) > 1e-9 else p * (1 - p)
        mod_points = to_points(shap_mod.values, logit, base)
        modalities: list[dict[str, Any]] = [
            {"modality": name, "logit": float(v), "points": float(pt),
             "text": f"{_MODALITY_TEXT.get(name, name)}: {format_points(float(pt))}"}
            for name, v, pt in zip(shap_mod.modalities, shap_mod.values, mod_points,
                                   strict=True)]
        modalities.sort(key=lambda d: -abs(d["logit"]))
        timings["modalities"] = time.perf_counter() - t

        ehr: dict[str, Any] | None = None
        if "ehr" in m.modalities and mask[m.modalities.index("ehr")] and m.scaler is not None:
            t = time.perf_counter()
            bg, bg_source = self.background(manifest)
            raw = m.encoding.transform(frame, str(sub.path))[0]
            ensemble = getattr(getattr(m, "tabular_learner", None), "ensemble_", None)
            if ensemble is not None:
                # Boosted-tree EHR branch: exact TreeSHAP on the scaled columns, scaled by
                # the fused logit's (affine) slope in the trees' logit (models.explain_trees).
                es = tree_ehr_shap(m.fusion, ensemble, m.scaler.transform(raw[None, :]), X,
                                   mask)
                bg_source, bg = "the trees' training cover (path-dependent TreeSHAP)", \
                    np.zeros((0, 0))
            else:
                es = ehr_shap(m.fusion, X, mask, bg)
            columns = m.encoding.columns
            per_column = group_by_column(es.values, len(columns), m.scaler.indicator_)
            pts = to_points(per_column, es.fx, es.base_value)
            features = describe_features(columns, raw, per_column, pts, self._spec_features())
            by_feature: dict[str, float] = {}
            for f in features:
                by_feature[f.feature] = by_feature.get(f.feature, 0.0) + f.points
            name = {"exact": "ExactExplainer", "tree": "TreeExplainer"}.get(
                es.method, "PermutationExplainer")
            ehr = {"method": f"shap.{name} on the fused calibrated logit",
                   "background": bg_source, "n_background": len(bg),
                   "base_logit": es.base_value, "logit": es.fx,
                   "additivity_error": es.additivity_error,
                   "top_features": [f.to_dict() for f in features[:10]],
                   "by_feature_points": dict(sorted(by_feature.items(),
                                                    key=lambda kv: -abs(kv[1]))),
                   "all_columns_logit": {f.column: f.logit for f in features}}
            timings["ehr"] = time.perf_counter() - t

        t = time.perf_counter()
        image = self._image(sub, X, mask, out_dir, slope)
        timings["image"] = time.perf_counter() - t
        t = time.perf_counter()
        notes = self._notes(sub, X, mask, logit, base)
        timings["notes"] = time.perf_counter() - t

        explanation = {
            **head,
            "risk": {"probability": p, "calibrated_logit": logit, "baseline_probability": p0,
                     "baseline_logit": base},
            "modalities": modalities,
            "modality_additivity_error": shap_mod.additivity_error,
            "ehr": ehr, "image": image, "notes": notes,
        }
        explanation["rationale"] = rationale(explanation, m.config.get("outcome") or {})
        timings["total"] = time.perf_counter() - t0
        explanation["timings_ms"] = {k: round(1000 * v, 2) for k, v in timings.items()}
        return explanation


# --------------------------------------------------------------------- rationale


def rationale(explanation: dict[str, Any], outcome: dict[str, Any]) -> str:
    """A short plain-language summary assembled from the attributions (templates only)."""
    risk = explanation["risk"]
    name = outcome.get("name") or "the outcome"
    horizon = outcome.get("horizon_days")
    within = f" within {horizon:g} days" if isinstance(horizon, int | float) else ""
    parts = [f"Predicted risk of {name}{within}: {100 * risk['probability']:.0f}% "
             f"(baseline {100 * risk['baseline_probability']:.0f}%)."]
    up = [d for d in explanation["modalities"] if d["points"] > 0]
    down = [d for d in explanation["modalities"] if d["points"] < 0]
    if up:
        parts.append("Raised by " + ", ".join(d["text"] for d in up) + ".")
    if down:
        parts.append("Lowered by " + ", ".join(d["text"] for d in down) + ".")
    ehr = explanation.get("ehr")
    if ehr and ehr["top_features"]:
        parts.append("Top EHR findings: " + "; ".join(f["text"] for f in ehr["top_features"][:3])
                     + ".")
    notes = explanation.get("notes")
    note_part = _note_rationale(notes, explanation["modalities"])
    if note_part:
        parts.append(note_part)
    image = explanation.get("image")
    if image and image.get("top_slices"):
        shape = image.get("shape") or []
        where = (f"slice {image['top_slices'][0] + 1} of {shape[-1]}" if len(shape) == 3
                 else "the image")
        parts.append(f"Imaging: strongest attribution in {where}.")
    parts.append(explanation["validation_label"] + ".")
    return " ".join(parts)


#: Notes moving the risk by at least this many percentage points must be explained by a
#: cited sentence, or the rationale says that no sentence qualifies.
MATERIAL_NOTE_POINTS = 1.0


def _note_rationale(notes: dict[str, Any] | None, modalities: list[dict[str, Any]]
                    ) -> str | None:
    """The notes' sentence of the rationale.

    Cites only what :func:`pipelines.note_evidence.select_evidence` made citable (never
    a negated or boilerplate sentence), in the direction the notes moved the risk. When
    the notes moved it materially and no sentence qualifies, says so instead of citing
    nothing.
    """
    if not notes:
        return None
    points = sum(float(d["points"]) for d in modalities if d["modality"] == "note")
    citable = notes.get("citable_raising" if points >= 0 else "citable_lowering") or []
    if citable:
        top = citable[0]
        return f'Note: "{top["sentence"]}" ({format_points(top["points"])}).'
    if abs(points) >= MATERIAL_NOTE_POINTS:
        direction = "raised" if points > 0 else "lowered"
        return (f"Notes {direction} the risk ({format_points(points)}), but no single note "
                "sentence qualifies as evidence (negated findings and template sentences "
                "are never cited).")
    return None


# ------------------------------------------------------------------------ FHIR


def _bundle_basis(manifest: CohortManifest, patient_id: str, index_time: str | None,
                  window_hours: float) -> tuple[str | None, list[BasisReference]]:
    """(Patient reference, basis) from the patient's FHIR Bundle beside the manifest, if any."""
    mrn = patient_id.split("|")[-1]
    path = manifest.root / "fhir" / f"{mrn}.json"
    if not path.is_file():
        return None, []
    bundle = json.loads(path.read_text())
    end = pd.Timestamp(index_time) if index_time else None
    start = end - timedelta(hours=window_hours) if end is not None else None
    codes = {c for f in DEFAULT_SPEC.features for c in f.loinc}
    patient_ref = None
    out: list[BasisReference] = []
    for entry in bundle.get("entry", []):
        res = entry.get("resource", {})
        kind, rid = res.get("resourceType"), res.get("id")
        when = res.get("effectiveDateTime") or res.get("date") or res.get("started")
        ts = pd.Timestamp(when) if when else None
        in_time = end is None or ts is None or ts <= end
        if kind == "Patient":
            patient_ref = f"Patient/{rid}"
        elif kind == "Observation" and in_time and (start is None or ts is None or ts >= start):
            if any(c.get("code") in codes for c in res.get("code", {}).get("coding", [])):
                out.append(BasisReference("Observation", reference=f"Observation/{rid}"))
        elif kind == "DocumentReference" and in_time:
            out.append(BasisReference("DocumentReference", reference=f"DocumentReference/{rid}"))
        elif kind == "ImagingStudy" and in_time:
            out.append(BasisReference("ImagingStudy", reference=f"ImagingStudy/{rid}"))
    return patient_ref, out


def build_fhir(explanation: dict[str, Any], manifest: CohortManifest, row: int,
               model: LoadedModel) -> dict[str, Any]:
    """The validated RiskAssessment for an explanation."""
    cfg = model.config
    outcome = dict(manifest.outcome or {})
    outcome.update({k: v for k, v in (cfg.get("outcome") or {}).items() if v is not None})
    coding = outcome.get("coding") or {}
    codings = [OutcomeCoding(str(c["code"]), str(c.get("display", "")),
                             str(c.get("system", "http://snomed.info/sct")))
               for c in (coding.values() if isinstance(coding, dict) else coding)
               if isinstance(c, dict) and c.get("code")]
    pid = explanation["patient_id"]
    spec = (cfg.get("feature_source") or {}).get("spec")
    lookback = FeatureSpec.from_dict(spec).lookback_hours if spec else 72.0
    patient_ref, basis = _bundle_basis(manifest, pid, explanation["index_time"], lookback)
    present = {d["modality"] for d in explanation["modalities"]}
    # Only what the prediction used: a modality the model ignored is not its basis.
    used = {"Observation": "ehr", "DocumentReference": "note", "ImagingStudy": "image"}
    basis = [b for b in basis if used.get(b.resource_type) in present]
    if not any(b.resource_type == "ImagingStudy" for b in basis) and "image" in present:
        image = manifest.image_paths()[row]
        basis.append(BasisReference("ImagingStudy", display=f"image {image.name if image else ''}"))
    if not any(b.resource_type == "DocumentReference" for b in basis) and "note" in present:
        basis.append(BasisReference("DocumentReference", display="clinical note in the manifest"))
    if not any(b.resource_type == "Observation" for b in basis) and "ehr" in present:
        basis.append(BasisReference("Observation",
                                    display="vital signs and labs in the manifest row"))
    system, _, value = pid.rpartition("|")
    occurrence = explanation["index_time"] or datetime.now().astimezone().isoformat()
    return build_risk_assessment(RiskAssessmentInput(
        subject=patient_ref or "", subject_identifier=(system or None, value),
        occurrence=occurrence, probability=explanation["risk"]["probability"],
        model_name=str(cfg.get("model_name")), model_version=str(cfg.get("model_version")),
        outcome_text=str(outcome.get("definition") or outcome.get("name") or "outcome"),
        outcome_codings=codings, horizon_days=outcome.get("horizon_days"),
        rationale=explanation["rationale"], basis=basis,
        identifier=explanation.get("example_id"),
        extra_notes=(explanation["validation_label"],)))


# ------------------------------------------------------------------------ entry


def explain(model_dir: str | Path, manifest: str | Path | CohortManifest, out_dir: str | Path,
            *, example_id: str | None = None, patient_id: str | None = None,
            trusted_keys: Sequence[str | Path] | None = None, device: str = "cpu",
            cache_dir: str | Path | None = None,
            explainer: Explainer | None = None) -> dict[str, Any]:
    """Explain one example; write explanation.json, risk_assessment.json and overlays.

    Returns the explanation document (with ``risk_assessment`` added).
    """
    man = manifest if isinstance(manifest, CohortManifest) else read_manifest(manifest)
    row = select_row(man, example_id=example_id, patient_id=patient_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="clinfuse-explain-") as tmp:
        if explainer is None:
            model = load_model(model_dir, trusted_keys=trusted_keys, device=device)
            explainer = Explainer(model, Path(cache_dir) if cache_dir is not None else Path(tmp))
        explanation = explainer.explain_row(man, row, out)
        risk_assessment = build_fhir(explanation, man, row, explainer.model)
    (out / "explanation.json").write_text(json.dumps(explanation, indent=1, default=float))
    (out / "risk_assessment.json").write_text(json.dumps(risk_assessment, indent=1))
    return {**explanation, "risk_assessment": risk_assessment}


def main_explain(model: str | Path, manifest: str | Path, out_dir: str | Path, *,
                 example_id: str | None = None, patient_id: str | None = None,
                 trusted_keys: Sequence[str | Path] | None = None, device: str = "cpu",
                 cache_dir: str | Path | None = None, stderr: TextIO | None = None) -> int:
    """CLI body of ``clinfuse explain``: 0 on success, 1 with a one-line reason otherwise."""
    from pipelines.model_inputs import ModelDataError
    from pipelines.training import USER_ERRORS

    stream = stderr if stderr is not None else sys.stderr
    try:
        result = explain(model, manifest, out_dir, example_id=example_id,
                         patient_id=patient_id, trusted_keys=trusted_keys, device=device,
                         cache_dir=cache_dir)
    except (*USER_ERRORS, ModelDataError, ExplainError, RiskAssessmentError, ValueError) as exc:
        stream.write(f"clinfuse explain: {exc}\n")
        return 1
    stream.write(f"clinfuse explain: wrote {Path(out_dir) / 'explanation.json'} and "
                 f"risk_assessment.json (risk {100 * result['risk']['probability']:.0f}%)\n")
    return 0
