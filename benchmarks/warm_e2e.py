"""End to end: time to warm the README's example task through the HTTP API, per generation mode.

Starts ``dpicl serve`` (SQLite, the built-in SmolLM2 unless ``--model``), uploads the TREC training
questions with the six-label domain, and for each variant creates the example task of
``examples/config.yaml`` (``trec-classifier``: 6 labels, 1 shot, its epsilon, M, N, T, K) with the
variant's ``mode`` / ``block_tokens`` / ``max_prompt_tokens``, then ``POST .../demos {"wait": true}``.
A first, unmeasured warm-up loads the model and releases the DP pool sizes, so every measured row
pays only its own generation (plus planning and the ledger write).

Per row: the server's own split of the warm-up's seconds (model forward, sampling and noise,
accounting and the ledger write, store reads and writes, model load, the rest), wall seconds of the POST, CPU seconds the server process used meanwhile (all threads,
from /proc), CPU/2 (a floor for the wall time on 2 idle cores if generation used both fully),
the charged epsilon, tokens generated, and the load average before and after. Variants run in
rounds (order rotated) and the median over rounds is printed. On a shared machine wall time
mostly measures the other processes; the CPU seconds are the steadier figure.

    nice -n 10 python benchmarks/warm_e2e.py [--rounds 1] [--variants fixed,block4,resample] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
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

ADMIN_KEY = "bench-admin-key"
#: Parts of a warm-up's time, as the warm-up view's ``result.timings`` reports them.
PARTS = ("forward", "sampling", "accounting", "store", "load", "other")
#: The generation defaults before 2026-12-07 (words, no guidance, every token private): the
#: variants measured before then keep measuring what they measured.
PREVIOUS = {"label_hint": "word", "guidance": 1.0, "private_tokens": None}
#: name -> generation overrides of the example task (examples/config.yaml).
VARIANTS = {
    # the example task as configured: today's defaults (aliases, guidance 3, P = 4)
    "default": {},
    "default-auto": {"max_prompt_tokens": "auto"},
    "fixed": {**PREVIOUS, "mode": "fixed"},
    "fixed-w128": {**PREVIOUS, "mode": "fixed", "max_prompt_tokens": 128},
    "block4": {**PREVIOUS, "mode": "block", "block_tokens": 4},
    "block4-w128": {**PREVIOUS, "mode": "block", "block_tokens": 4, "max_prompt_tokens": 128},
    "block2-w128": {**PREVIOUS, "mode": "block", "block_tokens": 2, "max_prompt_tokens": 128},
    "block8-w128": {**PREVIOUS, "mode": "block", "block_tokens": 8, "max_prompt_tokens": 128},
    # max_prompt_tokens: auto (the width from the dataset's DP row-length release)
    "fixed-auto": {**PREVIOUS, "mode": "fixed", "max_prompt_tokens": "auto"},
    "block2-auto": {**PREVIOUS, "mode": "block", "block_tokens": 2, "max_prompt_tokens": "auto"},
    "block4-auto": {**PREVIOUS, "mode": "block", "block_tokens": 4, "max_prompt_tokens": "auto"},
    "block8-auto": {**PREVIOUS, "mode": "block", "block_tokens": 8, "max_prompt_tokens": "auto"},
    "resample-auto": {**PREVIOUS, "mode": "resample", "max_prompt_tokens": "auto"},
    # neutral label aliases and private clusters (issue 19); the first clustered variant of a run
    # also pays the dataset's clustering release (embedding every unit), later ones reuse it
    "fixed-auto-alias": {**PREVIOUS, "mode": "fixed", "max_prompt_tokens": "auto", "label_hint": "alias"},
    "fixed-auto-alias-c4": {**PREVIOUS, "mode": "fixed", "max_prompt_tokens": "auto", "label_hint": "alias",
                            "clusters": 4},
    "block4-auto-alias-c4": {**PREVIOUS, "mode": "block", "block_tokens": 4, "max_prompt_tokens": "auto",
                             "label_hint": "alias", "clusters": 4},
    "block8-auto-alias-c4": {**PREVIOUS, "mode": "block", "block_tokens": 8, "max_prompt_tokens": "auto",
                             "label_hint": "alias", "clusters": 4},
    "resample": {**PREVIOUS, "mode": "resample"},
    "resample-w128": {**PREVIOUS, "mode": "resample", "max_prompt_tokens": 128},
    # a private prefix of P = 4 tokens with aliases and guidance 3 (the README's finite-epsilon rows)
    "fixed-auto-prefix4": {"mode": "fixed", "max_prompt_tokens": "auto", "label_hint": "alias", "guidance": 3.0,
                           "private_tokens": 4},
    "fixed-auto-prefix4-m20": {"mode": "fixed", "max_prompt_tokens": "auto", "label_hint": "alias",
                               "guidance": 3.0, "private_tokens": 4, "num_subsets": 20},
    "resample-auto-prefix4": {"mode": "resample", "max_prompt_tokens": "auto", "label_hint": "alias",
                              "guidance": 3.0, "private_tokens": 4},
    "resample-auto-prefix4-m20": {"mode": "resample", "max_prompt_tokens": "auto", "label_hint": "alias",
                                  "guidance": 3.0, "private_tokens": 4, "num_subsets": 20},
}


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def example_task() -> dict:
    cfg = yaml.safe_load((REPO / "examples" / "config.yaml").read_text())
    task = next(t for t in cfg["tasks"] if t["name"] == "trec-classifier")
    return {k: v for k, v in task.items() if k not in ("generator",)}


def trec_jsonl() -> bytes:
    from aggregation.datasets import load_trec

    return "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in load_trec()).encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--variants", default="fixed,fixed-w128,block4,block4-w128,resample-w128,resample")
    ap.add_argument("--model", default=None, help="local model directory (default: the built-in SmolLM2)")
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "int8"],
                    help="server.local_precision of the generator model")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    base_task = example_task()
    print(f"load average at start: {loadavg()}  (cores: {os.cpu_count()})")
    print(f"example task: {len(base_task['label_words'])} labels, shots {base_task['shots']}, epsilon "
          f"{base_task['epsilon']}, generation {base_task['generation']}")
    tmp = Path(tempfile.mkdtemp(prefix="dpicl-warm-e2e-"))
    cfg = {"store": {"url": f"sqlite:///{tmp}/store.db"}, "server": {"local_model": args.model,
                                                                    "local_precision": args.precision}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    env = {**os.environ, "DPICL_ADMIN_KEY": ADMIN_KEY}
    env.pop("DPICL_CONFIG", None)
    log = tmp / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--port", str(port),
                               "--config", str(tmp / "config.yaml")], cwd=str(REPO), env=env,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)
    rows: dict[str, list[dict]] = {n: [] for n in names}
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/health/readiness", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"server did not start; see {log}")
            time.sleep(0.2)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=3600) as http:
            labels = ",".join(base_task["label_words"])
            http.post("/admin/datasets", data={"name": "trec", "epsilon": "100", "labels": labels},
                      files={"file": ("trec.jsonl", trec_jsonl(), "application/octet-stream")}).raise_for_status()
            warm_gen = {**base_task["generation"], "mode": "fixed", "max_tokens": 2}
            http.post("/admin/tasks", json={**base_task, "name": "load", "generation": warm_gen}).raise_for_status()
            t0 = time.perf_counter()
            r = http.post("/admin/tasks/load/demos", json={"wait": True})
            assert r.status_code == 200, r.text
            print(f"unmeasured first warm-up (model load, pool-size release): {time.perf_counter() - t0:.1f} s")
            seed = 100
            for rnd in range(args.rounds):
                order = names[rnd % len(names):] + names[:rnd % len(names)]
                for name in order:
                    seed += 1
                    gen = {**base_task["generation"], **VARIANTS[name]}
                    # A fresh revision per row: a new cache key, so every row really generates.
                    task = {**base_task, "name": f"{name}-{rnd}", "revision": seed, "generation": gen}
                    http.post("/admin/tasks", json=task).raise_for_status()
                    before_load, cpu0, t0 = loadavg(), cpu_seconds(server.pid), time.perf_counter()
                    r = http.post(f"/admin/tasks/{task['name']}/demos", json={"wait": True})
                    wall, cpu = time.perf_counter() - t0, cpu_seconds(server.pid) - cpu0
                    assert r.status_code == 200, r.text
                    view = r.json()
                    demos = view["result"]["demonstrations"]
                    parts = view["result"].get("timings") or {}
                    rows[name].append({"wall": wall, "cpu": cpu, "eps": view["epsilon_cost"],
                                       "tokens": view["tokens_total"], "demos": len(demos),
                                       "load": f"{before_load} -> {loadavg()}",
                                       **{p: parts.get(p, 0.0) for p in PARTS}})
                    print(f"  round {rnd + 1} {name:<14} wall {wall:7.1f} s  cpu {cpu:7.1f} s  "
                          f"epsilon {view['epsilon_cost']:.3f}  load {before_load} -> {loadavg()}", flush=True)
                    print("    where the time went: " + "  ".join(f"{p} {parts.get(p, 0.0):.1f} s" for p in PARTS),
                          flush=True)
                    print("    " + " | ".join(f"{d['label']}: {d['text'][:40]!r}" for d in demos[:3]), flush=True)
        print(f"\n{'variant':<27}{'mode':<9}{'k':>4}{'width':>7}{'wall s':>9}{'cpu s':>9}{'cpu/2 s':>9}"
              f"{'epsilon':>9}{'T total':>9}")
        for name in names:
            if not rows[name]:
                continue
            gen = {**base_task["generation"], **VARIANTS[name]}
            med = {k: statistics.median(r[k] for r in rows[name]) for k in ("wall", "cpu", "eps")}
            private = min(gen.get("private_tokens") or gen["max_tokens"], gen["max_tokens"])
            k = gen.get("block_tokens") or (1 if gen["mode"] == "resample" else private)
            print(f"{name:<27}{gen['mode']:<9}{k:>4}{gen.get('max_prompt_tokens', 256):>7}{med['wall']:>9.1f}"
                  f"{med['cpu']:>9.1f}{med['cpu'] / 2:>9.1f}{med['eps']:>9.3f}{rows[name][0]['tokens']:>9}")
        print(f"\nmedian seconds by part (server side; 'other' is the warm-up's own rest):\n{'variant':<27}"
              + "".join(f"{p:>12}" for p in PARTS))
        for name in names:
            if rows[name]:
                print(f"{name:<27}" + "".join(f"{statistics.median(r[p] for r in rows[name]):>12.2f}" for p in PARTS))
        print(f"\ngoal: the example task's set ready in <= 60 s on 2 idle cores.  load average at end: {loadavg()}")
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
