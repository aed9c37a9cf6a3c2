"""DP generation cost per demonstration token, side by side in one run (ratios, not absolutes).

Compares, on the same model and the same M private prompts of about 200 tokens:
  * the model's own batched KV-cached decode step of M sequences (the floor),
  * ``fixed`` mode (one Poisson sample per demonstration, KV caches kept),
  * ``resample`` mode (fresh Poisson sample per token: M prompts re-encoded in one batch),
  * the naive approach (M separate full re-encodes per token, as the reference code did via an API).

Usage: python benchmarks/fewshot_speed.py [--tokens 24] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import torch

from aggregation.datasets import TREC_PROMPT, load_trec
from aggregation.fewshot import GenerationConfig, generate_demonstration, plan_demonstrations, pools_by_label
from aggregation.mechanisms import Noise
from aggregation.prompts import TaskPrompt
from aggregation.sources.local import LocalSource


class NeverStop(TaskPrompt):
    """The TREC prompt with a stop marker that never occurs, so every run makes exactly T tokens."""

    @property
    def stop(self) -> str:
        return "\x00never\x00"


def _prompt_of_about(source: LocalSource, pool, label: str, target_tokens: int, m_n: int) -> tuple[TaskPrompt, int]:
    """Pad the instruction so that a prompt with N examples has about ``target_tokens`` tokens."""
    base = TREC_PROMPT.generation_prompt(pool[:2], label)
    have = len(source.encode(base))
    filler = " Questions should be short, natural and answerable." * max(0, (target_tokens - have) // 9)
    prompt = NeverStop(TREC_PROMPT.instruction + filler, TREC_PROMPT.input_prefix, TREC_PROMPT.label_prefix,
                       TREC_PROMPT.label_words)
    return prompt, len(source.encode(prompt.generation_prompt(pool[:2], label)))


def time_decode_step(source: LocalSource, prompts: list[str], steps: int) -> float:
    """Seconds per batched KV-cached decode step of all prompts."""
    state = source.open(prompts, keep_state=True)
    token = source.encode(" the")[0]
    state.advance(token)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        state.advance(token)
    return (time.perf_counter() - t0) / steps


def time_naive(source: LocalSource, prompts: list[str], reps: int) -> float:
    """Seconds per token when each of the M prompts is re-encoded on its own."""
    t0 = time.perf_counter()
    for _ in range(reps):
        for p in prompts:
            source.open([p]).probs([0])
    return (time.perf_counter() - t0) / reps


def time_mode(source, prompt, pool, label, mode: str, tokens: int, m: int, n: int, width: int) -> float:
    """Seconds of one demonstration of exactly ``tokens`` tokens (prefill included)."""
    config = GenerationConfig(mode=mode, num_subsets=m, shots_per_subset=n, max_tokens=tokens, top_k=100,
                              sigma=0.6, max_prompt_tokens=width)
    plan = plan_demonstrations(config, {label: 1}, {label: float(len(pool))}, 1e-5)
    demo = generate_demonstration(source, prompt, pool, label, config, plan.labels[label], Noise(0))
    assert demo.tokens == tokens, demo.tokens
    return demo.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=24, help="tokens per demonstration (T)")
    ap.add_argument("--subsets", type=int, default=10, help="M")
    ap.add_argument("--shots", type=int, default=2, help="N private examples per prompt")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--resample-tokens", type=int, default=4, help="tokens to time for the slow modes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    source = LocalSource.from_pretrained(args.model)
    pools = pools_by_label(load_trec())
    label, pool = "LOC", pools["LOC"]
    prompt, plen = _prompt_of_about(source, pool, label, args.prompt_tokens, args.subsets * args.shots)
    prompts = [prompt.generation_prompt(pool[2 * i: 2 * i + args.shots], label) for i in range(args.subsets)]
    print(f"model={args.model or 'SmolLM2-135M-Instruct'} M={args.subsets} N={args.shots} prompt~{plen} tokens "
          f"T={args.tokens} threads={args.threads}")

    width = plen + 32  # public batch width: room for a subset a little larger than N
    short = max(2, args.tokens // 3)
    decode, fixed_marg, fixed_amort, resample, naive = [], [], [], [], []
    for _ in range(args.rounds):  # interleave rounds so machine noise hits every variant alike
        decode.append(time_decode_step(source, prompts, args.tokens))
        t_long = time_mode(source, prompt, pool, label, "fixed", args.tokens, args.subsets, args.shots, width)
        t_short = time_mode(source, prompt, pool, label, "fixed", short, args.subsets, args.shots, width)
        fixed_marg.append((t_long - t_short) / (args.tokens - short))
        fixed_amort.append(t_long / args.tokens)
        resample.append(time_mode(source, prompt, pool, label, "resample", args.resample_tokens, args.subsets,
                                  args.shots, width) / args.resample_tokens)
        naive.append(time_naive(source, prompts, 1))
    d, fm, fa, r, nv = (statistics.median(x) for x in (decode, fixed_marg, fixed_amort, resample, naive))
    print(f"{'variant':<52}{'s/token':>10}{'x decode step':>15}")
    for name, v in [("batched KV decode step of M rows (model floor)", d),
                    ("fixed mode, per extra token (steady state)", fm),
                    (f"fixed mode, T={args.tokens} incl. prefill", fa),
                    ("resample mode (batched re-encode per token)", r),
                    ("naive (M separate re-encodes per token)", nv)]:
        print(f"{name:<52}{v:>10.4f}{v / d:>15.2f}")
    print(f"fixed (steady state) / decode step = {fm / d:.2f}   (bar: <= 1.3)")
    print(f"naive / fixed (steady state)       = {nv / fm:.1f}   (bar: >= 15)")
    print(f"naive / fixed (incl. prefill)      = {nv / fa:.1f}")
    print(f"naive / resample                   = {nv / r:.1f}")
    print("Fixed mode's steady state includes the public row (batched with the private rows at a public "
          "width), top-K selection, noise and detokenisation.")

if __name__ == "__main__":
    main()
