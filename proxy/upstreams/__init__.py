"""Upstream models the proxy forwards to (moved here from proxy/upstreams.py; split follows)."""

from proxy.upstreams.base import *  # noqa: F401,F403
from proxy.upstreams.base import _dumps  # noqa: F401
