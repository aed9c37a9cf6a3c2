"""Evaluation harness: in-context classification accuracy against epsilon, and a canary audit.

What one run measures: a demonstration set (none, public-only, real examples, or DP demonstrations
at some epsilon and sampling mode) is put in front of held-out test queries in serving format, and
each query is classified by the model's log-probability of every label word after
``TaskPrompt.query(text)`` (the standard ICL scoring), optionally with contextual calibration
(Zhao et al., 2021: divide the label probabilities by their mean under content-free inputs).

Privacy flow for the DP rows, the same as the proxy's: the label histogram is released with
:func:`noisy_pool_sizes` (charged on the whole dataset), the demonstration plan is computed from
those noisy sizes only, every charge goes into a :class:`PartitionedLedger`, and only then are the
private pools read. Results record both the epsilon of the demonstration set alone (the nominal
row epsilon) and the epsilon including the pool-size release (``epsilon_total``).

Nothing here writes or logs private text: run records hold numbers only; the only text written to
disk is demonstrations that are DP outputs (finite epsilon) or read no private data (epsilon 0).
Demonstrations at epsilon = infinity and the real examples of the non-private row are never
written or printed.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from aggregation import accounting
from aggregation.evaluation.canary import find_canaries, longest_match, make_canaries, plant_canaries
from aggregation.datasets import R8_PROMPT, TREC_PROMPT, load_r8, load_trec, read_jsonl, split
from aggregation.fewshot import (
    GenerationConfig,
    LabelPlan,
    generate_demonstration,
    noisy_pool_sizes,
    plan_demonstrations,
    pools_by_label,
)
from aggregation.mechanisms import Noise
from aggregation.prompts import Example, TaskPrompt
from aggregation.sources.base import NextTokenSource

#: Content-free inputs of contextual calibration.
CONTENT_FREE = ("N/A", "", "[MASK]")
INF = math.inf

# Row identifiers (``row`` column of runs.csv), in table order.
ZERO_SHOT = "zero_shot"
PUBLIC = "epsilon_0"
REAL = "non_private"
DP = "dp"
ROW_TITLES = {
    ZERO_SHOT: "zero-shot",
    PUBLIC: "epsilon 0 (public prompt only)",
    REAL: "non-private (real examples)",
    DP: "DP demonstrations",
}


# =============================================================================================
# Scoring.


class LabelScorer(Protocol):
    """Anything that gives label-word log-probabilities after a prefix and each query."""

    def logprobs(self, prefix: str, queries: Sequence[str]) -> np.ndarray:
        """``[len(queries), num_labels]`` log-probabilities of each label word after prefix+query."""
        ...


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ModelScorer:
    """Label-word log-probabilities from a local causal LM, with the shared prefix encoded once.

    The prefix (instruction + demonstrations) is the same for every query, so it is run through
    the model once and its KV cache is copied into every batch of queries. Tokenisation is done on
    the whole string ``prefix + query`` (BPE merges across the boundary, e.g. a trailing blank
    line), and the cached part is the longest token prefix all queries share, so the numbers equal
    those of a plain forward pass over each full string. Only the positions whose next token is a
    label token go through the output layer. A label word of several tokens gets one extra row per
    query holding its first tokens; its log-probability is the sum over its tokens.
    """

    def __init__(self, model: Any, tokenizer: Any, label_words: Sequence[str], batch_size: int = 16,
                 progress: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.label_words = list(label_words)
        # A space separates the label prefix and the word (TaskPrompt.serving_example).
        self.label_ids = [self._encode(" " + w) for w in self.label_words]
        if any(not ids for ids in self.label_ids):
            raise ValueError("every label word must encode to at least one token")
        self.batch_size = batch_size
        self.progress = progress
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)

    @property
    def single_token_labels(self) -> bool:
        return all(len(ids) == 1 for ids in self.label_ids)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def logprobs(self, prefix: str, queries: Sequence[str]) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        out = np.zeros((len(queries), len(self.label_ids)), dtype=np.float64)
        if not queries:
            return out
        full = [self._encode(prefix + q) for q in queries]
        pre = self._encode(prefix)
        shared = min(_common_prefix(pre, f) for f in full)
        shared = max(0, min(shared, min(len(f) for f in full) - 1))  # every row keeps >= 1 own token

        # rows: (query index, tokens after the shared part, [(position, target token, label)])
        rows: list[tuple[int, list[int], list[tuple[int, int, int]]]] = []
        for i, f in enumerate(full):
            rest = f[shared:]
            last = len(rest) - 1
            rows.append((i, rest, [(last, ids[0], j) for j, ids in enumerate(self.label_ids)]))
            for j, ids in enumerate(self.label_ids):
                if len(ids) > 1:
                    rows.append((i, rest + ids[:-1], [(last + t, ids[t], j) for t in range(1, len(ids))]))

        base = self.model.base_model
        head = self.model.get_output_embeddings()
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))  # less padding per batch
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        with torch.inference_mode():
            past = None
            if shared > 0:
                past = base(input_ids=torch.tensor([full[0][:shared]], dtype=torch.long),
                            use_cache=True).past_key_values
            for batch in tqdm(batches, desc="scoring", leave=False, disable=not self.progress):
                width = max(len(rows[r][1]) for r in batch)
                n = len(batch)
                ids = torch.full((n, width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((n, shared + width), dtype=torch.long)
                mask[:, :shared] = 1
                for b, r in enumerate(batch):
                    toks = rows[r][1]
                    ids[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
                    mask[b, shared:shared + len(toks)] = 1  # right padding: pads come after
                positions = (shared + torch.arange(width)).unsqueeze(0).expand(n, -1)
                cache = None
                if past is not None:
                    cache = copy.deepcopy(past)
                    cache.batch_repeat_interleave(n)
                hidden = base(input_ids=ids, attention_mask=mask, position_ids=positions,
                              past_key_values=cache, use_cache=cache is not None).last_hidden_state
                bi, pi, tgt, qi, lab = [], [], [], [], []
                for b, r in enumerate(batch):
                    for pos, token, j in rows[r][2]:
                        bi.append(b), pi.append(pos), tgt.append(token), qi.append(rows[r][0]), lab.append(j)
                logits = head(hidden[torch.tensor(bi), torch.tensor(pi)]).double()
                picked = torch.log_softmax(logits, dim=-1)[torch.arange(len(tgt)), torch.tensor(tgt)]
                np.add.at(out, (np.asarray(qi), np.asarray(lab)), picked.numpy())
        return out


def _softmax(logprobs: np.ndarray) -> np.ndarray:
    z = np.asarray(logprobs, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def calibrated_probs(logprobs: np.ndarray, content_free_logprobs: np.ndarray) -> np.ndarray:
    """Contextual calibration: label probabilities divided by their mean content-free value.

    Both inputs are ``[n, labels]`` log-probabilities; each row is first renormalised over the
    labels. The result rows are renormalised again (argmax is unaffected by that).
    """
    p = _softmax(logprobs)
    p_cf = _softmax(content_free_logprobs).mean(axis=0)
    q = p / p_cf
    return q / q.sum(axis=-1, keepdims=True)


@dataclass
class Scored:
    """Label log-probabilities of the test queries and of the content-free inputs."""

    logprobs: np.ndarray
    content_free: np.ndarray

    def predictions(self, calibrate: bool = False) -> np.ndarray:
        """Index of the predicted label of every test query."""
        if calibrate:
            return np.argmax(calibrated_probs(self.logprobs, self.content_free), axis=1)
        return np.argmax(self.logprobs, axis=1)


def score_queries(scorer: LabelScorer, prompt: TaskPrompt, demos: Sequence[Example], texts: Sequence[str]) -> Scored:
    """Score ``texts`` (and the content-free inputs) after the serving prefix of ``demos``."""
    prefix = prompt.serving_prefix(demos)
    queries = [prompt.query(t) for t in texts] + [prompt.query(c) for c in CONTENT_FREE]
    lp = np.asarray(scorer.logprobs(prefix, queries), dtype=np.float64)
    return Scored(lp[:len(texts)], lp[len(texts):])


def accuracy(predictions: Sequence[int] | np.ndarray, gold: Sequence[int] | np.ndarray) -> float:
    """Fraction of equal entries."""
    p, g = np.asarray(predictions), np.asarray(gold)
    if p.shape != g.shape or p.size == 0:
        raise ValueError("predictions and gold labels must be non-empty and of equal length")
    return float((p == g).mean())


# =============================================================================================
# Tasks (dataset + prompt) and splits.


@dataclass
class Task:
    """A labelled dataset with its prompt and label order."""

    name: str
    records: list[Example]
    prompt: TaskPrompt
    labels: list[str]

    def words(self) -> list[str]:
        return [self.prompt.word(lab) for lab in self.labels]


def load_task(dataset: str) -> Task:
    """``trec``, ``r8``, or a path to a JSONL/CSV file of ``text``/``label`` rows."""
    key = dataset.lower()
    if key == "trec":
        records, prompt = load_trec(), TREC_PROMPT
    elif key == "r8":
        records, prompt = load_r8(), R8_PROMPT
    else:
        path = Path(dataset)
        records = read_jsonl(path)
        names = sorted({r.label for r in records})
        prompt = TaskPrompt(instruction="Classify the texts into one of these labels: " + ", ".join(names) + ".")
        key = path.stem
    present = {r.label for r in records}
    ordered = [lab for lab, _ in prompt.label_words if lab in present]
    labels = ordered + sorted(present - set(ordered))
    return Task(key, records, prompt, labels)


def held_out_split(task: Task, held_out: int = 300, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(private pool, test set) with a fixed seed; small files keep at least 3/4 for the pool."""
    size = min(held_out, len(task.records) // 4)
    if size < 1:
        raise ValueError("the dataset is too small to hold out a test set")
    return split(task.records, size, seed)


# =============================================================================================
# Demonstration sets.


@dataclass
class DemoSet:
    """Demonstrations for one run and what they cost."""

    demos: list[Example]
    epsilon: float  # the demonstration set alone
    epsilon_total: float  # including the pool-size release
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)  # labels without a demonstration


