"""Evaluation: ICL accuracy and demonstration fidelity against epsilon (tasks, scoring, fidelity, demos,
settings, runs, tables), the canary audit (canary, audit) and the quality check of synthetic data
(quality). May import other aggregation modules only, never proxy. The names below are the harness's public API (``dpicl eval`` uses them).
"""

from aggregation.evaluation.audit import CANARY_SHARE, AuditRecord, AuditSettings, audit_markdown, run_audit
from aggregation.evaluation.demos import ChargedPlan, DemoSet, charge_plan, dp_demonstrations, label_config, \
    public_demonstrations, real_demonstrations
from aggregation.evaluation.runs import EvalOutput, ResumeError, load_finished, read_runs, run_eval, settings_record, \
    write_outputs
from aggregation.evaluation.scoring import CONTENT_FREE, LabelScorer, ModelScorer, Scored, accuracy, calibrated_probs, \
    score_queries
from aggregation.evaluation.settings import DP, FULL, INF, PUBLIC, QUICK, REAL, ROW_TITLES, RUN_FIELDS, ZERO_SHOT, \
    EvalSettings, RunRecord, parse_epsilons
from aggregation.evaluation.fidelity import FidelityEvaluator
from aggregation.evaluation.tables import Summary, fidelity_markdown, plot_accuracy, summarise, table_markdown
from aggregation.evaluation.tasks import Task, evaluator_split, held_out_split, load_task

__all__ = [
    "CANARY_SHARE", "CONTENT_FREE", "DP", "FULL", "INF", "PUBLIC", "QUICK", "REAL", "ROW_TITLES", "RUN_FIELDS",
    "ZERO_SHOT", "AuditRecord", "AuditSettings", "ChargedPlan", "DemoSet", "EvalOutput", "EvalSettings", "LabelScorer",
    "ModelScorer", "ResumeError", "RunRecord", "Scored", "Summary", "Task", "accuracy", "audit_markdown",
    "calibrated_probs", "charge_plan", "dp_demonstrations", "evaluator_split", "FidelityEvaluator",
    "fidelity_markdown", "held_out_split", "label_config", "load_finished",
    "load_task", "parse_epsilons", "plot_accuracy", "public_demonstrations", "read_runs", "real_demonstrations",
    "run_audit", "run_eval", "score_queries", "settings_record", "summarise", "table_markdown", "write_outputs",
]
