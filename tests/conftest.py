"""Shared fixtures: a real redis-server for the test session, and a ``store`` fixture that runs
the same test against the SQLite and the Redis backend."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not hit the network
os.environ.setdefault("DPICL_CACHE_DIR", "/tmp/dpicl-cache")

REDIS_BINARY = shutil.which("redis-server")


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL (``redis://127.0.0.1:PORT/0``) of a throwaway redis-server started for this session."""
    if REDIS_BINARY is None:
        pytest.skip("redis-server binary not found on PATH (install the redis-server package to run Redis tests)")
    import redis

    workdir = tempfile.mkdtemp(prefix="dpicl-redis-")
    for _ in range(5):  # the port could be taken between free_port() and the bind: try again
        port = free_port()
        proc = subprocess.Popen(
            [REDIS_BINARY, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            proc.kill()
            proc.wait()
            continue
        client.close()
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                proc.kill()
                proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)
        return
    pytest.fail("could not start redis-server")


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis URL, flushed before the test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    return redis_server


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL for each backend: a fresh SQLite file, and the (flushed) session Redis."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("redis_url")


@pytest.fixture
def store(store_url: str):
    """An opened store of each backend (same tests run against both)."""
    from proxy.store import open_store

    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()
