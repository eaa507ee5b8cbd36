"""clinfuse synth throughput: patients/s writing a full cohort (FHIR, HL7 v2, DICOM, manifest)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipelines.synth import generate_cohort


def run(quick: bool = False) -> dict[str, Any]:
    """Write a 1000-patient cohort (100 when ``quick``) at the default size into a temp dir."""
    n = 100 if quick else 1000
    with tempfile.TemporaryDirectory(prefix="clinfuse-synth-bench-") as tmp:
        s = generate_cohort(n, Path(tmp), seed=0, workers=2)
    return {
        "patients": n, "seed": 0, "workers": 2, "n_slices": 32, "size": 64,
        "seconds": round(s.seconds, 2), "patients_per_s": round(s.patients_per_s, 1),
        "megabytes": round(s.bytes_on_disk / 1e6, 1),
        "bayes_auroc_observable": round(s.bayes_auroc_observable, 3),
        "oracle_auroc": {k: round(v, 3) for k, v in s.oracle_auroc.items()},
        "summary": f"{s.patients_per_s:.1f} patients/s ({n} patients, "
                   f"{s.bytes_on_disk / 1e6:.0f} MB, 2 workers)",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2))
