"""Offline-job benchmark: seconds per PE iteration, and DP-SGD vs non-private LoRA step time.

Run: ``nice -n 10 python benchmarks/jobs.py`` (SmolLM2-135M on CPU, MiniLM embeddings, TREC).

* PE: one label's population evolves for a few iterations with the local model as RANDOM /
  VARIATION API; we print the mean seconds per iteration (embed + noisy histogram + variation).
* DP-SGD: the same LoRA (r=8, q/v) on SmolLM2 trains on the same Poisson batches (same seed, so the
  same batch sizes; expected batch 16, 48 tokens) once with Opacus (per-sample clipping + noise)
  and once without; runs alternate (A B A B) so drift on a shared machine hits both. We print the
  median step time of each and their ratio (bar: DP-SGD at most 1.5x the non-private step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DPICL_CACHE_DIR", "/tmp/dpicl-cache")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def bench_pe(iterations: int, population: int, label: str = "LOC") -> float:
    from aggregation.datasets import TREC_PROMPT, load_trec
    from aggregation.embeddings import MiniLMEmbedder
    from aggregation.mechanisms import Noise
    from aggregation.pe import PEConfig, plan_pe, run_pe
    from proxy.jobs.backends import LocalTextGenerator, _fill
    from aggregation.pe import random_prompt, variation_prompt

    rows = [r for r in load_trec() if r.label == label][:400]
    gen = LocalTextGenerator(None)
    embed = MiniLMEmbedder()
    embed(["warm up"])
    gen.complete(["warm up"], 2, 1.0)

    def random_api(lab: str, n: int) -> list[str]:
        return _fill(lambda k: gen.complete([random_prompt(TREC_PROMPT, lab)] * k, 30, 1.0), n)

    def variation_api(texts: list[str], lab: str) -> list[str]:
        out = gen.complete([variation_prompt(TREC_PROMPT, t, lab) for t in texts], 30, 1.0)
        return [o or t for o, t in zip(out, texts)]

    plan = plan_pe(PEConfig(epsilon=4.0, iterations=iterations, population=population, num_samples=population),
                   [label], 1e-5)
    # The plan charges the label histogram, so run_pe releases the counts itself (DP, not exact).
    res = run_pe(plan, rows, random_api, variation_api, embed, Noise(0))
    return statistics.mean(res.iteration_seconds)


def bench_dpsgd(steps: int, rounds: int) -> tuple[float, float]:
    from aggregation.datasets import TREC_PROMPT, load_trec
    from aggregation.dpsgd import DPSGDConfig, plan_dpsgd, run_dpsgd
    from aggregation.fewshot import noisy_pool_sizes, pools_by_label
    from aggregation.mechanisms import Noise
    from aggregation.sources.local import load_model

    rows = load_trec()[:800]
    # plan_dpsgd takes DP label counts only (q must not depend on exact sizes).
    counts, _ = noisy_pool_sizes({lab: len(p) for lab, p in pools_by_label(rows).items()}, Noise(0))
    cfg = DPSGDConfig(noise_multiplier=1.0, batch_size=16, steps=steps, max_length=48, num_samples=1,
                      max_new_tokens=1)
    plan = plan_dpsgd(cfg, counts, 1e-5)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for private in (False, True):
            model, tok = load_model(None)
            with tempfile.TemporaryDirectory() as tmp:
                res = run_dpsgd(plan, rows, model, tok, tmp, task=TREC_PROMPT, seed=0, private_training=private)
            times[private].extend(res.step_seconds[2:])  # the first steps warm up allocators
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pe-iterations", type=int, default=3)
    ap.add_argument("--pe-population", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-pe", action="store_true", help="only the DP-SGD vs non-private comparison")
    args = ap.parse_args()
    import torch

    print(f"torch threads: {torch.get_num_threads()}")
    print(f"load average at start: {tuple(round(x, 2) for x in os.getloadavg())}  (cores: {os.cpu_count()})")
    started = time.perf_counter()
    if not args.skip_pe:
        pe = bench_pe(args.pe_iterations, args.pe_population)
        print(f"PE: {pe:.2f} s per iteration (population {args.pe_population}, SmolLM2 variation + MiniLM)")
    plain, dp = bench_dpsgd(args.steps, args.rounds)
    print(f"LoRA step, non-private: {plain * 1000:.0f} ms  ({1 / plain:.2f} steps/s)")
    print(f"LoRA step, DP-SGD:      {dp * 1000:.0f} ms  ({1 / dp:.2f} steps/s)")
    ratio = dp / plain
    print(f"DP-SGD / non-private step time: {ratio:.2f}x  (bar: <= 1.5x) -> {'OK' if ratio <= 1.5 else 'OVER'}")
    print(f"total {time.perf_counter() - started:.0f} s")
    print(f"load average at end: {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
