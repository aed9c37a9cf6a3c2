"""Evaluation runs: every row (zero-shot, epsilon 0, real examples, DP demonstrations per epsilon
and sampling mode) for every seed, written after each run so a stopped run keeps what it finished,
and resumed from those files.

Nothing here writes or logs private text: run records hold numbers only; the only text written to
disk is demonstrations that are DP outputs (finite epsilon) or read no private data (epsilon 0).
Demonstrations at epsilon = infinity and the real examples of the non-private row are never
written or printed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from aggregation.evaluation.demos import DemoSet, dp_demonstrations, noise_seed, ordered, public_demonstrations, \
    real_demonstrations
from aggregation.embeddings import CachedEmbedder
from aggregation.evaluation.clustered import clustered_demonstrations, public_centroid_texts
from aggregation.evaluation.scoring import LabelScorer, accuracy, score_queries
from aggregation.evaluation.settings import DP, FULL, INF, PUBLIC, REAL, RUN_FIELDS, ZERO_SHOT, EvalSettings, \
    RunRecord, eps_text
from aggregation.evaluation.tables import csv_text, fidelity_markdown, plot_accuracy, table_markdown, write_atomic
from aggregation.evaluation.tasks import Task, evaluator_split, held_out_split
from aggregation.fewshot import pools_by_label
from aggregation.prompts import Example
from aggregation.sources.base import NextTokenSource

if TYPE_CHECKING:
    from aggregation.evaluation.fidelity import FidelityEvaluator


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
    evaluator: FidelityEvaluator | None = None,
    embed: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> EvalOutput:
    """Run every row for every seed; write runs.csv, demos.jsonl, table.md and the plot.

    Files are replaced (atomically) after every run, so a long run that is stopped keeps what it
    finished. To resume, pass ``finished=load_finished(out_dir, settings, dataset)`` (which checks
    ``settings.json``): those runs are kept and only the missing ones are run. Every run's noise is
    seeded from its own parameters, so a resumed table equals an uninterrupted one.

    With ``settings.fidelity_demos`` > 0 every row except zero-shot also gets a fidelity score
    (:mod:`aggregation.evaluation.fidelity`): ``fidelity_demos`` sets of one demonstration per label
    (the first is the ICL set), labelled by ``evaluator`` (default: trained here on the records of
    :func:`evaluator_split`).

    With ``settings.clusters`` > 0 the DP rows draw each demonstration from a private cluster
    (:mod:`aggregation.evaluation.clustered`); ``embed`` (default: MiniLM, cached per text) embeds
    the pool's rows and the public centroid texts.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    pool, test = held_out_split(task, settings.held_out, settings.split_seed, settings.evaluator_size)
    test = test[:settings.n_test]
    pools = pools_by_label(pool)
    labels = task.labels
    # Generation may show neutral aliases over the task's label list; scoring and the injected
    # demonstrations use task.prompt, so they keep the label words.
    gen_prompt = task.prompt.with_hint(settings.label_hint, labels)  # type: ignore[arg-type]
    index = {lab: i for i, lab in enumerate(labels)}
    gold = np.asarray([index[t.label] for t in test])
    texts = [t.text for t in test]
    delta = 1.0 / len(pool)
    log(f"{task.name}: private pool {len(pool)} records, {len(test)} test questions, "
        f"{len(labels)} labels, delta = 1/{len(pool)}")
    n_sets = max(1, settings.fidelity_demos)
    if settings.fidelity_demos > 0 and evaluator is None:
        from aggregation.evaluation.fidelity import FidelityEvaluator, default_embedder

        train = evaluator_split(task, settings.held_out, settings.split_seed, settings.evaluator_size)
        evaluator = FidelityEvaluator(default_embedder()).fit(train)
        evaluator_info = {"features": evaluator.features, "train_records": len(train),
                          "test_accuracy": evaluator.accuracy(test)}
        log(f"fidelity evaluator ({evaluator.features}, {len(train)} records disjoint from the pool): "
            f"{100 * evaluator_info['test_accuracy']:.1f}% on the test questions")
    elif evaluator is not None:
        evaluator_info = {"features": getattr(evaluator, "features", "given"), "train_records": 0,
                          "test_accuracy": evaluator.accuracy(test)}
    else:
        evaluator_info = {}

    clusters = settings.cluster_config()
    if clusters.enabled:
        clusters.validate()
        if embed is None:
            from aggregation.embeddings import MiniLMEmbedder

            embed = MiniLMEmbedder()
        embed = CachedEmbedder(embed)
        log(f"DP rows: {clusters.clusters} {clusters.method} clusters per label")
    centroid_texts: dict[int, dict[str, list[str]]] = {}

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
    # Epsilon 0 of the Gaussian and exponential mechanisms is greedy decoding of the public prompt
    # (the same for every seed: generated once); the public-prior mechanism samples it.
    sampled_public = settings.mechanism == "public_prior"
    public_cache: list[DemoSet] = []
    files: dict[str, Path] = {}
    last_plot = time.perf_counter()
    bar = tqdm(jobs, desc="runs", disable=not progress)
    for seed, row, mode, eps in bar:
        bar.set_postfix_str(f"seed {seed} {row} {mode} {'' if row != DP else eps}".strip())
        # The same label order for every few-shot row of a seed, so rows differ only in content.
        order = list(np.random.default_rng([seed, 1]).permutation(labels))
        # sets[0] is the ICL set; all sets are scored for fidelity (independent draws at the row's epsilon).
        if row == ZERO_SHOT:
            sets = [DemoSet([], 0.0, 0.0)]
        elif row == PUBLIC:
            if sampled_public or not public_cache:
                public_cache = [public_demonstrations(source, gen_prompt, labels, settings.generation("fixed", INF),
                                                      progress, noise_seed(seed, "public", j) if sampled_public else 0)
                                for j in range(n_sets if sampled_public else 1)]
            sets = [replace(ds, demos=ordered(ds.demos, order)) for ds in public_cache]
        elif row == REAL:
            rng = np.random.default_rng([seed, 2])
            sets = [real_demonstrations(pools, labels, rng) for _ in range(n_sets)]
        elif clusters.enabled:
            assert embed is not None
            if clusters.method == "public" and seed not in centroid_texts:
                centroid_texts[seed] = public_centroid_texts(source, gen_prompt, labels, settings.generation("fixed", INF),
                                                             clusters.clusters, seed)
            sets = [clustered_demonstrations(source, gen_prompt, pools, labels, settings.generation(mode, eps),
                                             clusters, embed, noise_seed(seed, mode, eps, *([f"set{j}"] if j else [])),
                                             delta, centroid_texts.get(seed))
                    for j in range(n_sets)]
        else:
            sets = [dp_demonstrations(source, gen_prompt, pools, labels, settings.generation(mode, eps),
                                      noise_seed(seed, mode, eps, *([f"set{j}"] if j else [])), delta, progress)
                    for j in range(n_sets)]
        ds = sets[0]
        ds.demos = ordered(ds.demos, order)
        acc, acc_cal, score_s = evaluate(ds.demos)
        fid, n_fid = math.nan, 0
        if evaluator is not None and row != ZERO_SHOT:
            fid, n_fid = evaluator.fidelity([d for s in sets for d in s.demos])
        runs.append(RunRecord(task.name, row, mode, eps if row == DP else ds.epsilon, ds.epsilon_total, delta,
                              seed, acc, acc_cal, len(test), len(ds.demos), len(ds.missing),
                              round(sum(s.seconds for s in sets), 2), round(score_s, 2),
                              settings.mechanism, fid, n_fid))
        # Only DP outputs (finite epsilon) and public-only text may be written.
        if row == PUBLIC or (row == DP and math.isfinite(eps)):
            for j, s in enumerate(sets):
                demo_lines.append({"dataset": task.name, "row": row, "mode": mode, "epsilon": eps, "seed": seed,
                                   "set": j, "demonstrations": [{"label": d.label, "text": d.text} for d in s.demos]})
        if out_dir is not None:
            # Drawing the plot takes about a second: redraw it at most once a minute while running.
            redraw = time.perf_counter() - last_plot >= 60.0
            write_outputs(out_dir, runs, demo_lines, settings, task.name, plot=redraw, evaluator=evaluator_info)
            last_plot = time.perf_counter() if redraw else last_plot
    if out_dir is not None:
        files = write_outputs(out_dir, runs, demo_lines, settings, task.name, evaluator=evaluator_info)
    table = table_markdown(runs, settings.calibrate)
    return EvalOutput(runs, table, files, time.perf_counter() - started)


