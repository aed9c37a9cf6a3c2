"""Who runs a warm-up, and whether that process is still alive (crash recovery).

Every process that holds warm-ups has an :class:`Owner` identity, stamped on the records it holds:

* ``owner``: a stable name, ``server:<id>`` or ``worker:<id>``; ``<id>`` is ``DPICL_INSTANCE_ID``
  (or the worker's ``--name``), else the host name. A restart under the same name is the same
  instance: it marks what its previous incarnation held lost at once (:func:`previous_incarnation`).
  Replicas sharing one store must not run two live processes under one explicit id on different
  hosts (on one host the process check below tells them apart).
* ``owner_host``: the host name plus the PID namespace, so two containers that share a host name
  (host networking) are not mistaken for one another; ``owner_pid``: the process;
  ``owner_run``: a random token of this incarnation (a container restarted as PID 1 again has the
  same PID as the process that died).

Whether an owner is alive is decided only when it is certain (:func:`owner_dead`: the same host,
and the process is gone or is a later incarnation); otherwise the record's heartbeat decides
(:data:`proxy.serving.warmups.STALE_AFTER`). So a replica never marks another live replica's
warm-ups lost.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any


def _host_identity() -> str:
    """Host name plus the PID namespace (processes are comparable only inside one namespace)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: the host name alone
        ns = ""
    return f"{socket.gethostname()}/{ns}" if ns else socket.gethostname()


@dataclass(frozen=True)
class Owner:
    """This process's identity as a warm-up owner (the PID is read when stamped: RQ forks)."""

    name: str
    host: str
    run: str

    @classmethod
    def current(cls, role: str, instance: str | None = None) -> "Owner":
        """The identity of this process for ``role`` (``server`` or ``worker``)."""
        base = instance or os.environ.get("DPICL_INSTANCE_ID") or socket.gethostname()
        return cls(f"{role}:{base}", _host_identity(), secrets.token_hex(8))

    def fields(self) -> dict[str, Any]:
        """The record fields that say this process holds a warm-up."""
        return {"owner": self.name, "owner_host": self.host, "owner_pid": os.getpid(), "owner_run": self.run}


def pid_alive(pid: Any) -> bool:
    """True when a process with this PID exists on this host (or we cannot tell)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (EPERM)
        return True
    return True


def owner_dead(rec: dict[str, Any], me: Owner) -> bool:
    """True only when the record's owner is certainly gone: it ran on this host (same PID
    namespace) and its process no longer exists, or it was an earlier process with our PID."""
    run = rec.get("owner_run")
    if run is None or run == me.run or rec.get("owner_host") != me.host:
        return False
    pid = rec.get("owner_pid")
    if pid == os.getpid():
        return True  # our PID, another incarnation: the process that had it died
    return not pid_alive(pid)


def previous_incarnation(rec: dict[str, Any], me: Owner) -> bool:
    """True when the record was held by an earlier process with our name (and that process is not a
    live sibling on this host with the same default name)."""
    if rec.get("owner") != me.name or rec.get("owner_run") in (None, me.run):
        return False
    if rec.get("owner_host") == me.host and rec.get("owner_pid") != os.getpid() and pid_alive(rec.get("owner_pid")):
        return False  # a live process on this host under the same name: not ours to recover
    return True
