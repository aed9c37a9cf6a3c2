"""Tables and plots of evaluation runs: mean and spread over seeds per row, mode and epsilon, paired
differences from epsilon 0, the markdown table and the accuracy-against-epsilon plot, plus the
atomic file writers every output goes through.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aggregation.evaluation.settings import DP, PUBLIC, REAL, ROW_TITLES, ZERO_SHOT, RunRecord, eps_text


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
        eps = eps_text(s.epsilon) if s.row == DP else ("0" if s.row in (ZERO_SHOT, PUBLIC) else "∞")
        tot = f"{s.epsilon_total:.2f}" if s.row == DP and math.isfinite(s.epsilon_total) else eps
        lines.append(f"| {ROW_TITLES.get(s.row, s.row)} | {s.mode or '-'} | {eps} | {tot} | "
                     f"{100 * s.mean:.1f} ± {100 * s.std:.1f} | {100 * s.mean_cal:.1f} ± {100 * s.std_cal:.1f} | "
                     f"{s.seeds} | {_delta(s.vs_public)} | {_delta(s.vs_public_cal)} |")
    return "\n".join(lines) + "\n"


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
        ax.set_xticks(ticks, [eps_text(e) for e in dp_eps])
    ax.set_xlabel("ε per demonstration set")
    ax.set_ylabel("accuracy %" + (" (calibrated)" if calibrate else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    write_atomic(path, png.getvalue())
    plt.close(fig)


def csv_text(records: Sequence[Any], fields: Sequence[str]) -> str:
    """CSV (with header) of dataclass records."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields))
    w.writeheader()
    for r in records:
        w.writerow(dataclasses.asdict(r))
    return buf.getvalue()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write through a temporary file and rename, so ``path`` is never left half-written."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)