def _run_key(seed: int, row: str, mode: str, epsilon: float) -> tuple[int, str, str, float]:
    # Only DP rows are told apart by epsilon; the reference rows have one run per seed.
    return (int(seed), row, mode, float(epsilon) if row == DP else 0.0)


#: Settings that name which runs to make, not how: a resumed directory may ask for more (or fewer).
_ADDABLE = ("calibrate", "seeds", "epsilons", "modes")


def settings_record(settings: EvalSettings, dataset: str) -> dict:
    """What a resumed run must share with the runs already on disk (``settings.json``)."""
    record = dataclasses.asdict(settings)
    # The plotted accuracy, the seeds, the epsilons and the modes do not change any run (each run is
    # seeded from its own key): more of them may be added, and runs not asked for are left out.
    for key in _ADDABLE:
        record.pop(key)
    if record.get("label_hint") == "word":  # the default; settings.json files from before it lack the key
        record.pop("label_hint")
    if record.get("guidance") == 1.0:  # likewise: directories from before guidance
        record.pop("guidance")
    if record.get("model") == "smollm2":  # likewise: directories from before the model was recorded
        record.pop("model")
    if record.get("temperature") == 1.0:  # likewise
        record.pop("temperature")
    if record.get("public_temperature") is None:  # likewise: directories from before the option
        record.pop("public_temperature", None)
    if record.get("private_tokens") is None:  # likewise: directories from before the option
        record.pop("private_tokens", None)
    if record.get("max_prompt_tokens") == 256:  # likewise: directories from before the option
        record.pop("max_prompt_tokens")
    return {"dataset": dataset, **record}