def label_config(config: GenerationConfig, noisy_size: float) -> GenerationConfig | None:
    """The config for a label whose DP pool-size estimate is ``noisy_size``.

    When the estimate is below ``M*N`` the number of subsets is lowered to fit (``None`` when not
    even one subset fits). The decision uses the DP estimate only, so it is post-processing and
    costs nothing extra.
    """
    need = config.num_subsets * config.shots_per_subset
    if config.public_only or noisy_size >= need:
        return config
    m = int(noisy_size // config.shots_per_subset)
    return replace(config, num_subsets=m) if m >= 1 else None


@dataclass
class ChargedPlan:
    """Per-label plans after all charges were recorded (nothing private read yet)."""

    configs: dict[str, GenerationConfig]
    plans: dict[str, LabelPlan]
    epsilon: float
    epsilon_total: float
    missing: list[str]


def charge_plan(
    config: GenerationConfig,
    counts: Mapping[str, int],
    shots: int,
    delta: float,
    noise: Noise,
) -> ChargedPlan:
    """Release noisy pool sizes, plan ``shots`` demonstrations per label, record every charge.

    ``counts`` are the exact pool sizes; they leave this function only through the Gaussian
    histogram of :func:`noisy_pool_sizes`.
    """
    noisy, count_event = noisy_pool_sizes(counts, noise)
    configs: dict[str, GenerationConfig] = {}
    plans: dict[str, LabelPlan] = {}
    missing: list[str] = []
    for label in counts:
        cfg = label_config(config, noisy[label])
        if cfg is None:
            missing.append(label)
            continue
        plan = plan_demonstrations(cfg, {label: shots}, noisy, delta)
        configs[label], plans[label] = cfg, plan.labels[label]
    if not config.private:
        eps_set = eps_total = INF
    else:
        total = accounting.PartitionedLedger(delta)
        alone = accounting.PartitionedLedger(delta)
        total.add(accounting.WHOLE_DATASET, count_event)
        for label, lp in plans.items():
            total.add(label, lp.event)
            alone.add(label, lp.event)
        eps_set, eps_total = alone.spent(), total.spent()
    return ChargedPlan(configs, plans, eps_set, eps_total, missing)


def dp_demonstrations(
    source: NextTokenSource,
    prompt: TaskPrompt,
    pools: Mapping[str, Sequence[Example]],
    labels: Sequence[str],
    config: GenerationConfig,
    seed: int,
    delta: float,
    progress: bool = False,
) -> DemoSet:
    """One DP demonstration per label (``config.epsilon`` per set; infinity = no noise)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    noise = Noise(seed)
    charged = charge_plan(config, {lab: len(pools.get(lab, ())) for lab in labels}, 1, delta, noise)
    demos: list[Example] = []
    for label in tqdm(list(charged.plans), desc="generating", leave=False, disable=not progress):
        d = generate_demonstration(source, prompt, pools[label], label, charged.configs[label],
                                   charged.plans[label], noise)
        demos.append(Example(d.text, label))
    return DemoSet(demos, charged.epsilon, charged.epsilon_total, time.perf_counter() - started, charged.missing)


def public_demonstrations(
    source: NextTokenSource, prompt: TaskPrompt, labels: Sequence[str], config: GenerationConfig,
    progress: bool = False,
) -> DemoSet:
    """Epsilon 0: one demonstration per label from the public prompt alone (no private data)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    cfg = replace(config, public_only=True)
    plan = plan_demonstrations(cfg, {lab: 1 for lab in labels}, {}, 0.5)
    demos = []
    for label in tqdm(list(labels), desc="generating (public)", leave=False, disable=not progress):
        d = generate_demonstration(source, prompt, (), label, cfg, plan.labels[label], Noise(0))
        demos.append(Example(d.text, label))
    return DemoSet(demos, 0.0, 0.0, time.perf_counter() - started)


def real_demonstrations(pools: Mapping[str, Sequence[Example]], labels: Sequence[str], rng: np.random.Generator) -> DemoSet:
    """Non-private upper bound: one random real example per label."""
    demos = [pools[lab][int(rng.integers(len(pools[lab])))] for lab in labels if pools.get(lab)]
    return DemoSet(demos, INF, INF, 0.0, [lab for lab in labels if not pools.get(lab)])


def _ordered(demos: Sequence[Example], order: Sequence[str]) -> list[Example]:
    rank = {lab: i for i, lab in enumerate(order)}
    return sorted(demos, key=lambda d: rank.get(d.label, len(rank)))


def _noise_seed(seed: int, *parts: float | str) -> int:
    """A reproducible seed per (seed, row parameters); distinct runs get independent noise."""
    words = [int(seed)] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(min(p, 1e9) * 1000) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


# =============================================================================================
# The benchmark.


@dataclass(frozen=True)
class EvalSettings:
    """What to run. The defaults are the full preset; :data:`QUICK` is the CI preset."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_test: int = 300
    held_out: int = 300
    split_seed: int = 0
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, INF)
    modes: tuple[str, ...] = ("resample", "fixed")
    mechanism: str = "gaussian"
    num_subsets: int = 10
    shots_per_subset: int = 2
    max_tokens: int = 15
    top_k: int | None = 100
    calibrate: bool = False  # which accuracy the plot shows; both are always computed

    def generation(self, mode: str, epsilon: float) -> GenerationConfig:
        return GenerationConfig(mode=mode, mechanism=self.mechanism,  # type: ignore[arg-type]
                                num_subsets=self.num_subsets, shots_per_subset=self.shots_per_subset,
                                max_tokens=self.max_tokens, top_k=self.top_k, epsilon=epsilon)


FULL = EvalSettings()
#: CI preset. Fixed mode only: a resample-mode demonstration re-encodes all M prompts for every
#: token and costs about 5x a fixed-mode one, which would take the preset past 10 minutes on two
#: cores (see docs/evaluation.md); add it with ``--modes resample,fixed``.
QUICK = EvalSettings(seeds=(0, 1), n_test=100, epsilons=(1.0, 4.0, INF), modes=("fixed",))


@dataclass
class RunRecord:
    """One row of runs.csv (numbers only: no text of any example)."""

    dataset: str
    row: str
    mode: str
    epsilon: float
    epsilon_total: float
    delta: float
    seed: int
    accuracy: float
    accuracy_calibrated: float
    n_test: int
    demos: int
    missing_labels: int
    generate_seconds: float
    score_seconds: float


RUN_FIELDS = [f.name for f in dataclasses.fields(RunRecord)]


@dataclass
class EvalOutput:
    runs: list[RunRecord]
    table: str
    files: dict[str, Path]
    seconds: float


def run_eval(
    task: Task,
    source: NextTokenSource,
    scorer: LabelScorer,
    settings: EvalSettings = FULL,
    out_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    finished: tuple[list[RunRecord], list[dict]] | None = None,
) -> EvalOutput:
    """Run every row for every seed; write runs.csv, demos.jsonl, table.md and the plot.

    Files are replaced (atomically) after every run, so a long run that is stopped keeps what it
    finished. To resume, pass ``finished=load_finished(out_dir, settings, dataset)`` (which checks
    ``settings.json``): those runs are kept and only the missing ones are run. Every run's noise is
    seeded from its own parameters, so a resumed table equals an uninterrupted one.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    pool, test = held_out_split(task, settings.held_out, settings.split_seed)
    test = test[:settings.n_test]
    pools = pools_by_label(pool)
    labels = task.labels
    index = {lab: i for i, lab in enumerate(labels)}
    gold = np.asarray([index[t.label] for t in test])
    texts = [t.text for t in test]
    delta = 1.0 / len(pool)
    log(f"{task.name}: private pool {len(pool)} records, {len(test)} test questions, "
        f"{len(labels)} labels, delta = 1/{len(pool)}")

    score_cache: dict[str, tuple[float, float, float]] = {}

    def evaluate(demos: Sequence[Example]) -> tuple[float, float, float]:
        key = task.prompt.serving_prefix(demos)
        if key not in score_cache:
            t0 = time.perf_counter()
            s = score_queries(scorer, task.prompt, demos, texts)
            score_cache[key] = (accuracy(s.predictions(False), gold), accuracy(s.predictions(True), gold),
                                time.perf_counter() - t0)
        return score_cache[key]

    jobs: list[tuple[int, str, str, float]] = []
    for seed in settings.seeds:
        jobs += [(seed, ZERO_SHOT, "", 0.0), (seed, PUBLIC, "", 0.0), (seed, REAL, "", INF)]
        jobs += [(seed, DP, mode, eps) for mode in settings.modes for eps in settings.epsilons]

    runs: list[RunRecord] = []
    demo_lines: list[dict] = []
    if finished is not None:
        runs, demo_lines = list(finished[0]), list(finished[1])
        done = {_run_key(r.seed, r.row, r.mode, r.epsilon) for r in runs}
        before = len(jobs)
        jobs = [j for j in jobs if _run_key(*j) not in done]
        log(f"resuming: {before - len(jobs)} of {before} runs already done")
    public_set: DemoSet | None = None
    files: dict[str, Path] = {}
    last_plot = time.perf_counter()
    bar = tqdm(jobs, desc="runs", disable=not progress)
    for seed, row, mode, eps in bar:
        bar.set_postfix_str(f"seed {seed} {row} {mode} {'' if row != DP else eps}".strip())
        # The same label order for every few-shot row of a seed, so rows differ only in content.
        order = list(np.random.default_rng([seed, 1]).permutation(labels))
        if row == ZERO_SHOT:
            ds = DemoSet([], 0.0, 0.0)
        elif row == PUBLIC:
            if public_set is None:  # greedy decoding of the public prompt: the same for every seed
                public_set = public_demonstrations(source, task.prompt, labels,
                                                   settings.generation("fixed", INF), progress)
            ds = replace(public_set, demos=_ordered(public_set.demos, order))
        elif row == REAL:
            ds = real_demonstrations(pools, labels, np.random.default_rng([seed, 2]))
            ds.demos = _ordered(ds.demos, order)
        else:
            ds = dp_demonstrations(source, task.prompt, pools, labels, settings.generation(mode, eps),
                                   _noise_seed(seed, mode, eps), delta, progress)
            ds.demos = _ordered(ds.demos, order)
        acc, acc_cal, score_s = evaluate(ds.demos)
        runs.append(RunRecord(task.name, row, mode, eps if row == DP else ds.epsilon, ds.epsilon_total, delta,
                              seed, acc, acc_cal, len(test), len(ds.demos), len(ds.missing),
                              round(ds.seconds, 2), round(score_s, 2)))
        # Only DP outputs (finite epsilon) and public-only text may be written.
        if row == PUBLIC or (row == DP and math.isfinite(eps)):
            demo_lines.append({"dataset": task.name, "row": row, "mode": mode, "epsilon": eps, "seed": seed,
                               "demonstrations": [{"label": d.label, "text": d.text} for d in ds.demos]})
        if out_dir is not None:
            # Drawing the plot takes about a second: redraw it at most once a minute while running.
            redraw = time.perf_counter() - last_plot >= 60.0
            write_outputs(out_dir, runs, demo_lines, settings, task.name, plot=redraw)
            last_plot = time.perf_counter() if redraw else last_plot
    if out_dir is not None:
        files = write_outputs(out_dir, runs, demo_lines, settings, task.name)
    table = table_markdown(runs, settings.calibrate)
    return EvalOutput(runs, table, files, time.perf_counter() - started)


def _run_key(seed: int, row: str, mode: str, epsilon: float) -> tuple[int, str, str, float]:
    # Only DP rows are told apart by epsilon; the reference rows have one run per seed.
    return (int(seed), row, mode, float(epsilon) if row == DP else 0.0)


def settings_record(settings: EvalSettings, dataset: str) -> dict:
    """What a resumed run must share with the runs already on disk (``settings.json``)."""
    record = dataclasses.asdict(settings)
    # The plotted accuracy and the number of seeds do not change any run; more seeds may be added.
    for key in ("calibrate", "seeds"):
        record.pop(key)
    record["epsilons"] = [_eps(e) for e in settings.epsilons]
    record["modes"] = list(settings.modes)
    return {"dataset": dataset, **record}


class ResumeError(ValueError):
    """The output directory holds runs made with other settings (or none that can be read)."""


def load_finished(out_dir: Path, settings: EvalSettings, dataset: str) -> tuple[list[RunRecord], list[dict]]:
    """Runs and demonstration lines already in ``out_dir``, when they were made with ``settings``.

    Runs of seeds no longer asked for are dropped. Nothing there (a fresh directory) resumes
    from zero.
    """
    runs_path, settings_path = out_dir / "runs.csv", out_dir / "settings.json"
    if not runs_path.exists():
        return [], []
    if not settings_path.exists():
        raise ResumeError(f"{out_dir} has runs.csv but no settings.json; cannot tell whether its runs match")
    try:
        stored = json.loads(settings_path.read_text())
    except json.JSONDecodeError as exc:
        raise ResumeError(f"{settings_path} is not valid JSON: {exc}") from None
    wanted = settings_record(settings, dataset)
    differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    if differ:
        raise ResumeError(f"{out_dir} was made with different settings ({', '.join(differ)}); "
                          "use another --out or drop --resume")
    seeds = set(settings.seeds)
    runs = [r for r in read_runs(runs_path) if r.seed in seeds]
    lines: list[dict] = []
    demos_path = out_dir / "demos.jsonl"
    if demos_path.exists():
        lines = [json.loads(x) for x in demos_path.read_text().splitlines() if x.strip()]
        lines = [x for x in lines if x.get("seed") in seeds]
    return runs, lines


# =============================================================================================
# Summaries and files.


@dataclass
class Summary:
    row: str
    mode: str
    epsilon: float
    epsilon_total: float
    mean: float
    std: float
    mean_cal: float
    std_cal: float
    seeds: int
    # Against epsilon 0 on the same seeds (the seed fixes the label order and the test set, so
    # the paired difference removes that shared variation): (mean, std, seeds better, seeds paired).
    vs_public: tuple[float, float, int, int] | None = None
    vs_public_cal: tuple[float, float, int, int] | None = None


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(runs: Sequence[RunRecord]) -> list[Summary]:
    """Mean and sample standard deviation over seeds of every (row, mode, epsilon)."""
    groups: dict[tuple[str, str, float], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault((r.row, r.mode, r.epsilon), []).append(r)
    rank = {ZERO_SHOT: 0, PUBLIC: 1, REAL: 2, DP: 3}
    public = {r.seed: r for r in runs if r.row == PUBLIC}

    def paired(rs: Sequence[RunRecord], field: str) -> tuple[float, float, int, int] | None:
        diffs = [getattr(r, field) - getattr(public[r.seed], field) for r in rs if r.seed in public]
        if not diffs:
            return None
        return float(np.mean(diffs)), _std(diffs), sum(d > 0 for d in diffs), len(diffs)

    out = []
    for (row, mode, eps), rs in sorted(groups.items(), key=lambda kv: (rank.get(kv[0][0], 9), kv[0][1], kv[0][2])):
        acc = [r.accuracy for r in rs]
        cal = [r.accuracy_calibrated for r in rs]
        vs, vs_cal = (None, None) if row == PUBLIC else (paired(rs, "accuracy"), paired(rs, "accuracy_calibrated"))
        out.append(Summary(row, mode, eps, float(np.mean([r.epsilon_total for r in rs])),
                           float(np.mean(acc)), _std(acc), float(np.mean(cal)), _std(cal), len(rs), vs, vs_cal))
    return out


def _delta(d: tuple[float, float, int, int] | None) -> str:
    if d is None:
        return "-"
    mean, std, better, n = d
    return f"{100 * mean:+.1f} ± {100 * std:.1f} ({better}/{n})"


def _eps(e: float) -> str:
    return "∞" if math.isinf(e) else f"{e:g}"


def table_markdown(runs: Sequence[RunRecord], calibrate: bool = False) -> str:
    """Markdown table: accuracy (%) mean ± sample std over seeds per row, mode and epsilon.

    The Δ columns compare each row with epsilon 0 seed by seed: mean ± std of the per-seed
    differences in points, and in brackets on how many seeds the row scored higher.
    """
    lines = [
        "| row | mode | ε (demo set) | ε incl. pool sizes | accuracy % | calibrated % | seeds "
        "| Δ vs ε 0 (seeds better) | Δ calibrated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summarise(runs):
        eps = _eps(s.epsilon) if s.row == DP else ("0" if s.row in (ZERO_SHOT, PUBLIC) else "∞")
        tot = f"{s.epsilon_total:.2f}" if s.row == DP and math.isfinite(s.epsilon_total) else eps
        lines.append(f"| {ROW_TITLES.get(s.row, s.row)} | {s.mode or '-'} | {eps} | {tot} | "
                     f"{100 * s.mean:.1f} ± {100 * s.std:.1f} | {100 * s.mean_cal:.1f} ± {100 * s.std_cal:.1f} | "
                     f"{s.seeds} | {_delta(s.vs_public)} | {_delta(s.vs_public_cal)} |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, runs: Sequence[RunRecord], demo_lines: Sequence[dict], settings: EvalSettings,
                  dataset: str, plot: bool = True) -> dict[str, Path]:
    """runs.csv, demos.jsonl, table.md, settings.json and (with ``plot``) accuracy_vs_epsilon.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name
             for name in ("runs.csv", "demos.jsonl", "table.md", "accuracy_vs_epsilon.png", "settings.json")}
    # runs.csv and settings.json are what --resume trusts, so neither may be left half-written.
    _write_atomic(paths["settings.json"], json.dumps(settings_record(settings, dataset), indent=1) + "\n")
    _write_atomic(paths["runs.csv"], _csv_text(runs, RUN_FIELDS))
    _write_atomic(paths["demos.jsonl"], "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in demo_lines))
    n_test = runs[0].n_test if runs else 0
    seeds = len({r.seed for r in runs})
    header = (f"# {dataset}: ICL accuracy against epsilon\n\n"
              f"{n_test} held-out test questions, {seeds} seed(s), one demonstration per label; DP generation "
              f"with M={settings.num_subsets}, N={settings.shots_per_subset}, T={settings.max_tokens}, "
              f"top-{settings.top_k if settings.top_k else 'all'} public candidates, {settings.mechanism} mechanism. "
              f"ε (demo set) is the target per demonstration set; 'ε incl. pool sizes' adds the DP label histogram "
              f"that sets the sampling rates. Mean ± sample std over seeds. Δ: per-seed difference from "
              f"epsilon 0 in points, mean ± std (seeds on which the row scored higher).\n\n")
    _write_atomic(paths["table.md"], header + table_markdown(runs, settings.calibrate))
    if plot:
        plot_accuracy(runs, paths["accuracy_vs_epsilon.png"], settings.calibrate, title=f"{dataset}: {n_test} test, {seeds} seed(s)")
    return paths


def _csv_text(records: Sequence[Any], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields))
    w.writeheader()
    for r in records:
        w.writerow(dataclasses.asdict(r))
    return buf.getvalue()


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def read_runs(path: Path) -> list[RunRecord]:
    """Load a runs.csv written by :func:`write_outputs` (to redraw the table or plot)."""
    types = {f.name: f.type for f in dataclasses.fields(RunRecord)}
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.append(RunRecord(**{k: (row[k] if types[k] == "str" else int(row[k]) if types[k] == "int"
                                        else float(row[k])) for k in RUN_FIELDS}))
    return out


def plot_accuracy(runs: Sequence[RunRecord], path: Path, calibrate: bool = False, title: str = "") -> None:
    """Accuracy against epsilon, one line per mode with error bars, reference lines for the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = summarise(runs)
    dp_eps = sorted({s.epsilon for s in summaries if s.row == DP})
    finite = [e for e in dp_eps if math.isfinite(e)]
    inf_x = (max(finite) * 2) if finite else 1.0

    def x_of(e: float) -> float:
        return inf_x if math.isinf(e) else e

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, marker, color in (("resample", "o", "tab:blue"), ("fixed", "s", "tab:purple")):
        pts = [s for s in summaries if s.row == DP and s.mode == mode]
        if not pts:
            continue
        xs = [x_of(s.epsilon) for s in pts]
        ys = [100 * (s.mean_cal if calibrate else s.mean) for s in pts]
        es = [100 * (s.std_cal if calibrate else s.std) for s in pts]
        ax.errorbar(xs, ys, yerr=es, marker=marker, color=color, capsize=4, label=f"DP, {mode}")
    for row, style, color in ((ZERO_SHOT, ":", "grey"), (PUBLIC, "--", "tab:green"), (REAL, "-.", "tab:red")):
        for s in summaries:
            if s.row == row:
                y = 100 * (s.mean_cal if calibrate else s.mean)
                sd = 100 * (s.std_cal if calibrate else s.std)
                ax.axhline(y, linestyle=style, color=color, label=f"{ROW_TITLES[row]} ({y:.1f}%)")
                if sd > 0:
                    ax.axhspan(y - sd, y + sd, color=color, alpha=0.08)
    if dp_eps:
        ax.set_xscale("log", base=2)
        ticks = [x_of(e) for e in dp_eps]
        ax.set_xticks(ticks, [_eps(e) for e in dp_eps])
    ax.set_xlabel("ε per demonstration set")
    ax.set_ylabel("accuracy %" + (" (calibrated)" if calibrate else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    _write_atomic(path, png.getvalue())
    plt.close(fig)


# =============================================================================================
# Canary audit.


#: Default canary records per real record of the audited label (see :class:`AuditSettings`).
CANARY_SHARE = 5


@dataclass(frozen=True)
class AuditSettings:
    """Canary audit parameters. ``top_k=None`` scores the full vocabulary.

    The defaults are chosen so that the audit has power, i.e. so that epsilon = infinity does
    leak: SmolLM2-135M copies a random string only when a prompt holds it at least twice, so one
    canary is planted ``CANARY_SHARE`` times per real record of the label (about 5/6 of the
    pool) and each subset holds N=4 records. Several distinct canaries, or 2 records per subset,
    left even epsilon = infinity without a single leak (docs/evaluation.md). The full vocabulary
    is the default for the same reason: a random string is rarely among the top-k public
    candidates, so top-k alone would hide it; without that filter only the noise stands between
    the canary and the output, which is the property being audited.
    """

    seeds: tuple[int, ...] = (0, 1)
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, INF)
    modes: tuple[str, ...] = ("resample", "fixed")
    canaries: int = 1
    copies: int | None = None  # None: CANARY_SHARE canary records per real record of the label
    shots_per_subset: int | None = 4  # N of the audit's generation (None: the eval settings' N)
    demos_per_run: int = 3
    label: str | None = None  # None: the label with the smallest pool (canaries weigh most there)
    top_k: int | None = None
    min_match: int = 8
    canary_seed: int = 20240229


@dataclass
class AuditRecord:
    dataset: str
    mode: str
    epsilon: float
    epsilon_total: float
    seed: int
    label: str
    canaries: int
    copies: int
    demos: int
    full_hits: int  # demonstrations containing a whole canary
    substring_hits: int  # demonstrations containing >= min_match characters of one
    longest_match: int  # longest piece of any canary found in any demonstration


AUDIT_FIELDS = [f.name for f in dataclasses.fields(AuditRecord)]


def run_audit(
    task: Task,
    source: NextTokenSource,
    settings: EvalSettings = FULL,
    audit: AuditSettings = AuditSettings(),
    out_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[list[AuditRecord], str]:
    """Plant canaries in one label's pool, generate at each epsilon and mode, count leaks.

    Only counts are reported; generated text is not written (at epsilon = infinity it is a
    non-private function of the pool).
    """
    from tqdm.auto import tqdm

    pool, _ = held_out_split(task, settings.held_out, settings.split_seed)
    pools = pools_by_label(pool)
    label = audit.label or min(pools, key=lambda lab: len(pools[lab]))
    if label not in pools:
        raise ValueError(f"label {label!r} is not in the dataset")
    rng = np.random.default_rng(audit.canary_seed)
    canaries = make_canaries(audit.canaries, rng)
    copies = audit.copies or max(1, math.ceil(CANARY_SHARE * len(pools[label]) / audit.canaries))
    pools[label] = plant_canaries(pools[label], label, canaries, copies, rng)
    delta = 1.0 / sum(len(p) for p in pools.values())
    shots = audit.shots_per_subset or settings.shots_per_subset
    log(f"audit: {audit.canaries} canaries x {copies} copies planted under label {label!r} "
        f"({audit.canaries * copies} of {len(pools[label])} records); top-k = {audit.top_k or 'full vocabulary'}, "
        f"N = {shots}")

    records: list[AuditRecord] = []
    jobs = [(mode, eps, seed) for mode in audit.modes for eps in audit.epsilons for seed in audit.seeds]
    for mode, eps, seed in tqdm(jobs, desc="audit", disable=not progress):
        config = replace(settings.generation(mode, eps), top_k=audit.top_k, shots_per_subset=shots)
        noise = Noise(_noise_seed(seed, "audit", mode, eps))
        charged = charge_plan(config, {lab: len(p) for lab, p in pools.items()}, audit.demos_per_run, delta, noise)
        full = sub = longest = 0
        n_demos = 0
        if label in charged.plans:
            for _ in tqdm(range(audit.demos_per_run), desc="generating", leave=False, disable=not progress):
                d = generate_demonstration(source, task.prompt, pools[label], label, charged.configs[label],
                                           charged.plans[label], noise)
                hits = find_canaries(d.text, canaries, audit.min_match)
                n_demos += 1
                full += any(h.full for h in hits)
                sub += bool(hits)
                # The longest piece of any canary, hit or not: ~1-3 characters is chance level.
                longest = max([longest] + [longest_match(d.text, c) for c in canaries])
        records.append(AuditRecord(task.name, mode, eps, charged.epsilon_total, seed, label, audit.canaries, copies,
                                   n_demos, full, sub, longest))
    table = audit_markdown(records, audit.min_match)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(out_dir / "audit.csv", _csv_text(records, AUDIT_FIELDS))
        _write_atomic(out_dir / "audit.md", table)
    return records, table


def audit_markdown(records: Sequence[AuditRecord], min_match: int = 8) -> str:
    """Counts per mode and epsilon, summed over seeds.

    The copies column matters for reading the counts: epsilon bounds what one record reveals, and
    k copies of a canary are a group that only about k times epsilon bounds.
    """
    groups: dict[tuple[str, float], list[AuditRecord]] = {}
    for r in records:
        groups.setdefault((r.mode, r.epsilon), []).append(r)
    lines = [f"| mode | ε (demo set) | ε incl. pool sizes | canary copies | demonstrations | whole canary "
             f"| ≥{min_match}-char piece | longest piece |",
             "|---|---|---|---|---|---|---|---|"]
    for (mode, eps), rs in sorted(groups.items()):
        tot = float(np.mean([r.epsilon_total for r in rs]))
        lines.append(f"| {mode} | {_eps(eps)} | {_eps(tot) if math.isinf(tot) else f'{tot:.2f}'} | "
                     f"{max(r.copies for r in rs)} | {sum(r.demos for r in rs)} | {sum(r.full_hits for r in rs)} | "
                     f"{sum(r.substring_hits for r in rs)} | {max(r.longest_match for r in rs)} |")
    return "\n".join(lines) + "\n"


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"1,2,4,inf"`` -> (1.0, 2.0, 4.0, inf); every value must be positive."""
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        v = INF if part in ("inf", "infinity", "∞") else float(part)
        if not v > 0:
            raise ValueError("epsilons must be positive (epsilon 0 is always its own row)")
        values.append(v)
    if not values:
        raise ValueError("give at least one epsilon")
    return tuple(values)

