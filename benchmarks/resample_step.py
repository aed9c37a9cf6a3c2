"""Cost of one resample-mode step on the local source against one batched KV decode step.

A resample step re-opens the M private prompts (a fresh Poisson sample) with the generated tokens
as suffix and scores the candidates. Every row is ``[instruction][padding][examples + header +
generated]`` at a public width; the instruction is the public prefix. Variants, timed side by side
(interleaved, median over rounds):

  * decode      one batched KV-cached decode step of the public row + M private rows (fixed mode),
  * resample    re-open the M rows, prefix encoded in every row (no prefix cache),
  * resample+pc re-open the M rows reusing the instruction's cached KV state (prefix cache),

at the public width ``--width`` and, for comparison, at the tightest width of the batch (what
padding to a public width costs). ``--precisions float32,bfloat16,int8`` adds, for each other
precision, its decode step and its resample step (prefix cache, public width), so precisions are
compared in the same run (int8 runs one row per forward: see docs/sources.md). Wall seconds and this process's CPU seconds are printed (CPU
time is steadier on a shared machine), with the load average at start and end.

Usage: python benchmarks/resample_step.py [--rows long|trec] [--rounds 5] [--threads N] [--model NAME]
       [--precisions float32,bfloat16,int8]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import torch

from aggregation.datasets import TREC_PROMPT, load_trec
from aggregation.fewshot import pools_by_label
from aggregation.prompts import Example
from aggregation.sources.local import LocalSource, with_precision


def instruction(source: LocalSource, tokens: int) -> str:
    """TREC's instruction, padded with public filler to about ``tokens`` tokens (0: as it is)."""
    text = TREC_PROMPT.instruction
    while tokens and len(source.encode(text)) < tokens:
        text += " Questions should be short, natural and answerable."
    return text


def private_rests(source: LocalSource, rows: str, m: int, target: int, prefix: str) -> list[str]:
    """M prompt bodies (everything after the instruction): 2 examples each plus the header."""
    pool = pools_by_label(load_trec())["LOC"]
    head = len(source.encode(prefix))
    bodies, k = [], 0
    for _ in range(m):
        examples = []
        for _ in range(2):
            if rows == "trec":
                examples.append(pool[k])
                k += 1
                continue
            text = ""  # long records: questions joined until the row reaches about ``target`` tokens
            while len(source.encode(text)) < (target - head - 12) // 2:
                text += pool[k].text + " "
                k += 1
            examples.append(Example(text.strip(), "LOC"))
        full = TREC_PROMPT.generation_prompt(examples, "LOC")
        bodies.append(full[len(TREC_PROMPT.instruction) + 2:])  # the header and examples only
    return bodies


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", choices=["long", "trec"], default="long",
                    help="long: rows of about --row-tokens tokens; trec: 2 real TREC questions per row")
    ap.add_argument("--row-tokens", type=int, default=212)
    ap.add_argument("--instruction-tokens", type=int, default=0,
                    help="pad the public instruction with filler to this many tokens (0: TREC's, ~26)")
    ap.add_argument("--width", type=int, default=None, help="public width (default: longest row + 16)")
    ap.add_argument("--subsets", type=int, default=10, help="M")
    ap.add_argument("--generated", type=int, default=5, help="tokens already generated (the suffix)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--model", default=None)
    ap.add_argument("--precisions", default="float32",
                    help="comma-separated: float32 (the reference, always run), bfloat16, int8")
    args = ap.parse_args()
    others = [p for p in args.precisions.split(",") if p and p != "float32"]
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    cached = LocalSource.from_pretrained(args.model)
    plain = LocalSource(cached.model, cached.tokenizer, prefix_cache_size=0)
    prefix = instruction(cached, args.instruction_tokens) + "\n\n"
    rests = private_rests(cached, args.rows, args.subsets, args.row_tokens, prefix)
    public = TREC_PROMPT.public_prompt("LOC")[len(TREC_PROMPT.instruction) + 2:]
    suffix = cached.encode(" Where is the longest")[: args.generated]
    lengths = [cached.count_tokens(r, prefix=prefix) for r in rests]
    tight = max(lengths) + len(suffix)
    width = (args.width or max(lengths) + 16) + len(suffix)
    candidates = list(range(100))
    print(f"model={args.model or 'SmolLM2-135M-Instruct'} M={args.subsets} rows={args.rows} "
          f"tokens/row min/mean/max={min(lengths)}/{sum(lengths) / len(lengths):.0f}/{max(lengths)} "
          f"prefix={cached.count_tokens('', prefix=prefix)} tokens, suffix={len(suffix)}, public width={width}, "
          f"threads={args.threads}, load average at start {tuple(round(x, 2) for x in load_start)}")

    def decode(src: LocalSource = cached, key: str = "decode") -> None:
        # A source whose rows are not independent (int8) decodes the public row on its own.
        rows = [public, *rests] if src.rows_independent else rests
        state = src.open(rows, keep_state=True, width=width, prefix=prefix)
        tok = suffix[-1]
        state.advance(tok)
        for _ in range(args.decode_steps):
            results[key].append(timed(lambda: state.advance(tok)))

    def resample(src: LocalSource, w: int) -> None:
        src.open(rests, suffix=suffix, keep_state=False, width=w, prefix=prefix).probs(candidates)

    variants = {
        "resample, no prefix cache, public width": lambda: resample(plain, width),
        "resample, prefix cache, public width": lambda: resample(cached, width),
        "resample, no prefix cache, tight width": lambda: resample(plain, tight),
        "resample, prefix cache, tight width": lambda: resample(cached, tight),
    }
    sources = {p: LocalSource(with_precision(copy.deepcopy(cached.model), p), cached.tokenizer) for p in others}
    for p, src in sources.items():
        variants[f"resample, prefix cache, public width, {p}"] = lambda src=src: resample(src, width)
    results: dict[str, list[tuple[float, float]]] = {"decode": [], **{f"decode, {p}": [] for p in others},
                                                     **{k: [] for k in variants}}
    for src in (cached, *sources.values()):
        resample(src, width)  # warm-up (and the prefix's one-time encoding)
    for _ in range(args.rounds):
        decode()
        for p, src in sources.items():
            decode(src, f"decode, {p}")
        for name, fn in variants.items():
            results[name].append(timed(fn))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in results.items()}
    dw, dc = med["decode"]
    print(f"{'variant':<44}{'wall s':>9}{'x decode':>10}{'cpu s':>9}{'x decode':>10}")
    for name, (w, c) in med.items():
        print(f"{name:<44}{w:>9.3f}{w / dw:>10.1f}{c:>9.3f}{c / dc:>10.1f}")
    print(f"load average at end {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