class ResumeError(ValueError):
    """The output directory holds runs made with other settings (or none that can be read)."""


def load_finished(out_dir: Path, settings: EvalSettings, dataset: str) -> tuple[list[RunRecord], list[dict]]:
    """Runs and demonstration lines already in ``out_dir``, when they were made with ``settings``.

    Runs of seeds, epsilons or modes no longer asked for are dropped (more may be added). Nothing
    there (a fresh directory) resumes from zero.
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
    for key in _ADDABLE:  # files written before these could be added hold them; they do not matter
        stored.pop(key, None)
    stored.setdefault("precision", "float32")  # files written before the option were float32
    stored.setdefault("clusters", 0)  # ... and before clusters, unclustered
    stored.setdefault("clustering", "dp")
    differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    if differ:
        raise ResumeError(f"{out_dir} was made with different settings ({', '.join(differ)}); "
                          "use another --out or drop --resume")
    seeds, modes = set(settings.seeds), set(settings.modes)
    epsilons = {eps_text(e) for e in settings.epsilons}

    def wanted_run(seed: int, row: str, mode: str, epsilon: float) -> bool:
        return seed in seeds and (row != DP or (mode in modes and eps_text(float(epsilon)) in epsilons))

    runs = [r for r in read_runs(runs_path) if wanted_run(r.seed, r.row, r.mode, r.epsilon)]
    lines: list[dict] = []
    demos_path = out_dir / "demos.jsonl"
    if demos_path.exists():
        lines = [json.loads(x) for x in demos_path.read_text().splitlines() if x.strip()]
        lines = [x for x in lines if wanted_run(x.get("seed"), x.get("row"), x.get("mode"), x.get("epsilon", 0.0))]
    return runs, lines


def write_outputs(out_dir: Path, runs: Sequence[RunRecord], demo_lines: Sequence[dict], settings: EvalSettings,
                  dataset: str, plot: bool = True, evaluator: dict | None = None) -> dict[str, Path]:
    """runs.csv, demos.jsonl, table.md, settings.json and (with ``plot``) the plots
    (accuracy_vs_epsilon.png, and fidelity_vs_epsilon.png when fidelity was measured).
    ``evaluator`` (numbers only) describes the fidelity evaluator; it goes into table.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name
             for name in ("runs.csv", "demos.jsonl", "table.md", "accuracy_vs_epsilon.png", "settings.json")}
    # runs.csv and settings.json are what --resume trusts, so neither may be left half-written.
    write_atomic(paths["settings.json"], json.dumps(settings_record(settings, dataset), indent=1) + "\n")
    write_atomic(paths["runs.csv"], csv_text(runs, RUN_FIELDS))
    write_atomic(paths["demos.jsonl"], "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in demo_lines))
    n_test = runs[0].n_test if runs else 0
    seeds = len({r.seed for r in runs})
    header = (f"# {dataset}: ICL accuracy against epsilon\n\n"
              f"{n_test} held-out test questions, {seeds} seed(s), one demonstration per label; DP generation "
              f"with M={settings.num_subsets}, N={settings.shots_per_subset}, T={settings.max_tokens}, "
              f"top-{settings.top_k if settings.top_k else 'all'} public candidates, {settings.mechanism} mechanism"
              + (f", {settings.clusters} {settings.clustering} clusters per label (each demonstration from the "
                 f"label's largest noisy cluster; 'ε incl. pool sizes' adds the clustering)" if settings.clusters else "")
              + ". ε (demo set) is the target per demonstration set; 'ε incl. pool sizes' adds the DP label histogram "
              "that sets the sampling rates. Mean ± sample std over seeds. Δ: per-seed difference from "
              "epsilon 0 in points, mean ± std (seeds on which the row scored higher).\n\n")
    text = header + table_markdown(runs, settings.calibrate)
    fidelity = any(math.isfinite(r.fidelity) for r in runs)
    if fidelity:
        ev = evaluator or {}
        acc = ev.get("test_accuracy")
        text += (f"\n## Demonstration fidelity\n\n{settings.fidelity_demos} demonstration set(s) per row and seed "
                 f"(one demonstration per label each, every set drawn independently at the row's ε), labelled by "
                 f"the evaluator ({ev.get('features', '?')}, logistic regression, trained on "
                 f"{ev.get('train_records', '?')} records disjoint from the pool and the test set"
                 + (f"; {100 * acc:.1f}% on the test questions" if acc is not None else "") + "). Fidelity: share "
                 f"labelled as the label it was generated for.\n\n" + fidelity_markdown(runs))
    write_atomic(paths["table.md"], text)
    if plot:
        title = f"{dataset}: {n_test} test, {seeds} seed(s)"
        plot_accuracy(runs, paths["accuracy_vs_epsilon.png"], settings.calibrate, title=title)
        if fidelity:
            paths["fidelity_vs_epsilon.png"] = out_dir / "fidelity_vs_epsilon.png"
            plot_accuracy(runs, paths["fidelity_vs_epsilon.png"], metric="fidelity", title=title)
    return paths


def read_runs(path: Path) -> list[RunRecord]:
    """Load a runs.csv written by :func:`write_outputs` (to redraw the table or plot)."""
    types = {f.name: f.type for f in dataclasses.fields(RunRecord)}
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            # Columns added later (mechanism, fidelity) are missing from older files: keep their defaults.
            out.append(RunRecord(**{k: (row[k] if types[k] == "str" else int(row[k]) if types[k] == "int"
                                        else _float(row[k])) for k in RUN_FIELDS if k in row}))
    return out


def _float(text: str) -> float:
    # "not measured" is the one shared math.nan object, so records read back compare equal to the
    # records that were written (tuple equality checks identity before ==, and NaN != NaN).
    value = float(text)
    return math.nan if math.isnan(value) else value
