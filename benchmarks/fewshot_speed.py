"""DP generation cost per demonstration token, measured directly, side by side in one run.

Every variant runs on the same model, the same M private prompts and the same public width,
interleaved round by round (the order rotates) so that machine noise hits all alike:

  * the model's own batched KV-cached decode step of the M rows (the floor; each step timed),
  * ``fixed`` (one Poisson sample per demonstration), ``block`` k = 2, 4, 8, ``resample``
    (k = 1), and the public-prior mechanism in fixed mode: the generator stamps the wall clock
    at every token (``on_token``), so each token's cost is its own measurement,
  * the naive approach (the M prompts re-encoded one by one for every token; each token timed).

Per round a variant yields its mean seconds per token over the demonstration (``amortised``:
opening the batch and prefill included), the median time of the tokens that start a block (a
fresh Poisson sample: the M prompts are opened and encoded) and the median time of the tokens
inside a block (one KV-cached decode step). Ratios to the decode step are formed within a round
(same load) and summarised by the median and range over rounds. A ratio is printed only when its denominator was measured
clearly above zero; otherwise it reads "not measurable". Nothing here is a difference of totals.

Also printed: cold and warm calibration of a plan (with the in-process cache), and epsilon for a
fixed sigma against block length k = 1, 2, 4, 8, T with the measured cost per token.

Usage: python benchmarks/fewshot_speed.py [--quick] [--rounds 3] [--tokens 16] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import torch

from aggregation import accounting
from aggregation.calibration import LruCalibrationCache
from aggregation.datasets import TREC_PROMPT, load_trec
from aggregation.fewshot import GenerationConfig, generate_demonstration, plan_demonstrations, pools_by_label
from aggregation.mechanisms import Noise, demonstration_event
from aggregation.prompts import TaskPrompt
from aggregation.sources.local import LocalSource

#: A denominator below this many seconds is not "clearly positive" (timer and scheduler noise).
MIN_MEASURABLE = 1e-4


class NeverStop(TaskPrompt):
    """The TREC prompt with a stop marker that never occurs, so runs go to T tokens (or EOS)."""

    @property
    def stop(self) -> str:
        return "\x00never\x00"


def _prompt_of_about(source: LocalSource, pool, label: str, target_tokens: int, shots: int) -> tuple[TaskPrompt, int]:
    """Pad the instruction so that a prompt with N examples has about ``target_tokens`` tokens."""
    have = len(source.encode(TREC_PROMPT.generation_prompt(pool[:shots], label)))
    filler = " Questions should be short, natural and answerable." * max(0, (target_tokens - have) // 9)
    prompt = NeverStop(TREC_PROMPT.instruction + filler, TREC_PROMPT.input_prefix, TREC_PROMPT.label_prefix,
                       TREC_PROMPT.label_words)
    return prompt, len(source.encode(prompt.generation_prompt(pool[:shots], label)))


def decode_steps(source: LocalSource, prompts: list[str], steps: int, width: int) -> list[float]:
    """Wall time of each batched KV-cached decode step of all prompts (padded to ``width``)."""
    state = source.open(prompts, keep_state=True, width=width)
    token = source.encode(" the")[0]
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state.advance(token)
        out.append(time.perf_counter() - t0)
    return out


def naive_tokens(source: LocalSource, prompts: list[str], tokens: int) -> list[float]:
    """Wall time per token when each of the M prompts is re-encoded on its own."""
    out = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        for p in prompts:
            source.open([p]).probs([0])
        out.append(time.perf_counter() - t0)
    return out


def generation_tokens(source, prompt, pool, label, config: GenerationConfig, delta: float) -> list[float]:
    """Wall time of each generated token: stamped by the generator's ``on_token`` callback.

    The first entry runs from the call (opening and prefill included); each later entry covers
    advancing the previous token and choosing this one.
    """
    plan = plan_demonstrations(config, {label: 1}, {label: float(len(pool))}, delta)
    stamps: list[float] = []
    t0 = time.perf_counter()
    generate_demonstration(source, prompt, pool, label, config, plan.labels[label], Noise(0),
                           on_token=lambda _step: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip([t0, *stamps[:-1]], stamps)]


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} [{min(values):.4f}-{max(values):.4f}]"


def _ratio(num: list[float], den: list[float]) -> str:
    """Median and range of per-round ratios; 'not measurable' unless every denominator is clearly > 0."""
    if not den or min(den) < MIN_MEASURABLE:
        return "not measurable"
    r = [n / d for n, d in zip(num, den)]
    return f"{statistics.median(r):6.2f} [{min(r):.2f}-{max(r):.2f}]"


def calibration_times(q_pool: float, args, delta: float) -> list[tuple[str, float, float]]:
    """Cold and warm plan times (seconds per label) with a fresh in-process calibration cache."""
    out = []
    for name, kw in [("resample", dict(mode="resample")), ("fixed", dict(mode="fixed")),
                     ("block k=4", dict(mode="block", block_tokens=4)),
                     ("public prior, resample", dict(mode="resample", mechanism="public_prior"))]:
        cache = LruCalibrationCache()
        config = GenerationConfig(num_subsets=args.subsets, shots_per_subset=args.shots, max_tokens=args.tokens,
                                  epsilon=4.0, **kw)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            plan_demonstrations(config, {"LOC": 1}, {"LOC": q_pool}, delta, cache=cache)
            times.append(time.perf_counter() - t0)
        out.append((name, times[0], times[1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, T=10, prompts of ~100 tokens (a few minutes)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 2)")
    ap.add_argument("--tokens", type=int, default=None, help="T per demonstration (default 16; quick 10)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="tokens of one private prompt (default 200)")
    ap.add_argument("--naive-tokens", type=int, default=None, help="tokens timed for the naive approach")
    ap.add_argument("--subsets", type=int, default=10, help="M")
    ap.add_argument("--shots", type=int, default=2, help="N private examples per prompt")
    ap.add_argument("--sigma", type=float, default=1.0, help="noise multiplier of the epsilon table")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.tokens = args.tokens or (10 if args.quick else 16)
    args.prompt_tokens = args.prompt_tokens or (100 if args.quick else 200)
    args.naive_tokens = args.naive_tokens or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    print(f"load average at start: {tuple(round(x, 2) for x in os.getloadavg())}")

    source = LocalSource.from_pretrained(args.model)
    pools = pools_by_label(load_trec())
    label, pool = "LOC", pools["LOC"]
    delta = 1e-5
    t_tok, m, n = args.tokens, args.subsets, args.shots
    prompt, plen = _prompt_of_about(source, pool, label, args.prompt_tokens, n)
    prompts = [prompt.generation_prompt(pool[n * i: n * i + n], label) for i in range(m)]
    width = plen + 32  # public batch width: room for a subset a little larger than N
    q = m * n / len(pool)
    print(f"model={args.model or 'SmolLM2-135M-Instruct'} M={m} N={n} prompt~{plen} tokens width={width} T={t_tok} "
          f"q={q:.4f} rounds={args.rounds} threads={args.threads}")

    def config(**kw) -> GenerationConfig:
        return GenerationConfig(num_subsets=m, shots_per_subset=n, max_tokens=t_tok, top_k=100, sigma=args.sigma,
                                max_prompt_tokens=width, **kw)

    ks = [k for k in (2, 4, 8) if k < t_tok]
    variants: dict[str, GenerationConfig] = {
        "fixed (k=T)": config(mode="fixed"),
        **{f"block k={k}": config(mode="block", block_tokens=k) for k in ks},
        "resample (k=1)": config(mode="resample"),
        "public prior, fixed": GenerationConfig(num_subsets=m, shots_per_subset=n, max_tokens=t_tok, top_k=100,
                                                mechanism="public_prior", clip=1.0, temperature=1.0,
                                                max_prompt_tokens=width, mode="fixed"),
    }
    names = ["decode step", *variants, "naive re-encode"]
    amortised: dict[str, list[float]] = {k: [] for k in names}
    starts: dict[str, list[float]] = {k: [] for k in names}  # tokens that open a block
    inside: dict[str, list[float]] = {k: [] for k in names}  # tokens within a block
    # Warm-up (lazy initialisation, allocator) outside the measurements.
    decode_steps(source, prompts, 2, width)
    generation_tokens(source, prompt, pool, label, config(mode="fixed"), delta)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            if name == "decode step":
                times = decode_steps(source, prompts, t_tok, width)
                opening, within = [], times
            elif name == "naive re-encode":
                times = naive_tokens(source, prompts, args.naive_tokens)
                opening, within = times, []
            else:
                times = generation_tokens(source, prompt, pool, label, variants[name], delta)
                k = variants[name].block_length
                opening = [t for i, t in enumerate(times) if i % k == 0]
                within = [t for i, t in enumerate(times) if i % k != 0]
            amortised[name].append(sum(times) / len(times))
            for store, values in ((starts, opening), (inside, within)):
                if values:
                    store[name].append(statistics.median(values))
        print(f"  round {r + 1}/{args.rounds} done, load {tuple(round(x, 2) for x in os.getloadavg())}")

    dec = inside["decode step"]
    print()
    print("seconds per token: median [min-max] over rounds; x decode: per-round ratio to the decode step")
    print(f"{'variant':<22}{'amortised s/token':>27}{'x decode':>22}{'block-start token':>27}"
          f"{'in-block token':>27}{'x decode':>22}")
    for name in names:
        print(f"{name:<22}{_summary(amortised[name]):>27}{_ratio(amortised[name], dec):>22}"
              f"{_summary(starts[name]) if starts[name] else '-':>27}"
              f"{_summary(inside[name]) if inside[name] else '-':>27}"
              f"{_ratio(inside[name], dec) if inside[name] else '-':>22}")
    print("(amortised: all the demonstration's tokens, batch opening and prefill included. A block-start token"
          " draws a fresh sample and encodes the M prompts; an in-block token is one KV-cached step.)")
    print(f"issue 14 bar, resample amortised / decode <= 15: {_ratio(amortised['resample (k=1)'], dec)}")
    print(f"public prior / Gaussian, fixed mode, in-block token (per round): "
          f"{_ratio(inside['public prior, fixed'], inside['fixed (k=T)'])}")
    print(f"public prior / decode step, in-block token (per round): {_ratio(inside['public prior, fixed'], dec)}")

    print()
    print(f"epsilon of one demonstration at sigma={args.sigma} (q={q:.4f}, T={t_tok}, delta={delta}, PLD) "
          f"and measured cost per token")
    print(f"{'k':>4}{'blocks':>8}{'epsilon':>10}{'amortised s/token':>27}{'x decode':>22}")
    rows = [(1, "resample (k=1)"), *[(k, f"block k={k}") for k in ks], (t_tok, "fixed (k=T)")]
    for k, name in rows:
        ev = demonstration_event("block", q, t_tok, sigma=args.sigma, block_tokens=k)
        eps = accounting.epsilon_of([ev], delta)
        print(f"{k:>4}{-(-t_tok // k):>8}{eps:>10.3f}{_summary(amortised[name]):>27}{_ratio(amortised[name], dec):>22}")

    print()
    print(f"calibration of one label for epsilon 4 (q={q:.4f}, T={t_tok}), seconds: cold (empty cache) / warm")
    for name, cold, warm in calibration_times(len(pool), args, delta):
        print(f"  {name:<24} cold {cold:6.2f}   warm {warm:6.2f}")
    print(f"load average at end: {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
