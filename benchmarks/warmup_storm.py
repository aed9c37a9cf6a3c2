"""Warm-up storm: does DP generation starve the server? Probes idle vs. during 20+ queued warm-ups.

One ``dpicl serve`` process (SQLite store) with a fake OpenAI upstream on loopback. The benchmark

1. uploads TREC questions, creates a *cached* task on the fake upstream and warms it (the probe
   for "a request to an already-cached task");
2. probes, one request after another for ``--seconds``: ``GET /health/readiness``, an admin read
   (``GET /admin/datasets``) and a chat completion to the cached task -- the **idle** phase;
3. queues ``--warmups`` warm-ups of distinct sets (``POST /admin/tasks/{t}/demos`` without wait),
   checks the generation is running, and probes again for ``--seconds`` -- the **storm** phase;
4. prints p50/p99 of each probe idle vs. storm, the storm/idle p99 ratio (goal: within 2x), probe
   timeouts (10 s), the load average at start and end, and how far the storm got.

Generation uses the built-in SmolLM2 by default (``--model tiny`` builds a tiny random Llama with the
SmolLM2 tokenizer; ``--model DIR`` any local model directory). Run it niced on a shared machine:

    nice -n 10 python benchmarks/warmup_storm.py [--warmups 24] [--seconds 20] [--model tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DPICL_CACHE_DIR", "/tmp/dpicl-cache")

import httpx  # noqa: E402
import yaml  # noqa: E402

from proxy.devtools.fake_upstream import free_port  # noqa: E402
from proxy.devtools.fake_upstream import spawn as spawn_fake  # noqa: E402
from tests.tiny_model import save_tiny_model  # noqa: E402

ADMIN_KEY = "bench-admin-key"
CLIENT_KEY = "sk-bench-client-0123456789abcdef"
PROBE_TIMEOUT = 10.0
INSTRUCTION = "Classify each question by the type of its answer."
LABEL_WORDS = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "person",
               "LOC": "location", "NUM": "number"}


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def start_server(config: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "DPICL_ADMIN_KEY": ADMIN_KEY, "APP1_KEY": CLIENT_KEY}
    env.pop("DPICL_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--config", str(config)],
                            cwd=str(REPO), env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/readiness", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"server did not become ready; see {log}")


def trec_jsonl(per_label: int) -> bytes:
    import json

    from aggregation.datasets import load_trec

    rows, seen = [], {}
    for ex in load_trec():
        if seen.get(ex.label, 0) < per_label:
            seen[ex.label] = seen.get(ex.label, 0) + 1
            rows.append(json.dumps({"text": ex.text, "label": ex.label}))
    return ("\n".join(rows) + "\n").encode()


async def probe_phase(base: str, seconds: float) -> dict[str, list[float]]:
    """Sequential probes (readiness, admin read, cached-task chat) for ``seconds``; latencies in s
    (a timeout counts as PROBE_TIMEOUT and is also counted apart)."""
    adm = {"Authorization": f"Bearer {ADMIN_KEY}"}
    cli = {"Authorization": f"Bearer {CLIENT_KEY}"}
    chat = {"model": "cached", "messages": [{"role": "user", "content": "Question: where is Rome?\nAnswer type:"}],
            "max_tokens": 4}
    out: dict[str, list[float]] = {"readiness": [], "admin read": [], "cached task": [], "timeouts": []}
    async with httpx.AsyncClient(base_url=base, timeout=PROBE_TIMEOUT) as http:
        calls = [("readiness", lambda: http.get("/health/readiness")),
                 ("admin read", lambda: http.get("/admin/datasets", headers=adm)),
                 ("cached task", lambda: http.post("/v1/chat/completions", json=chat, headers=cli))]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for name, call in calls:
                t0 = time.perf_counter()
                try:
                    r = await call()
                    ok = r.status_code == 200
                except httpx.TimeoutException:
                    ok = False
                    out["timeouts"].append(1.0)
                dt = time.perf_counter() - t0
                out[name].append(dt if ok else PROBE_TIMEOUT)
                await asyncio.sleep(0.02)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmups", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=20.0, help="probing time per phase")
    ap.add_argument("--model", default=None, help="'tiny', a local model directory, or the built-in SmolLM2")
    ap.add_argument("--mode", default="fixed", help="generation mode of the storm's warm-ups")
    ap.add_argument("--tokens", type=int, default=20, help="max_tokens of the storm's warm-ups")
    args = ap.parse_args()
    print(f"load average at start: {loadavg()}  (cores: {os.cpu_count()})")
    tmp = Path(tempfile.mkdtemp(prefix="dpicl-storm-"))
    model_dir = save_tiny_model(tmp / "tiny-model") if args.model == "tiny" else args.model
    fake_port, port = free_port(), free_port()
    fake = spawn_fake(fake_port)
    server = None
    try:
        cfg = {
            "model_list": [{"model_name": "fake-model",
                            "litellm_params": {"model": "openai/fake-model",
                                               "api_base": f"http://127.0.0.1:{fake_port}/v1"}}],
            "store": {"url": f"sqlite:///{tmp}/store.db"},
            "server": {"local_model": model_dir, "cache_recheck_seconds": 5},
            "client_keys": [{"name": "app1", "key_env": "APP1_KEY", "tasks": ["*"]}],
        }
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
        server = start_server(tmp / "config.yaml", port, tmp / "server.log")
        base = f"http://127.0.0.1:{port}"
        adm = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=base, headers=adm, timeout=600) as http:
            r = http.post("/admin/datasets", data={"name": "trec", "epsilon": "100", "labels": ",".join(LABEL_WORDS)},
                          files={"file": ("trec.jsonl", trec_jsonl(200), "application/octet-stream")})
            r.raise_for_status()

            def task(name: str, seed: int, gen: dict) -> dict:
                return {"name": name, "upstream": "fake-model", "dataset": "trec", "instruction": INSTRUCTION,
                        "input_prefix": "Question:", "label_prefix": "Answer type:", "label_words": LABEL_WORDS,
                        "labels": ["LOC", "NUM"], "shots": 1, "epsilon": 1.0, "seed": seed, "generation": gen}

            small = {"mode": "fixed", "num_subsets": 4, "shots_per_subset": 1, "max_tokens": 4, "top_k": 20}
            http.post("/admin/tasks", json=task("cached", 0, small)).raise_for_status()
            t0 = time.perf_counter()
            warm = http.post("/admin/tasks/cached/demos", json={"wait": True})
            assert warm.status_code == 200, warm.text
            print(f"cached task warmed in {time.perf_counter() - t0:.1f} s")
            storm = {"mode": args.mode, "num_subsets": 10, "shots_per_subset": 2, "max_tokens": args.tokens,
                     "top_k": 100, **({"block_tokens": 4} if args.mode == "block" else {})}
            for i in range(args.warmups):
                http.post("/admin/tasks", json=task(f"storm{i}", i + 1, storm)).raise_for_status()

            idle = asyncio.run(probe_phase(base, args.seconds))
            t_queue = time.perf_counter()
            ids = []
            for i in range(args.warmups):
                r = http.post(f"/admin/tasks/storm{i}/demos", json={})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            queue_s = time.perf_counter() - t_queue
            while http.get(f"/admin/warmups/{ids[0]}").json()["state"] == "queued":
                time.sleep(0.1)
            busy = asyncio.run(probe_phase(base, args.seconds))
            states = [w["state"] for w in http.get("/admin/warmups").json()["data"] if w["task"].startswith("storm")]
            for wid in ids:  # leave nothing queued behind
                http.post(f"/admin/warmups/{wid}/cancel")
        print(f"queued {args.warmups} warm-ups in {queue_s:.2f} s (202 each); "
              f"during the storm: {states.count('running')} running, {states.count('done')} done, "
              f"{states.count('queued')} queued, {states.count('failed')} failed")
        print(f"\n{'probe':<14}{'idle n':>8}{'idle p50':>10}{'idle p99':>10}{'storm n':>9}{'storm p50':>11}"
              f"{'storm p99':>11}{'p99 ratio':>11}")
        for name in ("readiness", "admin read", "cached task"):
            a, b = idle[name], busy[name]
            ratio = pct(b, 99) / pct(a, 99) if pct(a, 99) > 1e-4 else float("nan")
            print(f"{name:<14}{len(a):>8}{1000 * pct(a, 50):>9.1f}ms{1000 * pct(a, 99):>8.1f}ms{len(b):>9}"
                  f"{1000 * pct(b, 50):>9.1f}ms{1000 * pct(b, 99):>9.1f}ms{ratio:>10.2f}x")
        print(f"probe timeouts ({PROBE_TIMEOUT:.0f} s): idle {len(idle['timeouts'])}, storm {len(busy['timeouts'])}")
        print(f"goal: storm p99 within 2x of idle p99.  load average at end: {loadavg()}")
    finally:
        for proc in (server, fake):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
