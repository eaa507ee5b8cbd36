"""The test suite's tiny multimodal service model, trained once per session.

A 200-patient synth cohort (8-slice 32x32 CTs, TF-IDF notes) and a model trained on
it; the service, CDS Hooks, process and dashboard tests all predict with it.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.explain import Explainer
from pipelines.manifest import read_manifest
from pipelines.scoring import load_model, main_score
from pipelines.synth import generate_cohort
from pipelines.training import train
from tests.pipelines.training_config import small_training_config


@dataclass(frozen=True)
class SynthModel:
    """A synth cohort, a model trained on it and the rows the tests predict for."""

    root: Path
    cohort: Path
    manifest: Path
    model: Path
    key: Path
    truth: pd.DataFrame

    def rows(self) -> list[int]:
        """Rows whose patient came by FHIR only (no HL7 v2) with every modality."""
        t = self.truth
        ok = ((t["hl7"] == 0) & (t["withheld_ehr"] == 0) & (t["withheld_imaging"] == 0)
              & (t["withheld_notes"] == 0))
        return [int(i) for i in np.flatnonzero(ok.to_numpy())]

    def frame(self) -> pd.DataFrame:
        return read_manifest(self.manifest).frame

    def bundle(self, row: int) -> dict[str, Any]:
        mrn = str(self.frame()["patient_id"].iloc[row]).split("|")[1]
        data: dict[str, Any] = json.loads((self.cohort / "fhir" / f"{mrn}.json").read_text())
        return data

    def series(self, row: int) -> list[bytes]:
        image = str(self.frame()["image"].iloc[row])
        return [p.read_bytes() for p in sorted((self.cohort / image).iterdir())]

    def index_time(self, row: int) -> datetime:
        ts: datetime = self.frame()["index_time"].iloc[row].to_pydatetime()
        return ts

    def one_row_manifest(self, row: int) -> Path:
        """The research manifest's row alone (images stay relative to the cohort)."""
        out = self.cohort / f"one-{row}.csv"
        if not out.exists():
            frame = pd.read_csv(self.manifest, dtype=str, keep_default_na=False)
            frame.iloc[[row]].to_csv(out, index=False)
            shutil.copyfile(self.manifest.with_suffix(".yaml"), out.with_suffix(".yaml"))
        return out

    def reference(self, row: int, tmp: Path) -> tuple[float, dict[str, Any]]:
        """(``clinfuse score``'s probability, the Explainer's document) for one row."""
        manifest = self.one_row_manifest(row)
        err = io.StringIO()
        scores = tmp / f"scores-{row}.csv"
        assert main_score(self.model, manifest, scores, trusted_keys=[self.key],
                          device="cpu", stderr=err) == 0, err.getvalue()
        probability = float(pd.read_csv(scores)["score"].iloc[0])
        explainer = Explainer(load_model(self.model, trusted_keys=[self.key], device="cpu"),
                              tmp / f"explain-cache-{row}")
        return probability, explainer.explain_row(read_manifest(manifest), 0)


def build_synth_model(root: Path) -> SynthModel:
    """The test suite's tiny multimodal model (8-slice 32x32 CTs, TF-IDF notes)."""
    generate_cohort(200, root / "cohort", seed=31, n_slices=8, size=32, workers=1)
    model = train(root / "cohort" / "manifest.csv", root / "model",
                  config=small_training_config(image_epochs=6), cache_dir=root / "train-cache")
    return SynthModel(root, root / "cohort", root / "cohort" / "manifest.csv", Path(model),
                      root / "model.key.pub", pd.read_csv(root / "cohort" / "truth.csv"))


