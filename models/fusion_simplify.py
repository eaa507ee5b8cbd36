"""Never worse than a baseline: the fused head against simpler heads, by inner CV (issue 18).

After ``train`` has built every modality's fusion input, a patient-grouped inner
K-fold over the training rows compares the full fusion head with simpler heads that
fit the **same artifact format**:

- **modality subsets**: the fusion head refitted on a subset of the modalities (e.g.
  EHR + notes without imaging, EHR only, notes only). A dropped modality's input is
  ignored -- its weight is 0 -- so the shipped model is an ordinary fusion artifact
  whose ``input_modalities`` omit it; scoring, explanations, the dashboard and
  write-back need nothing new.
- **linear head**: the same inputs with ``hidden=0``. The default fusion head *is*
  linear (``fusion.hidden`` 0), so this candidate coincides with the full fusion and is
  only run when ``hidden > 0``.

Every candidate sees the same inner folds and the same inner L2-choice split, and is
scored by the **log-loss** of its uncalibrated out-of-fold logit (AUROC is reported
beside it). The rule is the conservative one of :mod:`models.tabular_learner`: the
best simpler candidate (lowest inner log-loss) is shipped only when its log-loss is
lower than the full fusion's by more than one patient-clustered standard error of the
paired per-row difference (``z > 1``) **and** lower than the base rate's (the inner
training part's event rate, a constant) by more than one SE; otherwise the full fusion
stays. The second condition matters on small cohorts: when the full head overfits, a
candidate that carries no signal at all (a near-constant "notes only" head) has the
lower log-loss, and shipping it ships noise -- measured on a 300-patient
``--realism hard`` cohort (seed 4): "notes only" ahead of the full head by z = 1.21,
then AUROC 0.43 on 500 fresh patients. Choosing the
best of several candidates before testing it favours simplification a little; the
inputs favour the full fusion (see :func:`compare_fusion_heads`), and the rule is not
tuned to the synthetic generator either way.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from models.fusion import FusionRiskModel
from models.inner_cv import clustered_se, inner_split, log_loss_rows

__all__ = ["Z_THRESHOLD", "compare_fusion_heads", "describe_comparison"]

log = logging.getLogger(__name__)

#: The full fusion gives way only to a candidate ahead by more than this many SEs.
Z_THRESHOLD = 1.0

_LABELS = {"ehr": "EHR", "note": "notes", "image": "imaging"}

#: make(modalities, hidden) -> an unfitted fusion head with the training config.
HeadFactory = Callable[[Sequence[str], int], FusionRiskModel]


def candidate_name(modalities: Sequence[str], hidden: int = 0) -> str:
    """``"EHR + notes fusion"`` or ``"EHR only"``."""
    labels = [_LABELS.get(m, m) for m in modalities]
    return " + ".join(labels) + (" fusion" if len(labels) > 1 else " only")


def _candidates(modalities: Sequence[str], hidden: int, image_in_sample: bool = False
                ) -> list[dict[str, Any]]:
    """The full head first, then every proper non-empty modality subset (all of them for
    the three modalities clinfuse has), then the linear head when the full one is not.

    With ``image_in_sample`` the subsets that keep imaging are left out: their inner
    scores rest on image logits fitted to these very rows, which flatters a subset that
    leans on imaging more than the full head does (measured on the test suite's synth
    cohort: "imaging only" ahead by z = 1.65), so they could win by optimism alone.
    Subsets without imaging are scored fairly against an optimistic full head, which
    errs towards keeping the full fusion.
    """
    out: list[dict[str, Any]] = [{"key": "full", "modalities": list(modalities),
                                  "hidden": hidden}]
    for size in range(len(modalities) - 1, 0, -1):
        for subset in itertools.combinations(modalities, size):
            if image_in_sample and "image" in subset:
                continue
            out.append({"key": "+".join(subset), "modalities": list(subset), "hidden": hidden})
    if hidden > 0:
        out.append({"key": "linear", "modalities": list(modalities), "hidden": 0})
    for c in out:
        c["name"] = (candidate_name(c["modalities"]) + (" (linear head)" if c["key"] ==
                                                          "linear" else ""))
    return out


def compare_fusion_heads(make: HeadFactory, X: Mapping[str, np.ndarray], y: np.ndarray,
                         mask: np.ndarray, modalities: Sequence[str], groups: np.ndarray, *,
                         hidden: int = 0, folds: int = 3, random_state: int = 0,
                         mode: str = "auto", image_in_sample: bool = False
                         ) -> dict[str, Any]:
    """Inner-CV record of the full fusion head against simpler ones, with the decision.

    ``X``, ``y``, ``mask`` (columns in ``modalities`` order) and ``groups`` (patient ids)
    are the training rows as the fusion head sees them. The image input is the frozen
    encoder's logit, not refitted per inner fold: with one encoder (``crossfit_folds``
    1) and the joint head refit it is in-sample on these rows (``image_in_sample``), so
    only subsets without imaging compete (see :func:`_candidates`); the full head's
    score is then optimistic, which errs towards keeping it.

    Returns a JSON-ready dict: ``candidates`` (each with inner log-loss, AUROC, and
    against the full head the paired difference ``full - candidate``, its SE and z),
    ``chosen`` (a candidate key), ``shipped`` (its modalities and hidden size) and a
    one-line ``summary``. ``mode="off"`` records the comparison but keeps the full head.
    """
    if mode not in ("auto", "off"):
        raise ValueError(f"fusion.simplify must be 'auto' or 'off', got {mode!r}")
    started = time.perf_counter()
    y = np.asarray(y, dtype=int)
    groups = np.asarray(groups)
    cands = _candidates(modalities, int(hidden), image_in_sample and "image" in modalities)
    record: dict[str, Any] = {
        "mode": mode, "metric": "log_loss", "z_threshold": Z_THRESHOLD,
        "rule": (f"ship the simpler candidate with the lowest inner out-of-fold log-loss when "
                 f"it beats the full fusion, and the base rate, each by z > {Z_THRESHOLD:g} "
                 "patient-clustered standard errors of the paired per-row difference; else "
                 "the full fusion"),
        "random_state": int(random_state), "n_rows": len(y),
        "image_in_sample": bool(image_in_sample and "image" in modalities),
        "n_patients": len(set(groups.tolist())),
    }
    k = int(min(folds, *(len(set(groups[y == c].tolist())) for c in (0, 1))))
    if len(cands) == 1 or k < 2:
        reason = ("no simpler candidate (one modality, linear head)" if len(cands) == 1
                  else "too few patients of a class for inner CV")
        return {**record, "folds": None, "reason": reason, "candidates": [],
                "chosen": "full", "shipped": {"modalities": list(modalities),
                                              "hidden": int(hidden)},
                "summary": f"Full fusion kept ({reason})."}
    oof = np.zeros((len(cands), len(y)))
    base = np.zeros(len(y))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=random_state)
    for f, (tr, te) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
        fit, stop = inner_split(y[tr], groups[tr], random_state + 1 + f)
        fit, stop = tr[fit], tr[stop]
        for c, cand in enumerate(cands):
            cols = [list(modalities).index(m) for m in cand["modalities"]]
            Xc = {m: np.asarray(X[m]) for m in cand["modalities"]}
            head = make(cand["modalities"], int(cand["hidden"]))
            head.fit({m: v[fit] for m, v in Xc.items()}, y[fit], mask[fit][:, cols],
                     X_val={m: v[stop] for m, v in Xc.items()}, y_val=y[stop],
                     mask_val=mask[stop][:, cols])
            oof[c, te] = head.predict_logit({m: v[te] for m, v in Xc.items()},
                                            mask[te][:, cols], calibrated=False)
        rate = float(np.clip(y[tr].mean(), 1e-6, 1 - 1e-6))
        base[te] = np.log(rate / (1.0 - rate))
    losses = np.stack([log_loss_rows(y, oof[c]) for c in range(len(cands))])
    base_loss = log_loss_rows(y, base)
    rows = []
    for c, cand in enumerate(cands):
        diff = losses[0] - losses[c]  # > 0: the candidate is ahead of the full fusion
        se = clustered_se(diff, groups) if c else 0.0
        z = float(diff.mean() / se) if c and se > 0 else 0.0
        gain = base_loss - losses[c]  # > 0: the candidate is ahead of the base rate
        se_base = clustered_se(gain, groups)
        rows.append({"key": cand["key"], "name": cand["name"],
                     "modalities": cand["modalities"], "hidden": int(cand["hidden"]),
                     "log_loss": float(losses[c].mean()),
                     "auroc": float(roc_auc_score(y, oof[c])),
                     "improvement_over_full": float(diff.mean()), "se": float(se), "z": z,
                     "z_over_base_rate": float(gain.mean() / se_base) if se_base > 0
                     else 0.0})
    best = min(rows[1:], key=lambda r: r["log_loss"])
    auto = (best["key"] if best["z"] > Z_THRESHOLD and best["z_over_base_rate"] > Z_THRESHOLD
            else "full")
    chosen = auto if mode == "auto" else "full"
    ship = next(r for r in rows if r["key"] == chosen)
    if chosen == "full":
        summary = (f"Shipped: the full {rows[0]['name']}; the best simpler candidate "
                   f"({best['name']}) was ahead by {best['improvement_over_full']:.4f} "
                   f"log-loss (SE {best['se']:.4f}, z = {best['z']:.2f}) in inner CV "
                   f"({k} folds)")
        if auto != "full":
            summary += "; fusion.simplify is off (auto would ship it)."
        elif best["z"] > Z_THRESHOLD:
            summary += (f", but it was not ahead of the base rate (z = "
                        f"{best['z_over_base_rate']:.2f}): no evidence it carries signal.")
        else:
            summary += f", within the {Z_THRESHOLD:g}-SE rule."
    else:
        summary = (f"Shipped: {ship['name']}; the full {rows[0]['name']} was behind by "
                   f"{ship['improvement_over_full']:.4f} log-loss (SE {ship['se']:.4f}, "
                   f"z = {ship['z']:.2f}) in inner CV ({k} folds).")
    seconds = round(time.perf_counter() - started, 1)
    log.info("fusion simplification (%.1f s): %s", seconds, summary)
    return {**record, "folds": k, "seconds": seconds, "candidates": rows,
            "base_rate_log_loss": float(base_loss.mean()),
            "auto_choice": auto, "chosen": chosen,
            "shipped": {"modalities": ship["modalities"], "hidden": ship["hidden"]},
            "summary": summary}


def describe_comparison(record: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines for the model card's "Baseline comparison" section."""
    if not record:
        return ["Not reported (this model was trained before the inner-CV comparison)."]
    lines = [str(record.get("summary", "")), ""]
    if not record.get("candidates"):
        return lines
    lines += [f"Patient-grouped inner {record['folds']}-fold cross-validation on the "
              f"training split ({record['n_patients']} patients, {record['n_rows']} rows); "
              f"rule: {record['rule']}.", "",
              "| Candidate | Inner log-loss | Inner AUROC | Ahead of full by | SE | z |",
              "|---|---|---|---|---|---|"]
    for r in record["candidates"]:
        mark = " (shipped)" if r["key"] == record.get("chosen") else ""
        if r["key"] == "full":
            lines.append(f"| Full: {r['name']}{mark} | {r['log_loss']:.4f} | "
                         f"{r['auroc']:.3f} | - | - | - |")
        else:
            lines.append(f"| {r['name']}{mark} | {r['log_loss']:.4f} | {r['auroc']:.3f} | "
                         f"{r['improvement_over_full']:+.4f} | {r['se']:.4f} | "
                         f"{r['z']:.2f} |")
    return lines
