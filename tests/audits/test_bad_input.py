"""Bad input: a clear message each, never a crash or a silent NaN."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from audits import AuditFrame, AuditInputError, load_score_table, main_audit


def test_missing_column(scores: pd.DataFrame) -> None:
    with pytest.raises(AuditInputError, match=r"missing column\(s\) \['label'\]"):
        load_score_table(scores.drop(columns="label"), sensitive=["race"])


def test_scores_outside_unit_interval(scores: pd.DataFrame) -> None:
    df = scores.copy()
    df.loc[df.index[:3], "score"] = [1.5, -0.1, 42.0]
    with pytest.raises(AuditInputError, match=r"3 score.* outside \[0, 1\].*probabilities"):
        load_score_table(df, sensitive=["race"])


def test_attribute_with_hundreds_of_levels(scores: pd.DataFrame) -> None:
    df = scores.assign(zip=[f"{i % 400:05d}" for i in range(len(scores))])
    with pytest.raises(AuditInputError, match="'zip' has 400 levels"):
        load_score_table(df, sensitive=["race", "zip"])


def test_empty_window(scores: pd.DataFrame) -> None:
    with pytest.raises(AuditInputError, match="no scored rows in the window 2030-01-01"):
        load_score_table(scores, sensitive=["race"], window=("2030-01-01", "2031-01-01"))


def test_single_class_group(scores: pd.DataFrame) -> None:
    df = scores.copy()
    df.loc[df["race"] == "Other", "label"] = 0
    a = AuditFrame(scores=df, sensitive=["race"], threshold=0.25, n_boot=100)
    assert any("Other" in w and "single outcome class" in w for w in a.warnings)
    rec = next(g for g in a.to_dict()["groups"] if g["group"] == "Other")
    assert rec["metrics"]["auroc"] == {"value": None,
                                       "status": "undefined: single outcome class in this group"}
    assert rec["metrics"]["selection_rate"]["value"] is not None


def test_refusals_excluded_and_counted(scores: pd.DataFrame) -> None:
    df = scores.assign(refusal="")
    df.loc[df.index[:5], ["refusal", "score"]] = ["out of scope", None]
    table = load_score_table(df, sensitive=["race"])
    assert table.n_refused == 5 and len(table.data) == len(df) - 5


def test_cli_reports_bad_input_with_exit_code(tmp_path: Path, scores: pd.DataFrame,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "scores.csv"
    scores.drop(columns="score").to_csv(path, index=False)
    assert main_audit(path, ["race"], tmp_path / "out", "tester") == 2
    assert "missing column(s) ['score']" in capsys.readouterr().err
