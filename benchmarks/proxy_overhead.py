"""Proxy overhead: requests/s, p50 and p99 latency through our proxy vs. straight to the upstream, and
vs. LiteLLM's proxy, all measured side by side in one run on this machine.

Targets (non-streaming chat completions, one small user message):
  (a) direct          the fake OpenAI upstream itself (``proxy.devtools.fake_upstream``, own process)
  (b) task[wN]        ``dpicl serve --workers N`` on a task whose DP demonstrations are cached
                      (injected each request); one proxy per ``--workers`` value, all on one store
  (c) passthrough[wN] the same proxy on a plain model_list model (forwarded unchanged)
  (d) litellm         LiteLLM's proxy (``litellm --config``, one worker) on the same upstream
Each is loaded at every ``--concurrency`` (default 1, 16 and 32) by an async aiohttp loop bounded
by a request count and a time limit; targets are interleaved over ``--rounds`` short rounds so that
other load on the machine hits them alike. A second table compares the upstream implementations
in-process (the direct HTTP fast path vs. litellm.acompletion), the measurement behind the fast
path's use. The load average is printed at the start and at the end: on a shared machine, compare
the ratios (measured in the same rounds) rather than the absolute numbers.

The demonstration cache is filled through the admin API (dataset upload + warm-up), as an operator
would; ``--generator tiny`` (default) generates it with a tiny random model so the warm-up takes
seconds, ``--generator smollm2`` with the real local model (same serving path, real text).
``--profile out.txt`` runs the 1-worker proxy under pyinstrument and writes where its time went.
Run from the repository root:

    nice -n 10 python benchmarks/proxy_overhead.py [--seconds 6] [--concurrency 1 16 32] [--workers 1 2]

LiteLLM's proxy needs ``litellm[proxy]``, whose pins conflict with ours (it downgrades rq and rich),
so install it in a separate virtualenv that sees our packages::

    python -m venv --system-site-packages /tmp/litellm-proxy-venv
    /tmp/litellm-proxy-venv/bin/pip install 'litellm[proxy]'

and, for another location, set ``LITELLM_PROXY_PYTHON`` to that virtualenv's python. Without it,
(d) prints "skipped: not installed".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DPICL_CACHE_DIR", "/tmp/dpicl-cache")

import httpx  # noqa: E402
import yaml  # noqa: E402

from proxy.devtools.fake_upstream import free_port  # noqa: E402
from proxy.devtools.fake_upstream import spawn as spawn_fake  # noqa: E402

ADMIN_KEY = "bench-admin-key"
UPSTREAM_KINDS = ("aiohttp", "httpx", "litellm")
TASK = "bench-task"
PASSTHROUGH = "bench-passthrough"
BODY = {"messages": [{"role": "user", "content": "How far is it from Paris to Rome?"}], "max_tokens": 16}

# A small made-up labelled dataset (built from templates): just enough to warm a demonstration set.
_PLACES = ["Norway", "Peru", "Kenya", "Japan", "Chile", "Egypt", "Canada", "Italy", "India", "Brazil"]
_THINGS = ["lighthouses", "volcanoes", "bridges", "islands"]
ROWS = ([(f"Where are the oldest {t} in {p}?", "location") for p in _PLACES for t in _THINGS]
        + [(f"How many {t} does {p} have?", "number") for p in _PLACES for t in _THINGS])
CLIENT_KEY = "sk-bench-client-0123456789abcdef"
LITELLM_MASTER_KEY = "sk-bench-master-" + "7f3a9c2e5b1d4f60a8e2c9b7d1f3a5e7"


@dataclass
class Result:
    """One measured cell (possibly several rounds merged)."""

    latencies: list[float]
    errors: int
    seconds: float

    @property
    def requests(self) -> int:
        return len(self.latencies) - self.errors

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")

    @property
    def p99_ms(self) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else float("nan")

    def merge(self, other: "Result") -> "Result":
        return Result(self.latencies + other.latencies, self.errors + other.errors, self.seconds + other.seconds)

    def summary(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "seconds": round(self.seconds, 3),
                "rps": round(self.rps, 1), "p50_ms": round(self.p50_ms, 3), "p99_ms": round(self.p99_ms, 3)}


# -- load loop --------------------------------------------------------------------------------------
async def run_load(call: Callable[[], Awaitable[bool]], concurrency: int, max_requests: int,
                   max_seconds: float, warmup: int) -> Result:
    """Run ``call`` from ``concurrency`` workers until ``max_requests`` or ``max_seconds``."""
    for _ in range(warmup):
        await call()
    latencies: list[float] = []
    errors = 0
    issued = 0
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker() -> None:
        nonlocal issued, errors
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            t0 = time.perf_counter()
            ok = await call()
            latencies.append(time.perf_counter() - t0)
            errors += 0 if ok else 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(latencies, errors, time.perf_counter() - start)


async def http_cell(url: str, model: str, concurrency: int, args: argparse.Namespace,
                    expect: str, headers: dict | None = None) -> Result:
    """Load one HTTP target with chat completions; a response counts only if it has ``expect``."""
    payload = json.dumps({**BODY, "model": model}).encode()
    hdrs = {"content-type": "application/json", **(headers or {})}
    if args.client == "aiohttp":
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            async def acall() -> bool:
                try:
                    async with session.post(url, data=payload, headers=hdrs) as r:
                        return r.status == 200 and expect in (await r.text())
                except aiohttp.ClientError:
                    return False

            return await run_load(acall, concurrency, args.requests, args.seconds, warmup=2 * concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        async def call() -> bool:
            try:
                r = await client.post(url, content=payload, headers=hdrs)
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and expect in r.text

        return await run_load(call, concurrency, args.requests, args.seconds, warmup=2 * concurrency)


async def upstream_cell(kind: str, base_url: str, concurrency: int, args: argparse.Namespace) -> Result:
    """In-process: the upstream implementation alone, against the fake."""
    from proxy.upstreams import build_upstream

    entry = {"model_name": "m", "fast_path": {"aiohttp": "aiohttp", "httpx": "httpx", "litellm": False}[kind],
             "litellm_params": {"model": "openai/fake-model", "api_base": base_url}}
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
    up = build_upstream(entry, http, 30.0, 0)
    body = {**BODY, "model": "m"}

    async def call() -> bool:
        try:
            answer = await up.chat(body)
        except Exception:  # noqa: BLE001 - counted as an error
            return False
        return answer["choices"][0]["message"]["content"].startswith("fake answer")

    try:
        return await run_load(call, concurrency, args.requests, args.seconds, warmup=2 * concurrency)
    finally:
        await up.aclose()
        await http.aclose()


# -- processes ----------------------------------------------------------------------------------------
def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode}\n{tail}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready in {timeout:g}s")


def stop(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly (and pyinstrument writes its report)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def litellm_command() -> list[str] | None:
    """Command that runs LiteLLM's proxy CLI, if a Python with the proxy extras is available.

    Tried in order: ``LITELLM_PROXY_PYTHON`` (a python executable), the virtualenv at
    ``/tmp/litellm-proxy-venv``, and this interpreter.
    """
    candidates = [os.environ.get("LITELLM_PROXY_PYTHON"), "/tmp/litellm-proxy-venv/bin/python", sys.executable]
    for python in candidates:
        if not python or not Path(python).exists():
            continue
        check = subprocess.run([python, "-c", "import litellm.proxy.proxy_server"], capture_output=True,
                               env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}, timeout=180)
        if check.returncode == 0:
            return [python, "-m", "litellm.proxy.proxy_cli"]
    return None


def warm_task(base: str) -> str:
    """Upload the tiny dataset and warm the task's demonstrations through the admin API."""
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    data = "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in ROWS).encode()
    r = httpx.post(f"{base}/admin/datasets", headers=auth, timeout=60,
                   files={"file": ("bench.jsonl", data, "application/jsonl")},
                   data={"name": "bench-data", "epsilon": "20",
                         "labels": json.dumps(sorted({label for _, label in ROWS}))})
    if r.status_code not in (200, 201):
        raise RuntimeError(f"dataset upload failed: HTTP {r.status_code} {r.text[:300]}")
    # A warm-up is a background resource; "wait" blocks until it is done (200 with the finished view).
    r = httpx.post(f"{base}/admin/tasks/{TASK}/demos", headers=auth, json={"wait": True}, timeout=1800)
    view = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if r.status_code != 200 or view.get("state") != "done":
        raise RuntimeError(f"warm-up failed: HTTP {r.status_code} {r.text[:300]}")
    info = view.get("result") or {}
    return f"{len(info.get('demonstrations', []))} demonstrations, epsilon {info.get('epsilon')}"


