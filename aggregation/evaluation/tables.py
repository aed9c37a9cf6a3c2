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
    mechanism: str = "gaussian"
    fidelity: float = math.nan  # mean over seeds (NaN: not measured)
    fidelity_std: float = math.nan
    fidelity_demos: int = 0  # demonstrations scored, summed over seeds
    vs_public_fid: tuple[float, float, int, int] | None = None


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(runs: Sequence[RunRecord]) -> list[Summary]:
    """Mean and sample standard deviation over seeds of every (row, mechanism, mode, epsilon).

    Paired differences compare a row with the epsilon-0 row of the same mechanism and seed.
    """
    groups: dict[tuple[str, str, str, float], list[RunRecord]] = {}
    seen: set[tuple[str, int]] = set()
    for r in runs:
        if r.row not in (DP, PUBLIC):
            # Zero-shot and real examples do not depend on the mechanism: runs of several
            # mechanisms combined repeat them, so keep one per seed (paired with its own epsilon 0).
            if (r.row, r.seed) in seen:
                continue
            seen.add((r.row, r.seed))
        groups.setdefault((r.row, r.mechanism, r.mode, r.epsilon), []).append(r)
    rank = {ZERO_SHOT: 0, PUBLIC: 1, REAL: 2, DP: 3}
    public = {(r.mechanism, r.seed): r for r in runs if r.row == PUBLIC}

    def paired(rs: Sequence[RunRecord], field: str) -> tuple[float, float, int, int] | None:
        diffs = [getattr(r, field) - getattr(public[(r.mechanism, r.seed)], field) for r in rs
                 if (r.mechanism, r.seed) in public]
        diffs = [d for d in diffs if math.isfinite(d)]
        if not diffs:
            return None
        return float(np.mean(diffs)), _std(diffs), sum(d > 0 for d in diffs), len(diffs)

    out = []
    for (row, mech, mode, eps), rs in sorted(groups.items(),
                                             key=lambda kv: (rank.get(kv[0][0], 9), kv[0][1], kv[0][2], kv[0][3])):
        acc = [r.accuracy for r in rs]
        cal = [r.accuracy_calibrated for r in rs]
        fid = [r.fidelity for r in rs if math.isfinite(r.fidelity)]
        vs, vs_cal, vs_fid = (None, None, None) if row == PUBLIC else \
            (paired(rs, "accuracy"), paired(rs, "accuracy_calibrated"), paired(rs, "fidelity"))
        out.append(Summary(row, mode, eps, float(np.mean([r.epsilon_total for r in rs])),
                           float(np.mean(acc)), _std(acc), float(np.mean(cal)), _std(cal), len(rs), vs, vs_cal,
                           mech, float(np.mean(fid)) if fid else math.nan, _std(fid) if fid else math.nan,
                           sum(r.fidelity_demos for r in rs), vs_fid))
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
    several = len({r.mechanism for r in runs if r.row in (DP, PUBLIC)}) > 1
    for s in summarise(runs):
        eps = eps_text(s.epsilon) if s.row == DP else ("0" if s.row in (ZERO_SHOT, PUBLIC) else "∞")
        tot = f"{s.epsilon_total:.2f}" if s.row == DP and math.isfinite(s.epsilon_total) else eps
        title = ROW_TITLES.get(s.row, s.row) + (f" ({s.mechanism})" if several and s.row in (DP, PUBLIC) else "")
        lines.append(f"| {title} | {s.mode or '-'} | {eps} | {tot} | "
                     f"{100 * s.mean:.1f} ± {100 * s.std:.1f} | {100 * s.mean_cal:.1f} ± {100 * s.std_cal:.1f} | "
                     f"{s.seeds} | {_delta(s.vs_public)} | {_delta(s.vs_public_cal)} |")
    return "\n".join(lines) + "\n"


