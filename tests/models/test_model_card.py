"""Model cards from a small fake artifact: content, HTI-1 checklist, validation label."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from models.artifact import Artifact, load_artifact, save_artifact
from models.model_card import (
    NOT_REPORTED,
    NOT_VALIDATED_LABEL,
    SOURCE_ATTRIBUTES,
    write_model_card,
)
from tests.models.artifact_fakes import fake_config, fake_documents, fake_tensors


@pytest.fixture(scope="module")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _artifact(tmp_path: Path, key: Ed25519PrivateKey, **config: Any) -> Artifact:
    docs = fake_documents()
    docs["card"] = {"developer": {"name": "clinfuse project", "contact": "maintainers@example.org"},
                    "intended_users": ["ward physicians", "rapid response nurses"],
                    "limitations": ["Trained on one academic hospital."]}
    directory = save_artifact(tmp_path / "art", config=fake_config(**config),
                              tensors=fake_tensors(), documents=docs, signing_key=key)
    return load_artifact(directory, trusted_public_keys=[key.public_key()])


def _card(tmp_path: Path, key: Ed25519PrivateKey, **config: Any) -> tuple[str, dict[str, Any]]:
    md_path, json_path = write_model_card(_artifact(tmp_path, key, **config), tmp_path / "card")
    assert (md_path.name, json_path.name) == ("model_card.md", "model_card.json")
    return md_path.read_text(), json.loads(json_path.read_text())


def test_card_content(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    md, card = _card(tmp_path, signing_key)

    assert md.startswith("# Model card: deterioration-fusion 0.3.0")
    assert f"> **{NOT_VALIDATED_LABEL}**" in md.split("## Intended use")[0]  # before anything
    assert card["clinical_use"] == {"validated": False, "site": None, "date": None,
                                    "label": NOT_VALIDATED_LABEL}
    assert card["outcome"] == {"name": "deterioration", "horizon": "30 days",
                               "definition": "death or ICU transfer within 30 days of the "
                                             "index time"}
    assert "- **Population:** adult inpatients (age >= 18)" in md
    assert "- **Horizon:** 30 days" in md

    # age comes from the FHIR spec's include_age; race and sex are not inputs.
    demographic = card["inputs"]["demographic_inputs"]
    assert demographic["date_of_birth"] is True
    assert demographic["race"] is False and demographic["sex"] is False
    assert "| race (A)(5) | no |" in md and "| date of birth (A)(11) | yes |" in md

    perf = card["performance"]["internal_test"]
    assert perf["overall"] == {"n": 400, "auroc": 0.812, "brier": 0.101}
    assert perf["by_group"]["sex"]["female"]["auroc"] == 0.801
    assert perf["by_group"]["age band"]["65+"]["auroc"] == NOT_REPORTED  # NaN at save time
    assert perf["by_group"]["race"] == NOT_REPORTED
    assert "| overall | all | 400 | 0.812 | 0.101 |" in md
    assert "| sex | female | 210 | 0.801 | not reported |" in md
    assert "| race | - | not reported | not reported | not reported |" in md
    assert card["performance"]["external"]["overall"] == NOT_REPORTED

    assert card["training_data"]["fingerprint"] == "sha256:" + "ab" * 32
    assert card["training_data"]["membership"] == {"id_hash": "hmac-sha256",
                                                   "n_train_patients": 2}  # hashes not copied
    assert "Trained on one academic hospital." in card["limitations"]
    assert any("No external validation" in item for item in card["limitations"])
    assert any("Performance by race is not reported" in item for item in card["limitations"])


def test_card_lists_every_hti1_source_attribute(tmp_path: Path,
                                                signing_key: Ed25519PrivateKey) -> None:
    md, card = _card(tmp_path, signing_key)
    attrs = card["hti1_source_attributes"]
    assert list(attrs) == [key for key, *_ in SOURCE_ATTRIBUTES]
    assert sum(len(section["attributes"]) for section in attrs.values()) == 31
    assert attrs["cautioned_out_of_scope_use"]["title"] == (
        "Cautioned out-of-scope use of the intervention")
    quant = attrs["quantitative_performance"]["attributes"]
    assert quant["internal_validity"]["citation"] == "45 CFR 170.315(b)(11)(iv)(B)(7)(i)"
    assert quant["internal_validity"]["value"]["auroc"] == 0.812
    assert quant["external_validity"]["value"] == NOT_REPORTED
    details = attrs["details_and_output"]["attributes"]
    assert details["developer"]["value"]["contact"] == "maintainers@example.org"
    assert details["funding_source"]["value"] == NOT_REPORTED
    assert details["output_type"]["value"] == "prediction"
    purpose = attrs["purpose"]["attributes"]
    assert purpose["intended_users"]["value"] == ["ward physicians", "rapid response nurses"]
    assert attrs["fairness_process"]["attributes"]["fairness_approach"]["value"] == NOT_REPORTED
    assert "- **(4)(ii) Use of variables in paragraph (b)(11)(iv)(A)(5)-(13)" in md
    assert "### Update and continued validation or fairness assessment schedule" in md


def test_site_validation_lifts_the_label(tmp_path: Path,
                                         signing_key: Ed25519PrivateKey) -> None:
    md, card = _card(tmp_path, signing_key,
                     validated_by_site={"site": "St Elsewhere ICU", "date": "2026-05-01"},
                     demographic_inputs={"race": True})
    assert NOT_VALIDATED_LABEL not in md
    assert "Validated for clinical use at **St Elsewhere ICU** on 2026-05-01." in md
    assert card["clinical_use"]["validated"] is True
    assert card["inputs"]["demographic_inputs"]["race"] is True  # declared wins over names
    assert any("Race or ethnicity is an input" in item for item in card["limitations"])


@pytest.mark.parametrize("record", [{"site": "St Elsewhere"}, "yes", {"date": "2026-05-01"}])
def test_incomplete_validation_record_keeps_the_label(tmp_path: Path,
                                                      signing_key: Ed25519PrivateKey,
                                                      record: Any) -> None:
    md, card = _card(tmp_path, signing_key, validated_by_site=record)
    assert NOT_VALIDATED_LABEL in md and card["clinical_use"]["validated"] is False