def tiny_model_dir(work: Path) -> str:
    """A tiny random Llama (the tests' model) saved under ``work``: warm-ups take seconds, not minutes."""
    from tests.tiny_model import save_tiny_model

    return save_tiny_model(work / "tiny-model")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


# -- main ------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=6.0, help="time limit per cell (all rounds)")
    p.add_argument("--requests", type=int, default=6000, help="request limit per cell")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="one proxy per value (dpicl serve --workers)")
    p.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp",
                   help="load generator's HTTP client (httpx costs several times more CPU per request, "
                        "which it takes from the servers under test on a small machine)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell (time/requests split)")
    p.add_argument("--generator", choices=["tiny", "smollm2"], default="tiny",
                   help="model that generates the cached demonstrations (tiny: seconds; smollm2: the real one)")
    p.add_argument("--skip-litellm", action="store_true")
    p.add_argument("--skip-upstream-cells", action="store_true", help="skip the in-process upstream table")
    p.add_argument("--profile", type=Path, default=None,
                   help="run the 1-worker proxy under pyinstrument and write its text report here")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    load_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="dpicl-bench-"))
    fake_port, litellm_port = free_port(), free_port()
    upstream_base = f"http://127.0.0.1:{fake_port}/v1"
    procs: list[subprocess.Popen] = []
    results: dict[str, dict[int, Result | str]] = {}
    notes: list[str] = []
    try:
        procs.append(spawn_fake(fake_port))

        config: dict[str, Any] = {
            "model_list": [{"model_name": PASSTHROUGH,
                            "litellm_params": {"model": "openai/fake-model", "api_base": upstream_base}}],
            "tasks": [{
                "name": TASK, "upstream": PASSTHROUGH, "dataset": "bench-data",
                "instruction": "Classify each question by the type of its answer.",
                "input_prefix": "Question:", "label_prefix": "Answer type:", "labels": ["location", "number"],
                "shots": 1, "epsilon": 4.0, "on_missing": "error",
                "generation": {"num_subsets": 2, "shots_per_subset": 1, "max_tokens": 8},
            }],
            "store": {"url": f"sqlite:///{work / 'store.db'}"},
            # Both proxies authenticate clients: ours with a client key, LiteLLM with its master key.
            "client_keys": [{"name": "bench", "key_env": "DPICL_BENCH_CLIENT_KEY", "tasks": ["*"]}],
        }
        if args.generator == "tiny":
            config["server"] = {"local_model": tiny_model_dir(work)}
        cfg_path = work / "dpicl.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "DPICL_ADMIN_KEY": ADMIN_KEY, "DPICL_BENCH_CLIENT_KEY": CLIENT_KEY,
               "DPICL_DATA_DIR": str(work), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

        def start_proxy(workers: int) -> str:
            port = free_port()
            command = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg_path), "--port", str(port),
                       "--log-level", "warning", "--workers", str(workers)]
            if args.profile and workers == 1:
                command[1:1] = ["-m", "pyinstrument", "--renderer", "text", "--outfile", str(args.profile)]
            log = work / f"dpicl-w{workers}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
            procs.append(proc)
            wait_http(f"http://127.0.0.1:{port}/health/liveness", proc, 180, log)
            return f"http://127.0.0.1:{port}"

        bases = {w: start_proxy(w) for w in args.workers}
        t0 = time.monotonic()
        task_ok = True
        try:
            info = warm_task(bases[args.workers[0]])
            notes.append(f"warm-up: {info} in {time.monotonic() - t0:.1f}s ({args.generator} generator)")
        except RuntimeError as exc:
            task_ok = False
            notes.append(f"task path not measured: {exc}")

        litellm_base = None
        if not args.skip_litellm:
            command = litellm_command()
            if command is None:
                notes.append("litellm proxy: skipped: not installed")
            else:
                lcfg = work / "litellm.yaml"
                lcfg.write_text(yaml.safe_dump({"model_list": [{"model_name": PASSTHROUGH, "litellm_params": {
                    "model": "openai/fake-model", "api_base": upstream_base, "api_key": "no-key"}}],
                    "general_settings": {"master_key": LITELLM_MASTER_KEY}}))
                llog = work / "litellm.log"
                with llog.open("wb") as out:
                    lproc = subprocess.Popen([*command, "--config", str(lcfg), "--port", str(litellm_port),
                                              "--num_workers", "1"], cwd=work, stdout=out,
                                             stderr=subprocess.STDOUT, env={**env, "LITELLM_LOG": "ERROR"})
                procs.append(lproc)
                try:
                    wait_http(f"http://127.0.0.1:{litellm_port}/health/liveliness", lproc, 240, llog)
                    litellm_base = f"http://127.0.0.1:{litellm_port}"
                except RuntimeError as exc:
                    notes.append(f"litellm proxy: skipped: did not start ({str(exc)[:200]})")

        ours = {"authorization": f"Bearer {CLIENT_KEY}"}
        targets: list[tuple[str, str | None, str, str, dict | None]] = [
            ("direct", upstream_base, "fake-model", "fake answer: 1 messages", None)]
        for w, base in bases.items():
            targets += [(f"task[w{w}]", f"{base}/v1" if task_ok else None, TASK, "fake answer: 2 messages", ours),
                        (f"passthrough[w{w}]", f"{base}/v1", PASSTHROUGH, "fake answer: 1 messages", ours)]
        targets.append(("litellm", f"{litellm_base}/v1" if litellm_base else None, PASSTHROUGH,
                        "fake answer: 1 messages", {"authorization": f"Bearer {LITELLM_MASTER_KEY}"}))
        for name, *_ in targets:
            results[name] = {}
        kinds = () if args.skip_upstream_cells else UPSTREAM_KINDS
        for kind in kinds:
            results[f"upstream:{kind}"] = {}
        per_round = argparse.Namespace(seconds=args.seconds / args.rounds, client=args.client,
                                       requests=max(1, args.requests // args.rounds))
        for c in args.concurrency:
            for _ in range(args.rounds):
                for name, base, model, expect, headers in targets:
                    if base is None:
                        results[name][c] = "skipped"
                        continue
                    r = asyncio.run(http_cell(f"{base}/chat/completions", model, c, per_round, expect, headers))
                    prev = results[name].get(c)
                    results[name][c] = prev.merge(r) if isinstance(prev, Result) else r
                for kind in kinds:
                    r = asyncio.run(upstream_cell(kind, upstream_base, c, per_round))
                    prev = results[f"upstream:{kind}"].get(c)
                    results[f"upstream:{kind}"][c] = prev.merge(r) if isinstance(prev, Result) else r
    finally:
        for proc in reversed(procs):
            stop(proc, 120 if args.profile else 10)
        shutil.rmtree(work, ignore_errors=True)

    notes.insert(0, f"load average at start: {load_start}")
    notes.insert(1, f"load average at end:   {load_average()}")
    if args.profile:
        notes.append(f"profile of the 1-worker proxy: {args.profile}")
    report(results, args.concurrency, notes, args.json, args.client, args.workers)


def report(results: dict[str, dict[int, Any]], concurrency: list[int], notes: list[str], path: Path | None,
           client: str, workers: list[int]) -> None:
    print(f"\nproxy overhead on {os.cpu_count()} cores, non-streaming chat, upstream = local fake, "
          f"load from {client}")
    for n in notes:
        print(f"  {n}")
    head = "".join(f"{f'c={c} req/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'p99/p50':>8}" for c in concurrency)
    print(f"\n{'target':<20}{head}   errors")
    for name, cells in results.items():
        row, errs = "", 0
        for c in concurrency:
            r = cells.get(c)
            if isinstance(r, Result):
                row += f"{r.rps:>12.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.p99_ms / r.p50_ms:>8.1f}"
                errs += r.errors
            else:
                row += f"{'skipped':>12}{'':>26}"
        print(f"{name:<20}{row}   {errs}")

    def get(name: str, c: int) -> Result | None:
        r = results.get(name, {}).get(c)
        return r if isinstance(r, Result) else None

    print("\nratios (same rounds, so machine load hits both sides alike)")
    for c in concurrency:
        direct, lite = get("direct", c), get("litellm", c)
        for w in workers:
            for kind in ("task", "passthrough"):
                r = get(f"{kind}[w{w}]", c)
                if r is None:
                    continue
                parts = [f"c={c:<3} {kind}[w{w}]:"]
                if direct and direct.rps:
                    parts.append(f"{r.rps / direct.rps:.2f}x direct req/s")
                if lite and lite.rps:
                    parts.append(f"{r.rps / lite.rps:.1f}x LiteLLM proxy req/s")
                parts.append(f"p99/p50 {r.p99_ms / r.p50_ms:.1f}")
                print("  " + "   ".join(parts))
        slow = get("upstream:litellm", c)
        for kind in ("aiohttp", "httpx"):
            fast = get(f"upstream:{kind}", c)
            if fast and slow and slow.rps:
                print(f"  c={c:<3} upstream fast path ({kind}) / litellm.acompletion req/s = {fast.rps / slow.rps:.1f}x")
    c1 = concurrency[0]
    direct = get("direct", c1)
    for name in results:
        r = get(name, c1)
        if direct and r and name != "direct" and not name.startswith("upstream:"):
            bar = "   (bar: <= 3 ms)" if name.startswith("task") else ""
            print(f"  c={c1}: {name} added p50 vs direct = {r.p50_ms - direct.p50_ms:+.2f} ms{bar}")
    if path:
        path.write_text(json.dumps({"notes": notes, "results": {
            name: {str(c): r.summary() if isinstance(r, Result) else r for c, r in cells.items()}
            for name, cells in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
