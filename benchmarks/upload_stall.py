"""Upload vs budget writes: does a large dataset upload stall the ledger's writers? (issue 20 §1)

Run: ``nice python benchmarks/upload_stall.py --rows 200000`` (SQLite in a temporary directory;
``--store redis://...`` for Redis). The rows are the TREC sample (``dpicl data trec``) repeated.

1. Optionally (default on) a dataset with one 9 MB row is stored first, as in the issue.
2. Idle: a second connection changes a budget every 20 ms for 2 s; we record each call's latency.
3. Upload: the same writer runs while ``create_dataset`` stores the rows (staged: short chunks,
   pauses between them, one publishing step) and, with ``--compare``, while the old way runs (all
   rows in one write transaction: ``add`` of everything in one chunk).

Printed: upload rows/s, budget-write p50/p99/max during the upload vs idle (and their ratio), the
slowest write, failures, and the load average at start and end (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _open(url: str, timeout: float = 60.0):
    from proxy.store import open_store
    from proxy.store.sqlite import SqliteStore

    if url.startswith("sqlite:///"):
        return SqliteStore(url[len("sqlite:///"):], timeout=timeout)
    return open_store(url)


class BudgetWriter(threading.Thread):
    """Changes one population's budget every ``period`` seconds on its own connection."""

    def __init__(self, url: str, name: str, period: float = 0.02):
        super().__init__(daemon=True)
        self.store, self.name, self.period = _open(url), name, period
        self.latencies: list[float] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        eps = 4.0
        while not self.stop.is_set():
            eps = 8.0 if eps == 4.0 else 4.0
            start = time.perf_counter()
            try:
                self.store.set_budget(self.name, eps, 1e-5, lambda pop, ledger: None)
                self.latencies.append(time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - counted (a timeout is what we look for)
                self.failures += 1
            self.stop.wait(self.period)


def _stats(lat: list[float]) -> dict[str, float]:
    if not lat:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    ordered = sorted(lat)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"n": len(ordered), "p50": statistics.median(ordered) * 1e3, "p99": p99 * 1e3, "max": ordered[-1] * 1e3}


def _measure(url: str, work) -> tuple[float, dict[str, float], int]:
    writer = BudgetWriter(url, "probe")
    writer.start()
    start = time.perf_counter()
    work()
    took = time.perf_counter() - start
    writer.stop.set()
    writer.join()
    return took, _stats(writer.latencies), writer.failures


def _line(label: str, s: dict[str, float], idle: dict[str, float], failures: int) -> str:
    ratio = s["p99"] / idle["p99"] if idle["p99"] else float("nan")
    return (f"{label:<28} writes {s['n']:>5}  p50 {s['p50']:8.2f} ms  p99 {s['p99']:8.2f} ms  "
            f"max {s['max']:8.1f} ms  p99 vs idle {ratio:7.1f}x  failed {failures}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--store", default=None, help="store URL (default: a fresh SQLite file)")
    ap.add_argument("--no-big-row", action="store_true", help="skip the 9 MB row stored first")
    ap.add_argument("--compare", action="store_true", help="also time the old single-transaction insert")
    ap.add_argument("--chunk-rows", type=int, default=None, help="override CHUNK_ROWS (tuning)")
    ap.add_argument("--pause-ratio", type=float, default=None, help="override PAUSE_RATIO (tuning)")
    args = ap.parse_args()

    from aggregation.datasets import load_trec
    from proxy.store import uploads

    if args.chunk_rows:
        uploads.CHUNK_ROWS = args.chunk_rows
    if args.pause_ratio is not None:
        uploads.PAUSE_RATIO = args.pause_ratio

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    tmp = tempfile.mkdtemp(prefix="dpicl-upload-")
    url = args.store or f"sqlite:///{tmp}/bench.db"
    store = _open(url)
    sample = [(e.text, e.label) for e in load_trec()]
    rows = [sample[i % len(sample)] for i in range(args.rows)]
    labels = sorted({lab for _, lab in sample})
    store.create_dataset("probe", [("probe row", labels[0])], 4.0, 1e-5, labels=labels)
    if not args.no_big_row:
        store.create_dataset("big", [("x" * 9_000_000, labels[0])], 4.0, 1e-5, labels=labels)
    print(f"store {url.split('://')[0]}, {args.rows} TREC rows, chunks of {uploads.CHUNK_ROWS} rows, "
          f"pause {uploads.PAUSE_RATIO:g}x the chunk's time, "
          f"9 MB row first: {not args.no_big_row}", flush=True)

    _, idle, idle_fail = _measure(url, lambda: time.sleep(2.0))
    print(_line("idle", idle, idle, idle_fail), flush=True)

    took, during, fail = _measure(url, lambda: store.create_dataset("upload", rows, 4.0, 1e-5, labels=labels))
    print(f"staged upload: {args.rows} rows in {took:.2f} s = {args.rows / took:,.0f} rows/s", flush=True)
    print(_line("during staged upload", during, idle, fail), flush=True)

    if args.compare:
        def old_way() -> None:
            up = store.begin_upload("upload-old", 4.0, 1e-5, labels=labels)
            up.add(rows)  # one write transaction for every row, as before issue 20
            up.commit()

        took_old, during_old, fail_old = _measure(url, old_way)
        print(f"one-transaction upload: {args.rows} rows in {took_old:.2f} s = {args.rows / took_old:,.0f} rows/s "
              f"(staged/old time {took / took_old:.2f}x)", flush=True)
        print(_line("during one-transaction", during_old, idle, fail_old), flush=True)
    store.close()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
