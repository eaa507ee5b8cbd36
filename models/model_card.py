"""Model cards (Markdown + JSON) from a loaded artifact.

The checklist is the ONC HTI-1 list of source attributes for predictive
decision support interventions, 45 CFR 170.315(b)(11)(iv)(B)(1)-(9); the JSON
card holds one entry per attribute, under the regulation's own wording, so a
reviewer can tick them off. Anything the artifact does not say is written as
"not reported" rather than guessed.

What the card reads (all optional except the config keys :func:`save_artifact`
already requires):

* ``config``: model name/version, ``outcome`` (``name``, ``definition``,
  ``horizon_days``), ``population``, ``input_modalities``, ``feature_source``,
  ``decision_thresholds``, ``note_encoder``; ``validated_by_site``
  (``{"site": ..., "date": ...}``) lifts the not-validated label;
  ``demographic_inputs`` (attribute -> bool) overrides inference from feature names.
* ``documents["card"]``: narrative fields: ``developer`` (``name``, ``contact``),
  ``funding_source``, ``intended_use``, ``intended_users``, ``decision_role``,
  ``out_of_scope``, ``limitations``, ``inclusion_criteria``,
  ``exclusion_criteria``, ``demographic_representativeness``,
  ``training_data_relevance``, ``fairness_approach``, ``bias_mitigation``,
  ``external_validation`` (``data_source``, ``party``,
  ``demographic_representativeness``, ``process``), ``outcome_evaluations``,
  ``validity_monitoring``, ``fairness_monitoring``, ``update_process``,
  ``correction_frequency``.
* ``documents["feature_spec"]``: a :class:`pipelines.feature_spec.FeatureSpec`
  dict, or ``{"columns": [...]}`` for manifest features.
* ``documents["metrics"]``: ``{"overall": {metric: value}, "by_group": {"sex":
  {group: {metric: value}}, "age_band": ..., "race": ...}}`` for the internal test
  set; optional ``"external"`` and ``"local"`` entries of the same shape. A value
  may be a number or ``{"estimate", "ci_low", "ci_high"}``.
* ``documents["training_data"]``: the training-data fingerprint (summary
  fields; hashed membership lists are counted, not copied).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from models.artifact import Artifact
from models.fusion_crossfit import describe_crossfit
from models.fusion_simplify import describe_comparison
from models.note_learner import describe_choice as describe_note_choice
from models.tabular_learner import describe_choice

__all__ = [
    "DEMOGRAPHIC_ATTRIBUTES",
    "NOT_REPORTED",
    "NOT_VALIDATED_LABEL",
    "SOURCE_ATTRIBUTES",
    "build_model_card",
    "render_markdown",
    "write_model_card",
]

NOT_VALIDATED_LABEL: Final = "NOT VALIDATED FOR CLINICAL USE"
NOT_REPORTED: Final = "not reported"
CARD_SCHEMA: Final = "clinfuse-model-card/1"
_CFR: Final = "45 CFR 170.315(b)(11)(iv)(B)"

#: (key, paragraph, title, ((key, paragraph, title), ...)) in regulation order.
SOURCE_ATTRIBUTES: Final[tuple[tuple[str, str, str, tuple[tuple[str, str, str], ...]], ...]] = (
    ("details_and_output", "(1)", "Details and output of the intervention", (
        ("developer", "(1)(i)", "Name and contact information for the intervention developer"),
        ("funding_source", "(1)(ii)", "Funding source of the technical implementation for "
         "the intervention(s) development"),
        ("output_value", "(1)(iii)", "Description of value that the intervention produces "
         "as an output"),
        ("output_type", "(1)(iv)", "Whether the intervention output is a prediction, "
         "classification, recommendation, evaluation, analysis, or other type of output"),
    )),
    ("purpose", "(2)", "Purpose of the intervention", (
        ("intended_use", "(2)(i)", "Intended use of the intervention"),
        ("intended_patient_population", "(2)(ii)", "Intended patient population(s) for the "
         "intervention's use"),
        ("intended_users", "(2)(iii)", "Intended user(s)"),
        ("intended_decision_role", "(2)(iv)", "Intended decision-making role for which the "
         "intervention was designed to be used/for (e.g., informs, augments, replaces "
         "clinical management)"),
    )),
    ("cautioned_out_of_scope_use", "(3)", "Cautioned out-of-scope use of the intervention", (
        ("out_of_scope", "(3)(i)", "Description of tasks, situations, or populations where a "
         "user is cautioned against applying the intervention"),
        ("known_risks_and_limitations", "(3)(ii)", "Known risks, inappropriate settings, "
         "inappropriate uses, or known limitations"),
    )),
    ("development_details_and_input_features", "(4)",
     "Intervention development details and input features", (
        ("inclusion_exclusion_criteria", "(4)(i)", "Exclusion and inclusion criteria that "
         "influenced the training data set"),
        ("demographic_input_features", "(4)(ii)", "Use of variables in paragraph "
         "(b)(11)(iv)(A)(5)-(13) as input features"),
        ("demographic_representativeness", "(4)(iii)", "Description of demographic "
         "representativeness according to variables in paragraph (b)(11)(iv)(A)(5)-(13) "
         "including, at a minimum, those used as input features in the intervention"),
        ("training_data_relevance", "(4)(iv)", "Description of relevance of training data to "
         "intended deployed setting"),
    )),
    ("fairness_process", "(5)", "Process used to ensure fairness in development of the "
     "intervention", (
        ("fairness_approach", "(5)(i)", "Description of the approach the intervention "
         "developer has taken to ensure that the intervention's output is fair"),
        ("bias_mitigation", "(5)(ii)", "Description of approaches to manage, reduce, or "
         "eliminate bias"),
    )),
    ("external_validation_process", "(6)", "External validation process", (
        ("external_data_source", "(6)(i)", "Description of the data source, clinical setting, "
         "or environment where an intervention's validity and fairness has been assessed, "
         "other than the source of training and testing data"),
        ("external_testing_party", "(6)(ii)", "Party that conducted the external testing"),
        ("external_demographic_representativeness", "(6)(iii)", "Description of demographic "
         "representativeness of external data according to variables in paragraph "
         "(b)(11)(iv)(A)(5)-(13) including, at a minimum, those used as input features in the "
         "intervention"),
        ("external_validation_description", "(6)(iv)", "Description of external validation "
         "process"),
    )),
    ("quantitative_performance", "(7)", "Quantitative measures of performance", (
        ("internal_validity", "(7)(i)", "Validity of intervention in test data derived from "
         "the same source as the initial training data"),
        ("internal_fairness", "(7)(ii)", "Fairness of intervention in test data derived from "
         "the same source as the initial training data"),
        ("external_validity", "(7)(iii)", "Validity of intervention in data external to or "
         "from a different source than the initial training data"),
        ("external_fairness", "(7)(iv)", "Fairness of intervention in data external to or "
         "from a different source than the initial training data"),
        ("outcome_evaluations", "(7)(v)", "References to evaluation of use of the "
         "intervention on outcomes, including, bibliographic citations or hyperlinks to "
         "evaluations of how well the intervention reduced morbidity, mortality, length of "
         "stay, or other outcomes"),
    )),
    ("ongoing_maintenance", "(8)", "Ongoing maintenance of intervention implementation and "
     "use", (
        ("validity_monitoring", "(8)(i)", "Description of process and frequency by which the "
         "intervention's validity is monitored over time"),
        ("local_validity", "(8)(ii)", "Validity of intervention in local data"),
        ("fairness_monitoring", "(8)(iii)", "Description of the process and frequency by "
         "which the intervention's fairness is monitored over time"),
        ("local_fairness", "(8)(iv)", "Fairness of intervention in local data"),
    )),
    ("update_schedule", "(9)", "Update and continued validation or fairness assessment "
     "schedule", (
        ("update_process", "(9)(i)", "Description of process and frequency by which the "
         "intervention is updated"),
        ("correction_frequency", "(9)(ii)", "Description of frequency by which the "
         "intervention's performance is corrected when risks related to validity and "
         "fairness are identified"),
    )),
)

#: 45 CFR 170.315(b)(11)(iv)(A)(5)-(13), with the feature-name words that reveal each.
DEMOGRAPHIC_ATTRIBUTES: Final[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
    ("race", "(A)(5)", ("race",)),
    ("ethnicity", "(A)(6)", ("ethnicity", "hispanic")),
    ("language", "(A)(7)", ("language",)),
    ("sexual_orientation", "(A)(8)", ("orientation",)),
    ("gender_identity", "(A)(9)", ("gender",)),
    ("sex", "(A)(10)", ("sex", "female", "male")),
    ("date_of_birth", "(A)(11)", ("age", "birth", "dob")),
    ("social_determinants_of_health", "(A)(12)",
     ("sdoh", "housing", "homeless", "income", "education", "employment", "insurance",
      "zip", "deprivation", "food")),
    ("health_status_assessments", "(A)(13)", ("assessment", "functional", "frailty", "phq")),
)

_GROUP_ALIASES: Final = {
    "sex": ("sex",),
    "age band": ("age_band", "age_group", "age"),
    "race": ("race", "race_ethnicity"),
}
_METRIC_ORDER: Final = ("n", "prevalence", "auroc", "auprc", "brier", "calibration_slope",
                        "calibration_intercept", "ece")


def build_model_card(artifact: Artifact) -> dict[str, Any]:
    """The card as a JSON-ready dict: summary sections plus every HTI-1 source attribute."""
    cfg, docs = artifact.config, artifact.documents
    narrative: Mapping[str, Any] = _mapping(docs.get("card"))
    metrics: Mapping[str, Any] = _mapping(docs.get("metrics"))
    outcome = _mapping(cfg.get("outcome"))
    validation = _site_validation(cfg.get("validated_by_site"))
    features = _input_features(docs.get("feature_spec"))
    demographic = _demographic_inputs(cfg, features)
    horizon = outcome.get("horizon_days")
    horizon_text = f"{horizon} days" if horizon is not None else NOT_REPORTED
    population = cfg.get("population", NOT_REPORTED)

    intended_use = narrative.get("intended_use") or (
        f"Estimate the probability of {outcome.get('name', 'the outcome')} within "
        f"{horizon_text} for {_text(population)}, to support (not replace) clinical judgement.")
    internal = _performance(metrics)
    external = _performance(_mapping(metrics.get("external")))
    local = _performance(_mapping(metrics.get("local")))
    ext_narr = _mapping(narrative.get("external_validation"))
    limitations = _limitations(cfg, narrative, internal, external, demographic)
    training = _training_summary(_mapping(docs.get("training_data")))

    values: dict[str, Any] = {
        "developer": narrative.get("developer"),
        "funding_source": narrative.get("funding_source"),
        "output_value": (f"Calibrated probability (0-1) of {outcome.get('name', 'the outcome')}"
                         f" within {horizon_text}"
                         + (", with feature attributions" if "shap_background" in docs else "")
                         + f"; decision thresholds: {_text(cfg.get('decision_thresholds'))}."),
        "output_type": "prediction",
        "intended_use": intended_use,
        "intended_patient_population": population,
        "intended_users": narrative.get("intended_users"),
        "intended_decision_role": narrative.get("decision_role", "informs"),
        "out_of_scope": narrative.get("out_of_scope"),
        "known_risks_and_limitations": limitations,
        "inclusion_exclusion_criteria": _drop_none({
            "inclusion": narrative.get("inclusion_criteria"),
            "exclusion": narrative.get("exclusion_criteria")}) or None,
        "demographic_input_features": demographic,
        "demographic_representativeness": narrative.get("demographic_representativeness")
        or training.get("demographics"),
        "training_data_relevance": narrative.get("training_data_relevance"),
        "fairness_approach": narrative.get("fairness_approach"),
        "bias_mitigation": narrative.get("bias_mitigation"),
        "external_data_source": ext_narr.get("data_source"),
        "external_testing_party": ext_narr.get("party"),
        "external_demographic_representativeness": ext_narr.get(
            "demographic_representativeness"),
        "external_validation_description": ext_narr.get("process"),
        "internal_validity": internal["overall"],
        "internal_fairness": internal["by_group"],
        "external_validity": external["overall"],
        "external_fairness": external["by_group"],
        "outcome_evaluations": narrative.get("outcome_evaluations"),
        "validity_monitoring": narrative.get("validity_monitoring"),
        "local_validity": local["overall"],
        "fairness_monitoring": narrative.get("fairness_monitoring"),
        "local_fairness": local["by_group"],
        "update_process": narrative.get("update_process"),
        "correction_frequency": narrative.get("correction_frequency"),
    }
    attributes = {
        key: {
            "citation": f"{_CFR}{para}",
            "title": title,
            "attributes": {
                sub: {"citation": f"{_CFR}{sub_para}", "title": sub_title,
                      "value": _reported(values[sub])}
                for sub, sub_para, sub_title in subs
            },
        }
        for key, para, title, subs in SOURCE_ATTRIBUTES
    }
    return {
        "schema": CARD_SCHEMA,
        "model": {
            "name": cfg.get("model_name"), "version": cfg.get("model_version"),
            "created_at": cfg.get("created_at"), "clinfuse_version": cfg.get("clinfuse_version"),
            "artifact_format_version": cfg.get("artifact_format_version"),
            "signing_key_fingerprint": artifact.public_key_fingerprint or NOT_REPORTED,
        },
        "clinical_use": validation,
        "intended_use": intended_use,
        "outcome": {"name": outcome.get("name", NOT_REPORTED),
                    "definition": outcome.get("definition", NOT_REPORTED),
                    "horizon": horizon_text},
        "population": _reported(population),
        "inputs": {
            "modalities": list(cfg.get("input_modalities", [])),
            "feature_source": cfg.get("feature_source"),
            "note_encoder": _reported(cfg.get("note_encoder")),
            "image_network": _image_network(cfg),
            "n_tabular_features": len(features) if features is not None else NOT_REPORTED,
            # Issue 18: which EHR learner inner CV chose, with each candidate's scores.
            "tabular_learner": _reported(cfg.get("tabular_learner")),
            "tabular_learner_text": describe_choice(cfg.get("tabular_learner")),
            # Issue 18: which note representation inner CV chose (MiniLM or TF-IDF).
            "note_learner": _reported(cfg.get("note_learner")),
            "note_learner_text": (describe_note_choice(cfg.get("note_learner"))
                                  if cfg.get("note_learner") else NOT_REPORTED),
            # Issue 18: small cohorts cross-fit the fusion head (models.fusion_crossfit).
            "fusion_head": _reported(cfg.get("fusion_crossfit")),
            "fusion_head_text": describe_crossfit(cfg.get("fusion_crossfit")),
            "demographic_inputs": demographic,
        },
        "decision_thresholds": cfg.get("decision_thresholds"),
        # Issue 18: the inner-CV comparison of the fused head with simpler heads.
        "baseline_comparison": _reported(cfg.get("fusion_simplification")),
        "training_data": training,
        "performance": {"internal_test": internal, "external": external, "local": local},
        "limitations": limitations,
        "hti1_source_attributes": attributes,
    }


def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown, for people; the JSON form is for tools."""
    model, use = card["model"], card["clinical_use"]
    out: list[str] = [f"# Model card: {model['name']} {model['version']}", ""]
    if use["validated"]:
        out += [f"Validated for clinical use at **{use['site']}** on {use['date']}.", ""]
    else:
        out += [f"> **{NOT_VALIDATED_LABEL}**", ">",
                "> No site has recorded a local validation of this model (config "
                "`validated_by_site`). Use it for research only.", ""]
    outcome = card["outcome"]
    out += [
        "## Intended use", "", str(card["intended_use"]), "",
        f"- **Outcome:** {outcome['name']}: {outcome['definition']}",
        f"- **Horizon:** {outcome['horizon']}",
        f"- **Population:** {_text(card['population'])}",
        f"- **Decision thresholds:** {_text(card['decision_thresholds'])}", "",
        "## Inputs", "",
        f"- **Modalities:** {', '.join(card['inputs']['modalities']) or NOT_REPORTED}",
        f"- **Feature source:** {_text(card['inputs']['feature_source'])}",
        f"- **Note encoder:** {card['inputs']['note_encoder']}",
        f"- **Image network:** {_text(card['inputs'].get('image_network', NOT_REPORTED))}",
        f"- **Tabular features:** {card['inputs']['n_tabular_features']}",
        f"- **Tabular learner:** {card['inputs'].get('tabular_learner_text', NOT_REPORTED)}",
        f"- **Note learner:** {card['inputs'].get('note_learner_text', NOT_REPORTED)}",
        f"- **Fusion head:** {card['inputs'].get('fusion_head_text', NOT_REPORTED)}",
        "",
        "| Attribute (45 CFR 170.315(b)(11)(iv)) | Used as input |", "|---|---|",
    ]
    for attr, para, _ in DEMOGRAPHIC_ATTRIBUTES:
        out.append(f"| {attr.replace('_', ' ')} {para} | "
                   f"{_yes_no(card['inputs']['demographic_inputs'][attr])} |")
    out += ["", "## Baseline comparison", "",
            *describe_comparison(_mapping(card.get("baseline_comparison"))), ""]
    out += ["", "## Training data", ""]
    out += [f"- **{k.replace('_', ' ')}:** {_text(v)}" for k, v in card["training_data"].items()]
    out += ["", "## Performance", ""]
    for label, key in (("Internal test set", "internal_test"), ("External data", "external"),
                       ("Local data", "local")):
        out += [f"### {label}", "", *_performance_table(card["performance"][key]), ""]
    out += ["## Limitations", "", *[f"- {item}" for item in card["limitations"]], ""]
    out += ["## HTI-1 source attributes", "",
            "Predictive DSI source attributes, 45 CFR 170.315(b)(11)(iv)(B).", ""]
    for section in card["hti1_source_attributes"].values():
        out += [f"### {section['title']}", ""]
        for attr in section["attributes"].values():
            para = attr["citation"].removeprefix(_CFR)
            out.append(f"- **{para} {attr['title']}:** {_text(attr['value'])}")
        out.append("")
    return "\n".join(out)


