"""Offline DP jobs (PE, DP-SGD): request models (requests), PE text backends (backends), running one
job (execute), runners (in-process, RQ) and the worker entry (worker), and the manager (manager).
May import aggregation, proxy.store, proxy.upstreams and top-level proxy modules; never api, serving, cli or app.
"""

from aggregation.pe import Cancelled
from proxy.jobs.backends import PEBackend, default_pe_backend
from proxy.jobs.execute import WorkerContext, execute_job
from proxy.jobs.manager import JobManager
from proxy.jobs.requests import DPSGDJobRequest, JobConflict, JobError, JobRequest, JobRequestError, PEJobRequest, \
    public_view
from proxy.jobs.runners import InProcessRunner, RQRunner
# rq_execute is also reachable here so that jobs queued by an older server ("proxy.jobs.rq_execute")
# still run on an upgraded worker.
from proxy.jobs.worker import rq_execute, run_worker
from proxy.store.base import BudgetExceeded

__all__ = [
    "BudgetExceeded", "Cancelled", "DPSGDJobRequest", "InProcessRunner", "JobConflict", "JobError", "JobManager",
    "JobRequest", "JobRequestError", "PEBackend", "PEJobRequest", "RQRunner", "WorkerContext", "default_pe_backend",
    "execute_job", "public_view", "rq_execute", "run_worker",
]
