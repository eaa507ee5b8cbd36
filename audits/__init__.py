"""Fairness audits over score tables: group metrics with CIs, disparities, missingness,
flags, reports and a versioned folder store.

Needs only score tables (pandas DataFrames or CSV files); nothing here imports
models, pipelines or services.
"""

from audits.cli import main_audit, main_compare
from audits.frame import INSUFFICIENT, AuditFrame, FlagRules
from audits.report import METRIC_MEANING, plain_summary, write_report
from audits.store import AuditStore, compare_records, load_record
from audits.table import AuditInputError, ScoreTable, load_score_table, read_sidecar_sensitive

__all__ = ["INSUFFICIENT", "METRIC_MEANING", "AuditFrame", "AuditInputError", "AuditStore",
           "FlagRules", "ScoreTable", "compare_records", "load_record", "load_score_table",
           "main_audit", "main_compare", "plain_summary", "read_sidecar_sensitive",
           "write_report"]
