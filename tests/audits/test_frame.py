"""AuditFrame: exact point estimates, bootstrap intervals, comparisons, suppression."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from audits import INSUFFICIENT, AuditFrame
from audits._bootstrap import PoissonTable
from tests.audits.conftest import make_scores


@pytest.fixture(scope="module")
def audit(scores: pd.DataFrame) -> AuditFrame:
    return AuditFrame(scores=scores, sensitive=["sex", "race"], threshold=0.25, n_boot=300)


def test_point_estimates_match_sklearn(audit: AuditFrame, scores: pd.DataFrame) -> None:
    for race, sub in scores.groupby("race"):
        row = audit.by_group.loc[("race", race)]
        s, y = sub["score"].to_numpy(), sub["label"].to_numpy()
        assert row["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert row["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert row["brier"] == pytest.approx(brier_score_loss(y, s), abs=1e-12)
        flag = s >= 0.25
        assert row["tpr"] == pytest.approx(flag[y == 1].mean(), abs=1e-12)
        assert row["fpr"] == pytest.approx(flag[y == 0].mean(), abs=1e-12)
        assert row["selection_rate"] == pytest.approx(flag.mean(), abs=1e-12)
        x = np.log(s / (1 - s))[:, None]
        fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(x, y)
        assert row["calibration_slope"] == pytest.approx(fit.coef_[0, 0], abs=1e-4)


def test_intervals_agree_with_row_level_patient_bootstrap(audit: AuditFrame,
                                                          scores: pd.DataFrame) -> None:
    """Histogram Poisson bootstrap vs an explicit per-patient multinomial bootstrap."""
    rng = np.random.default_rng(5)
    pid = pd.factorize(scores["patient_id"])[0]
    s, y = scores["score"].to_numpy(), scores["label"].to_numpy()
    black = (scores["race"] == "Black").to_numpy()
    aucs, tprs = [], []
    for _ in range(300):
        w = np.bincount(rng.integers(0, pid.max() + 1, pid.max() + 1),
                        minlength=pid.max() + 1)[pid][black]
        aucs.append(roc_auc_score(y[black], s[black], sample_weight=w))
        tprs.append(np.sum(w * (s[black] >= 0.25) * y[black]) / np.sum(w * y[black]))
    for metric, ref in (("auroc", aucs), ("tpr", tprs)):
        ci = audit.by_group_ci(metric).loc[("race", "Black")]
        lo, hi = np.percentile(ref, [2.5, 97.5])
        assert ci["lower"] == pytest.approx(lo, abs=0.02)
        assert ci["upper"] == pytest.approx(hi, abs=0.02)


def test_histogram_path_matches_rows_on_the_same_replicates(audit: AuditFrame,
                                                             scores: pd.DataFrame) -> None:
    """Same per-patient weights through the histogram path and through sklearn on rows:
    the difference is the computation only (no Monte Carlo noise)."""
    rng = np.random.default_rng(7)
    pid = pd.factorize(scores["patient_id"])[0]
    w = rng.poisson(1.0, (40, pid.max() + 1)).astype(np.float32)[:, pid]
    reps = audit.replicate_metrics(w)
    gi = [g.key for g in audit.groups].index(("race", "Black"))
    black = (scores["race"] == "Black").to_numpy()
    s, y = scores["score"].to_numpy()[black], scores["label"].to_numpy()[black]
    flag = s >= 0.25
    for k in range(w.shape[0]):
        wk = w[k, black].astype(float)
        # Rates are exact up to float32 division: the threshold is a bin edge and the
        # weights are integer counts.
        assert reps["tpr"][gi, k] == pytest.approx(wk @ (flag * y) / (wk @ y), abs=1e-6)
        assert reps["selection_rate"][gi, k] == pytest.approx(wk @ flag / wk.sum(), abs=1e-6)
        assert reps["auroc"][gi, k] == pytest.approx(
            roc_auc_score(y, s, sample_weight=wk), abs=5e-3)
        assert reps["brier"][gi, k] == pytest.approx(
            brier_score_loss(y, s, sample_weight=wk), abs=1e-3)
    ones = audit.replicate_metrics(np.ones((1, len(scores)), np.float32))
    assert ones["auroc"][gi, 0] == pytest.approx(audit.by_group["auroc"].iloc[gi], abs=1e-6)
    with pytest.raises(ValueError, match="columns"):
        audit.replicate_metrics(np.ones((1, 3)))


def test_difference_and_ratio_methods(audit: AuditFrame) -> None:
    d = audit.difference("tpr")
    ref = audit.reference["race"].name
    assert ref == "White" and ("race", "White") not in d.index
    tpr = audit.by_group["tpr"]
    assert d[("race", "Black")] == pytest.approx(tpr[("race", "Black")] - tpr[("race", "White")])
    r = audit.ratio("selection_rate", "to_overall")
    sel = audit.by_group["selection_rate"]
    overall = audit.overall["selection_rate"]
    assert r[("sex", "male")] == pytest.approx(sel[("sex", "male")] / overall)
    between = audit.difference_ci("tpr", "between_groups")
    assert (between["value"] >= 0).all() and (between["lower"] <= between["upper"]).all()
    with pytest.raises(ValueError, match="Unrecognised comparison method"):
        audit.difference("tpr", "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unrecognised metric"):
        audit.by_group_ci("accuracy")


def test_equalized_odds_gaps_reported_separately(audit: AuditFrame) -> None:
    fam = audit.disparities
    eo = fam[fam["family"].str.contains("equalized odds")]
    assert set(eo["metric"]) == {"tpr", "fpr"}


def test_small_cells_suppressed_everywhere(scores: pd.DataFrame) -> None:
    df = scores.copy()
    df.loc[df.index[:12], "race"] = "Tiny"
    a = AuditFrame(scores=df, sensitive=["race"], threshold=0.25, n_boot=100)
    assert a.by_group.loc[("race", "Tiny")].isna().all()
    rec = next(g for g in a.to_dict()["groups"] if g["group"] == "Tiny")
    assert rec == {"dimension": "race", "group": "Tiny", "n": "<30", "status": INSUFFICIENT}
    assert "Tiny" not in set(a.disparities["group"])
    assert "Tiny" not in set(a.missingness["group"])


def test_poisson_table_is_poisson() -> None:
    rng = np.random.default_rng(0)
    table = PoissonTable()
    base, owner = table.atoms(np.array([1, 7, 64, 300]))
    draws = np.array([table.draw(rng, base, owner, 4) for _ in range(20000)])
    assert draws.mean(0) == pytest.approx([1, 7, 64, 300], rel=0.02)
    assert draws.var(0) == pytest.approx([1, 7, 64, 300], rel=0.06)


def test_multiplicity_option_and_statement(scores: pd.DataFrame) -> None:
    from audits import FlagRules

    a = AuditFrame(scores=scores, sensitive=["race"], threshold=0.25, n_boot=100,
                   rules=FlagRules(multiplicity="holm"))
    tested = a.disparities[a.disparities["tested"]]
    assert (tested["p_adjusted"] >= tested["p_value"] - 1e-12).all()
    assert a.to_dict()["rules"]["multiplicity"] == "holm"
    assert not make_scores(50).empty
