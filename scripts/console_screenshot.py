"""Save a screenshot of the admin console's budgets page to docs/img/console-budgets.png.

Starts ``dpicl serve`` (this checkout, defaults: SQLite in a temporary directory, the built-in
SmolLM2) on a free port, uploads the TREC sample, warms a small task twice (two seeds, so the
chart has several points) with a budget raise in between (the budget line steps), then opens /admin/ui in headless chromium (Playwright, the system's
/usr/bin/chromium) and saves the budgets page. Takes a few minutes on 2 CPU cores.

    python scripts/console_screenshot.py [--out docs/img/console-budgets.png]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def warm(http: httpx.Client, task: str) -> None:
    """Warm ``task`` and wait for it, whether the server answers 202 (background) or 200/201."""
    resp = http.post(f"/admin/tasks/{task}/demos", json={})
    resp.raise_for_status()
    view = resp.json()
    while view.get("object") == "warmup" and view.get("state") not in ("done", "failed", "cancelled"):
        time.sleep(2)
        view = http.get(f"/admin/warmups/{view['id']}").json()
        print(f"  {task}: {view.get('state')} {view.get('tokens_done')}/{view.get('tokens_total')} tokens", flush=True)
    if view.get("state") in ("failed", "cancelled"):
        raise SystemExit(f"warm-up of {task} {view['state']}: {view.get('error')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "console-budgets.png")
    parser.add_argument("--chromium", default=os.environ.get("DPICL_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()

    from aggregation.datasets import load_trec
    from playwright.sync_api import sync_playwright

    key, port = secrets.token_urlsafe(16), free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="dpicl-shot-"))
    env = {**os.environ, "DPICL_ADMIN_KEY": key, "DPICL_DATA_DIR": str(tmp), "PYTHONPATH": str(ROOT),
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("DPICL_CONFIG", None)
    server = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=(tmp / "server.log").open("w"), start_new_session=True)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=3600) as http:
            for _ in range(240):
                try:
                    if http.get("/health/readiness").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            rows = "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in load_trec())
            labels = "ABBR,DESC,ENTY,HUM,LOC,NUM"
            http.post("/admin/datasets", data={"name": "trec", "labels": labels, "epsilon": "4"},
                      files={"file": ("trec.jsonl", rows.encode())}).raise_for_status()
            for seed in (0, 1):
                spec = {"name": "trec-quick", "dataset": "trec", "instruction": "Classify each question by the type of its answer.",
                        "input_prefix": "Question:", "label_prefix": "Answer type:", "labels": ["LOC", "NUM", "HUM"],
                        "epsilon": 0.8, "seed": seed,
                        "generation": {"mode": "fixed", "num_subsets": 6, "max_tokens": 8}}
                http.post("/admin/tasks", json=spec).raise_for_status()
                print(f"warming trec-quick (seed {seed})", flush=True)
                warm(http, "trec-quick")
                if seed == 0:  # a budget change between the warm-ups: the chart's budget line steps
                    http.put("/admin/budget/trec", json={"epsilon": 5}).raise_for_status()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 760}, device_scale_factor=1)
            page.goto(f"{url}/admin/ui/#budgets")
            page.fill("#admin-key", key)
            page.click("#signin-form button")
            page.wait_for_selector('[data-chart="trec"] canvas', timeout=60_000)
            page.wait_for_timeout(500)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


if __name__ == "__main__":
    main()
