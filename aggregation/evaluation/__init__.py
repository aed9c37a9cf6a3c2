"""Evaluation harness (moved here from aggregation/icl_eval.py; split follows)."""

from aggregation.evaluation.runs import *  # noqa: F401,F403