def write_model_card(artifact: Artifact, out_dir: Path) -> tuple[Path, Path]:
    """Write ``model_card.md`` and ``model_card.json`` to ``out_dir``; return their paths.

    ``out_dir`` should not be the artifact directory: the artifact holds only
    the files its manifest lists.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = build_model_card(artifact)
    md_path, json_path = out_dir / "model_card.md", out_dir / "model_card.json"
    md_path.write_text(render_markdown(card), encoding="utf-8")
    json_path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return md_path, json_path


# --------------------------------------------------------------------------- helpers

def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _reported(value: Any) -> Any:
    return NOT_REPORTED if value is None or value == "" or value == [] or value == {} else value


def _text(value: Any) -> str:
    if value is None:
        return NOT_REPORTED
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "; ".join(_text(v) for v in value) or NOT_REPORTED
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_text(v)}" for k, v in value.items()) or NOT_REPORTED
    return str(value)


def _yes_no(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _site_validation(record: Any) -> dict[str, Any]:
    # Both fields, or it does not count: a label-lifting record must say who and when.
    if isinstance(record, Mapping) and record.get("site") and record.get("date"):
        return {"validated": True, "site": str(record["site"]), "date": str(record["date"]),
                "label": None}
    return {"validated": False, "site": None, "date": None, "label": NOT_VALIDATED_LABEL}


def _input_features(spec: Any) -> list[str] | None:
    """Tabular input column names from a feature-spec document, or None if unknown."""
    if not isinstance(spec, Mapping):
        return None
    if isinstance(spec.get("columns"), list):
        return [str(c) for c in spec["columns"]]
    if isinstance(spec.get("features"), list):
        names = [str(f.get("name")) if isinstance(f, Mapping) else str(f)
                 for f in spec["features"]]
        # FeatureSpec adds age from the birth date when include_age is set.
        return (["age_years"] if spec.get("include_age", False) else []) + names
    return None


def _demographic_inputs(cfg: Mapping[str, Any], features: list[str] | None) -> dict[str, Any]:
    declared = _mapping(cfg.get("demographic_inputs"))
    result: dict[str, Any] = {}
    for attr, _, words in DEMOGRAPHIC_ATTRIBUTES:
        if attr in declared:
            result[attr] = bool(declared[attr])
        elif features is None:
            result[attr] = NOT_REPORTED
        else:
            tokens = {t for f in features for t in re.split(r"[^a-z0-9]+", f.lower()) if t}
            result[attr] = bool(tokens & set(words))
    return result


def _metric_row(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _point(v) for k, v in values.items()}


def _point(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: value.get(k) for k in ("estimate", "ci_low", "ci_high") if k in value}
    return NOT_REPORTED if value is None else value


def _performance(metrics: Mapping[str, Any]) -> dict[str, Any]:
    overall = _mapping(metrics.get("overall"))
    by_group = _mapping(metrics.get("by_group"))
    groups: dict[str, Any] = {}
    for label, aliases in _GROUP_ALIASES.items():
        found = next((by_group[a] for a in aliases if isinstance(by_group.get(a), Mapping)),
                     None)
        groups[label] = ({str(g): _metric_row(_mapping(v)) for g, v in found.items()}
                         if found else NOT_REPORTED)
    known = {a for aliases in _GROUP_ALIASES.values() for a in aliases}
    for name, table in by_group.items():
        if name not in known and isinstance(table, Mapping):
            groups[name] = {str(g): _metric_row(_mapping(v)) for g, v in table.items()}
    return {"overall": _metric_row(overall) if overall else NOT_REPORTED, "by_group": groups}


def _fmt(value: Any) -> str:
    if isinstance(value, Mapping):
        est = _fmt(value.get("estimate"))
        if value.get("ci_low") is not None and value.get("ci_high") is not None:
            return f"{est} ({_fmt(value['ci_low'])}-{_fmt(value['ci_high'])})"
        return est
    if isinstance(value, bool) or value is None:
        return NOT_REPORTED if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _performance_table(perf: Mapping[str, Any]) -> list[str]:
    rows: list[tuple[str, str, Mapping[str, Any] | None]] = []
    overall = perf["overall"]
    rows.append(("overall", "all", overall if isinstance(overall, Mapping) else None))
    for group_name, table in perf["by_group"].items():
        if isinstance(table, Mapping):
            rows += [(group_name, g, v) for g, v in table.items()]
        else:
            rows.append((group_name, "-", None))
    present = {m for _, _, v in rows if v for m in v}
    metrics = [m for m in _METRIC_ORDER if m in present] + sorted(present - set(_METRIC_ORDER))
    if not metrics:
        return [NOT_REPORTED + "."]
    lines = ["| group | value | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for group_name, g, values in rows:
        cells = [_fmt(values.get(m)) if values else NOT_REPORTED for m in metrics]
        lines.append(f"| {group_name} | {g} | " + " | ".join(cells) + " |")
    return lines


def _training_summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    if not doc:
        return {"summary": NOT_REPORTED}
    summary: dict[str, Any] = {}
    for key, value in doc.items():
        # Hashed membership lists are long and useless to a reader: count them instead.
        if isinstance(value, Mapping) and "train_patients" in value:
            summary[key] = {k: v for k, v in value.items()
                            if k not in ("train_patients", "test_patients")}
        elif isinstance(value, list) and len(value) > 20:
            summary[key] = f"{len(value)} entries"
        else:
            summary[key] = value
    return summary


def _limitations(cfg: Mapping[str, Any], narrative: Mapping[str, Any],
                 internal: Mapping[str, Any], external: Mapping[str, Any],
                 demographic: Mapping[str, Any]) -> list[str]:
    items = [str(x) for x in narrative.get("limitations", []) or []]
    modalities = set(cfg.get("input_modalities", []))
    if modalities & {"image", "notes"}:
        items.append("Images and clinical notes can carry race, sex and age indirectly, even "
                     "where those are not explicit inputs; see performance by group.")
    if external["overall"] == NOT_REPORTED:
        items.append("No external validation is reported: performance outside the "
                     "development data is unknown.")
    missing = [g for g, v in internal["by_group"].items() if v == NOT_REPORTED]
    if missing:
        items.append(f"Performance by {', '.join(missing)} is not reported.")
    if any(v is True for k, v in demographic.items() if k in ("race", "ethnicity")):
        items.append("Race or ethnicity is an input: outputs differ by recorded race for "
                     "otherwise identical patients; review before use.")
    return items


def _image_network(cfg: Mapping[str, Any]) -> Any:
    """Which image network was trained and why (issue 18): the network, the reason
    ("named in the config", the synth recipe, or "auto"), the pretrained file's sha256
    and whether its backbone was frozen, and whether it was trained from scratch."""
    image = _mapping(cfg.get("image"))
    choice = _mapping(image.get("choice"))
    if not choice:
        encoders = image.get("encoders") or []
        first = _mapping(encoders[0]) if encoders else {}
        return _reported(first.get("network_name"))
    return _drop_none({"network": choice.get("network"), "reason": choice.get("reason"),
                       "pretrained_sha256": choice.get("pretrained_sha256"),
                       "frozen": (None if not choice.get("pretrained")
                                  else not choice.get("finetune")),
                       "trained_from_scratch": bool(choice.get("from_scratch_warning"))})
