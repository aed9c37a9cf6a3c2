"""Canary audit: plant canary records in one label's pool, generate demonstrations at each epsilon
and sampling mode, and count how often a canary, or a piece of one, comes out. Only counts are
reported; generated text is not written (at epsilon = infinity it is a non-private function of the pool).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from aggregation.evaluation.canary import find_canaries, longest_match, make_canaries, plant_canaries
from aggregation.evaluation.demos import charge_plan, noise_seed
from aggregation.evaluation.settings import FULL, INF, EvalSettings, eps_text
from aggregation.evaluation.tables import csv_text, write_atomic
from aggregation.evaluation.tasks import Task, held_out_split
from aggregation.fewshot import generate_demonstration, pools_by_label
from aggregation.mechanisms import Noise
from aggregation.prompts import Example
from aggregation.sources.base import NextTokenSource
from aggregation.units import UnitPool, unit_pools

#: Default canary records per real record of the audited label (see :class:`AuditSettings`).
CANARY_SHARE = 5
#: Privacy unit id of the canary records in the unit case (real records stay their own units).
CANARY_UNIT = "canary-holder"


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
    #: Unit case (issue 10): every canary record belongs to one privacy unit, and sampling, pool
    #: sizes and q count units (each real record is its own unit). Epsilon then bounds the whole
    #: group of copies, so no finite-epsilon leak is allowed.
    unit: bool = False


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
    privacy_unit: str = "row"  # "row": each record its own unit; "unit": the canary records are one unit


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
    row_pools = pools_by_label(pool)
    label = audit.label or min(row_pools, key=lambda lab: len(row_pools[lab]))
    if label not in row_pools:
        raise ValueError(f"label {label!r} is not in the dataset")
    rng = np.random.default_rng(audit.canary_seed)
    canaries = make_canaries(audit.canaries, rng)
    copies = audit.copies or max(1, math.ceil(CANARY_SHARE * len(row_pools[label]) / audit.canaries))
    row_pools[label] = plant_canaries(row_pools[label], label, canaries, copies, rng,
                                      unit=CANARY_UNIT if audit.unit else None)
    pools: Mapping[str, Sequence[Example] | UnitPool]
    if audit.unit:
        # Sizes, the label histogram and q count units; one row of a sampled unit per subset.
        pools = unit_pools([r for p in row_pools.values() for r in p], list(row_pools))
    else:
        pools = row_pools
    delta = 1.0 / sum(len(p) for p in pools.values())
    shots = audit.shots_per_subset or settings.shots_per_subset
    log(f"audit: {audit.canaries} canaries x {copies} copies planted under label {label!r} "
        f"({audit.canaries * copies} of {len(row_pools[label])} records"
        f"{', all in one privacy unit' if audit.unit else ''}); top-k = {audit.top_k or 'full vocabulary'}, N = {shots}")

    records: list[AuditRecord] = []
    jobs = [(mode, eps, seed) for mode in audit.modes for eps in audit.epsilons for seed in audit.seeds]
    for mode, eps, seed in tqdm(jobs, desc="audit", disable=not progress):
        config = replace(settings.generation(mode, eps), top_k=audit.top_k, shots_per_subset=shots)
        noise = Noise(noise_seed(seed, "audit", mode, eps))
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
                                   n_demos, full, sub, longest, "unit" if audit.unit else "row"))
        if out_dir is not None:  # after every cell, so a stopped audit keeps the counts it has
            _write(out_dir, records, audit.min_match)
    table = audit_markdown(records, audit.min_match)
    if out_dir is not None:
        _write(out_dir, records, audit.min_match)
    return records, table


def _write(out_dir: Path, records: Sequence[AuditRecord], min_match: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "audit.csv", csv_text(records, AUDIT_FIELDS))
    write_atomic(out_dir / "audit.md", audit_markdown(records, min_match))


def audit_markdown(records: Sequence[AuditRecord], min_match: int = 8) -> str:
    """Counts per mode and epsilon, summed over seeds.

    The copies column matters for reading the counts: epsilon bounds what one record reveals, and
    k copies of a canary are a group that only about k times epsilon bounds.
    """
    groups: dict[tuple[str, str, float], list[AuditRecord]] = {}
    for r in records:
        groups.setdefault((r.privacy_unit, r.mode, r.epsilon), []).append(r)
    lines = [f"| privacy unit | mode | ε (demo set) | ε incl. pool sizes | canary copies | demonstrations | whole canary "
             f"| ≥{min_match}-char piece | longest piece |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (unit, mode, eps), rs in sorted(groups.items()):
        tot = float(np.mean([r.epsilon_total for r in rs]))
        who = "one unit holds every copy" if unit == "unit" else "each record"
        lines.append(f"| {who} | {mode} | {eps_text(eps)} | {eps_text(tot) if math.isinf(tot) else f'{tot:.2f}'} | "
                     f"{max(r.copies for r in rs)} | {sum(r.demos for r in rs)} | {sum(r.full_hits for r in rs)} | "
                     f"{sum(r.substring_hits for r in rs)} | {max(r.longest_match for r in rs)} |")
    return "\n".join(lines) + "\n"
