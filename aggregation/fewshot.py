"""Token-by-token DP generation of few-shot demonstrations.

Privacy flow: :func:`plan_demonstrations` (in :mod:`aggregation.planning`, re-exported here)
computes every DpEvent from public quantities only (configuration and DP pool-size estimates), so a
caller can charge its ledger *before* :func:`generate_demonstration` reads a single private record.
Noise, sampling and their accounting live in :mod:`aggregation.mechanisms`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import dp_accounting as dpa
import numpy as np

from aggregation.mechanisms import (
    Noise,
    exponential_noisy_max,
    gaussian_report_noisy_max,
    log_probs,
    poisson_subsets,
    poisson_unit_subsets,
    public_prior_sample,
    top_k_plus,
)
from aggregation.planning import (  # noqa: F401 - re-exported: callers import them from here
    COUNT_SIGMA,
    GenerationConfig,
    LabelPlan,
    Plan,
    noisy_pool_sizes,
    plan_demonstrations,
)
from aggregation.prompts import Example, TaskPrompt
from aggregation.sources.base import DecodeState, NextTokenSource, Token
from aggregation.units import UnitPool


@dataclass
class Demonstration:
    """One generated demonstration with its cost and statistics."""

    text: str
    label: str
    token_ids: list[Token]
    event: dpa.DpEvent
    tokens: int
    model_calls: int
    seconds: float
    #: True when ``should_stop`` ended the generation early (the text is then unfinished).
    stopped: bool = False


# ---------------------------------------------------------------------------------------------
# Generation (reads private data; charge the plan first).


def generate_demonstration(
    source: NextTokenSource,
    prompt: TaskPrompt,
    pool: Sequence[Example] | UnitPool,
    label: str,
    config: GenerationConfig,
    label_plan: LabelPlan,
    noise: Noise,
    on_token: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Demonstration:
    """Generate one demonstration for ``label`` from ``pool`` (that label's private records).

    ``pool`` is a list of rows (each row its own privacy unit) or a :class:`UnitPool` (Poisson
    sampling over units, one row of each sampled unit); ``label_plan.q`` must count the same.

    One Poisson sample per block of ``config.block_length`` tokens: at a block boundary the M
    private prompts are opened afresh (with the tokens generated so far as a suffix); within a
    block their decoding state (KV cache) is kept and advanced by one token per step.

    ``should_stop`` is asked before every token (and so before every private sample is drawn):
    when it answers True the generation ends there and the result has ``stopped=True``. Stopping
    early only spends less than the plan accounts for.
    """
    if label_plan.decision == "skip":
        raise ValueError(f"the plan skips label {label!r} ({label_plan.rule}); generate Plan.to_generate() only")
    # Public-only configuration, or a label whose small DP pool estimate fell back to epsilon 0:
    # decode the public prompt alone; no private row is read.
    public_only = config.public_only or label_plan.decision == "public"
    started = time.perf_counter()
    calls = 0
    m = config.num_subsets
    k = config.block_length
    # Only the first P tokens read private rows; the rest continue the public prompt after them.
    private_steps = config.private_steps
    width = config.max_prompt_tokens
    vocab = source.vocabulary()
    if config.top_k is None and vocab is None:
        raise ValueError("this source cannot score the full vocabulary; set top_k")
    # The task instruction is public and opens every row: pass it as the shared prefix (tokenised
    # on its own; ``width`` counts it). Rows are the rest of each prompt.
    prefix = _shared_prefix(source, prompt, label)
    public_prompt = _body(prompt, (), label, prefix)
    if (source.count_tokens(public_prompt, prefix=prefix) or 0) > width:
        raise ValueError(f"the public prompt is longer than max_prompt_tokens = {width}")
    # On a batched, KV-cached backend the public prompt rides in row 0 of the private batch (one
    # forward per step instead of two). That is sound only because every row is padded to the
    # public width (``max_prompt_tokens`` plus the tokens generated so far): the batch shape then
    # carries nothing private, and only on a source whose rows are computed independently (not
    # dynamic int8, whose activation scale spans the batch).
    prior = config.mechanism == "public_prior"
    needs_public = config.top_k is not None or prior or public_only
    shared = not public_only and source.caches_state and source.rows_independent and needs_public

    def private_prompts() -> list[str]:
        return [_fit_prompt(source, prompt, rows, label, width, prefix)
                for rows in _draw_subsets(pool, label_plan.q, m, noise)]

    public = None
    if needs_public and not shared:
        public = source.open([public_prompt], keep_state=True, prefix=prefix)
    private = None  # the current block's batch (with the public row first when shared)
    offset = 1 if shared else 0  # row of the first private prompt in ``private``
    left = 0  # tokens left in the current block

    generated: list[Token] = []
    text = ""
    stopped = False
    for step in range(config.max_tokens):
        if should_stop is not None and should_stop():
            stopped = True
            break
        private_step = not public_only and step < private_steps
        if private_step and left == 0:
            # A block starts: a fresh Poisson sample and fresh prompts, padded to the public width.
            left = min(k, private_steps - step)
            rows = [public_prompt, *private_prompts()] if shared else private_prompts()
            private = source.open(rows, suffix=generated, keep_state=left > 1, width=width + len(generated),
                                  prefix=prefix)
            if shared:
                public = private
        if not private_step and public is None:
            # The private tokens are over and the public row went with their batch: continue the
            # public prompt alone from the tokens so far (no private row is read from here on).
            public = source.open([public_prompt], suffix=generated, keep_state=True, prefix=prefix)
        if prior:
            # Candidates from the public log-probabilities and C only (top-k+); epsilon 0 is
            # sampling from the public prompt at temperature tau over its top k.
            assert public is not None
            clip = float(label_plan.clip) if private_step else 0.0  # type: ignore[arg-type]
            tau = float(label_plan.temperature or config.temperature or 1.0)
            if not private_step and config.public_temperature is not None:
                tau = float(config.public_temperature)  # no private row is read at this step
            # (At epsilon = infinity C is infinite; the candidates stay the public top k.)
            candidates, public_lp = _prior_candidates(public, vocab, config.top_k, 0.0 if math.isinf(clip) else clip)
            private_lp = None
            if private_step:
                assert private is not None
                private_lp = log_probs(private.probs(candidates)[offset:])
                left -= 1
            choice, _ = public_prior_sample(private_lp, public_lp, clip, tau, noise, config.guidance)
        elif not private_step:
            assert public is not None
            candidates, choice = public.top_tokens(config.top_k or 1), 0  # sorted: greedy decoding
        else:
            candidates = public.top_tokens(config.top_k) if public is not None else list(vocab)  # type: ignore[arg-type]
            assert private is not None
            probs = private.probs(candidates)[offset:]
            if label_plan.sigma is not None:
                choice, _ = gaussian_report_noisy_max(probs, label_plan.sigma, noise)
            elif label_plan.epsilon_per_token is not None:
                choice, _ = exponential_noisy_max(probs, label_plan.epsilon_per_token, noise)
            else:  # epsilon = infinity: no noise
                choice = int(np.argmax(probs.sum(axis=0)))
            left -= 1
        token = candidates[choice]
        if on_token is not None:
            on_token(step)
        if source.is_end(token):
            break
        generated.append(token)
        text = source.decode(generated)
        if prompt.stop in text:
            text = text.split(prompt.stop, 1)[0]
            break
        if step + 1 < config.max_tokens:
            if public is not None and public is not private:
                public.advance(token)
            if private is not None and left > 0:
                private.advance(token)
        if private is not None and left == 0:  # the block is over: drop its private state
            calls += private.calls
            private = None
            if shared:
                public = None
    calls += (public.calls if public is not None and public is not private else 0)
    calls += (private.calls if private is not None else 0)
    return Demonstration(
        text=text.strip(),
        label=label,
        token_ids=generated,
        event=label_plan.demonstration_event(config),
        tokens=len(generated),
        model_calls=calls,
        seconds=time.perf_counter() - started,
        stopped=stopped,
    )


def _prior_candidates(public: DecodeState, vocab: Sequence[Token] | None, k: int | None,
                      clip: float) -> tuple[list[Token], np.ndarray]:
    """Top-k+ candidates of the public row and their public log-probabilities (public inputs only).

    A local model scores the whole vocabulary; an API source only the tokens it lists, so there
    the set is cut to the public top list.
    """
    if vocab is not None:
        lp = log_probs(public.probs(None)[0])
        idx = top_k_plus(lp, k, clip)
        return [vocab[int(i)] for i in idx], lp[idx]
    listed = public.top_tokens(max(k or 0, 1000))
    lp = log_probs(public.probs(listed)[0])
    idx = top_k_plus(lp, k, clip)
    return [listed[int(i)] for i in idx], lp[idx]


def _draw_subsets(pool: Sequence[Example] | UnitPool, q: float, m: int, noise: Noise) -> list[list[Example]]:
    """One Poisson sample split into ``m`` subsets: over rows, or over units (one row per unit)."""
    if isinstance(pool, UnitPool):
        picks = poisson_unit_subsets(pool.sizes, q, m, noise)
        return [[pool.units[u][r] for u, r in subset] for subset in picks]
    return [[pool[i] for i in idx] for idx in poisson_subsets(len(pool), q, m, noise)]


def _shared_prefix(source: NextTokenSource, prompt: TaskPrompt, label: str) -> str:
    """The task's shared prefix, or ``""`` when tokenising it apart would change the tokens.

    Only public text decides: every row's split point is the end of the instruction followed by
    the blank line and the label header, the same characters as in the public prompt.
    """
    prefix = prompt.shared_prefix()
    if not prefix:
        return ""
    full, rest = prompt.public_prompt(label), prompt.public_body(label)
    encode = getattr(source, "encode", None)
    if callable(encode):
        same = list(encode(prefix)) + list(encode(rest)) == list(encode(full))
    else:
        counts = [source.count_tokens(x) for x in (prefix, rest, full)]
        same = None in counts or counts[0] + counts[1] == counts[2]  # type: ignore[operator]
    return prefix if same else ""


def _body(prompt: TaskPrompt, examples: Sequence[Example], label: str, prefix: str) -> str:
    """The row text: the prompt after the shared prefix (the whole prompt when there is none)."""
    return prompt.generation_body(examples, label) if prefix else prompt.generation_prompt(examples, label)


def _fit_prompt(source: NextTokenSource, prompt: TaskPrompt, examples: Sequence[Example], label: str,
                width: int, prefix: str = "") -> str:
    """The row for ``examples``: as many of them (in order) as fit in ``width`` tokens, prefix included.

    Counted the way the source lays the row out (prefix tokenised on its own, special tokens
    included; API sources give a public upper bound). Returns the text after ``prefix`` (the whole
    prompt when ``prefix`` is empty). Depends only on this subset's examples, so one record still
    changes at most one prompt.
    """
    full = _body(prompt, examples, label, prefix)
    n = source.count_tokens(full, prefix=prefix)
    if n is None or n <= width:  # a source that cannot count sends every row on its own
        return full
    kept: list[Example] = []
    for ex in examples:
        if (source.count_tokens(_body(prompt, [*kept, ex], label, prefix), prefix=prefix) or 0) <= width:
            kept.append(ex)
    return _body(prompt, kept, label, prefix)


def pools_by_label(records: Sequence[Example]) -> dict[str, list[Example]]:
    """Split records into disjoint per-label pools."""
    pools: dict[str, list[Example]] = {}
    for r in records:
        pools.setdefault(r.label, []).append(r)
    return pools
