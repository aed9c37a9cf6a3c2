"""Offline jobs (moved here from proxy/jobs.py; split follows)."""

from proxy.jobs.manager import *  # noqa: F401,F403
from proxy.jobs.manager import LocalTextGenerator, _fill, rq_execute  # noqa: F401