def fidelity_markdown(runs: Sequence[RunRecord]) -> str:
    """Markdown table of demonstration fidelity (%) per row, mechanism, mode and epsilon, with the
    paired difference from epsilon 0 of the same mechanism and the ICL accuracy beside it."""
    lines = ["| row | mechanism | mode | ε (demo set) | fidelity % | demos scored | Δ fidelity vs ε 0 (seeds better) "
             "| accuracy % | calibrated % | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summarise(runs):
        if not math.isfinite(s.fidelity):
            continue
        eps = eps_text(s.epsilon) if s.row == DP else ("0" if s.row == PUBLIC else "∞")
        mech = s.mechanism if s.row in (DP, PUBLIC) else "any"
        lines.append(f"| {ROW_TITLES.get(s.row, s.row)} | {mech} | {s.mode or '-'} | {eps} | "
                     f"{100 * s.fidelity:.1f} ± {100 * s.fidelity_std:.1f} | {s.fidelity_demos} | "
                     f"{_delta(s.vs_public_fid)} | {100 * s.mean:.1f} ± {100 * s.std:.1f} | "
                     f"{100 * s.mean_cal:.1f} ± {100 * s.std_cal:.1f} | {s.seeds} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(runs: Sequence[RunRecord], path: Path, calibrate: bool = False, title: str = "",
                  metric: str = "accuracy") -> None:
    """Accuracy (or ``metric="fidelity"``) against epsilon: one line per mechanism and mode with error
    bars, reference lines for the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = summarise(runs)
    if metric == "fidelity":
        summaries = [s for s in summaries if math.isfinite(s.fidelity)]

    def value(s: Summary) -> tuple[float, float]:
        if metric == "fidelity":
            return 100 * s.fidelity, 100 * s.fidelity_std
        return (100 * s.mean_cal, 100 * s.std_cal) if calibrate else (100 * s.mean, 100 * s.std)

    dp_eps = sorted({s.epsilon for s in summaries if s.row == DP})
    finite = [e for e in dp_eps if math.isfinite(e)]
    inf_x = (max(finite) * 2) if finite else 1.0

    def x_of(e: float) -> float:
        return inf_x if math.isinf(e) else e

    fig, ax = plt.subplots(figsize=(7, 4.5))
    mechs = sorted({s.mechanism for s in summaries if s.row == DP})
    styles = {("resample", 0): ("o", "tab:blue"), ("fixed", 0): ("s", "tab:purple"), ("block", 0): ("^", "tab:cyan"),
              ("resample", 1): ("o", "tab:orange"), ("fixed", 1): ("s", "tab:brown"), ("block", 1): ("^", "tab:olive")}
    for mi, mech in enumerate(mechs):
        for mode in ("resample", "fixed", "block"):
            pts = [s for s in summaries if s.row == DP and s.mode == mode and s.mechanism == mech]
            if not pts:
                continue
            marker, color = styles.get((mode, mi % 2), ("x", None))
            ys, es = zip(*(value(s) for s in pts))
            ax.errorbar([x_of(s.epsilon) for s in pts], ys, yerr=es, marker=marker, color=color, capsize=4,
                        label=f"DP, {mech}, {mode}" if len(mechs) > 1 else f"DP, {mode}")
    pub_styles = ("--", (0, (5, 1)))
    for row, style, color in ((ZERO_SHOT, ":", "grey"), (PUBLIC, "--", "tab:green"), (REAL, "-.", "tab:red")):
        for s in summaries:
            if s.row == row:
                y, sd = value(s)
                if row == PUBLIC and len(mechs) > 1:
                    style = pub_styles[mechs.index(s.mechanism) % 2] if s.mechanism in mechs else style
                    label = f"{ROW_TITLES[row]}, {s.mechanism} ({y:.1f}%)"
                else:
                    label = f"{ROW_TITLES[row]} ({y:.1f}%)"
                ax.axhline(y, linestyle=style, color=color, label=label)
                if sd > 0:
                    ax.axhspan(y - sd, y + sd, color=color, alpha=0.08)
                if row != PUBLIC:
                    break  # the same runs under each mechanism: one line
    if dp_eps:
        ax.set_xscale("log", base=2)
        ticks = [x_of(e) for e in dp_eps]
        ax.set_xticks(ticks, [eps_text(e) for e in dp_eps])
    ax.set_xlabel("ε per demonstration set")
    ax.set_ylabel("demonstration fidelity %" if metric == "fidelity"
                  else "accuracy %" + (" (calibrated)" if calibrate else ""))
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
