"""The decision table of the fidelity grid (scripts/fidelity_grid.sh): one row per configuration and
epsilon, from every `dpicl eval --out` directory under the grid folder.

Per row: fidelity pooled over every scored demonstration (all seeds and sets) with its binomial 95 %
interval; the paired difference against epsilon 0 of the same directory (same dataset, label hint and
seeds), its mean over seeds, how many seeds were better, and whether it clears the spread: the
difference minus twice its standard error (two independent binomial proportions) is above zero.

Usage: python scripts/grid_table.py GRID_DIR [--out OUT.md] [--plot OUT.png]

runs.csv holds numbers only (no text), so the table and the plot are safe to publish.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from aggregation.evaluation import read_runs
from aggregation.evaluation.settings import DP, PUBLIC, REAL, eps_text


def _reference(settings: dict) -> str:
    """What the reference rows of a directory depend on beyond the dataset and hint: the model and the
    temperature of the public tokens ("" for SmolLM2 at 1)."""
    model = settings.get("model", "smollm2")
    public_tau = settings.get("public_temperature")
    public_tau = float(settings.get("temperature", 1.0) if public_tau is None else public_tau)
    tags = ([model] if model != "smollm2" else []) + ([f"public τ {public_tau:g}"] if public_tau != 1.0 else [])
    return ", ".join(tags)


def _config(settings: dict, mode: str) -> dict:
    k = settings.get("clusters", 0)
    tau = float(settings.get("temperature", 1.0))
    public_tau = settings.get("public_temperature")
    model = settings.get("model", "smollm2")
    block = settings.get("block_tokens") or 4
    g = float(settings.get("guidance", 1.0))
    precision = settings.get("precision", "float32")
    return {
        "dataset": settings["dataset"].split("/")[-1].removesuffix(".jsonl"),
        "mode": ((f"block k={block}" if mode == "block" else mode) + (f", guidance {g:g}" if g != 1.0 else "")
                 + (f", {precision}" if precision != "float32" else "")
                 + (f", M={settings['num_subsets']}" if settings.get("num_subsets", 10) != 10 else "")
                 + (f", N={settings['shots_per_subset']}" if settings.get("shots_per_subset", 2) != 2 else "")
                 + (f", P={settings['private_tokens']}" if settings.get("private_tokens") else "")
                 + (f", τ {tau:g}" if tau != 1.0 else "")
                 + (f", public τ {float(public_tau):g}" if public_tau is not None else "")
                 + (f", {model}" if model != "smollm2" else "")),
        "hint": settings.get("label_hint", "word"),
        "clusters": f"{k} {settings.get('clustering', 'dp')}" if k else "off",
        "width": settings.get("max_prompt_tokens", 256),
    }


def _pooled(runs: list) -> tuple[float, int]:
    n = sum(r.fidelity_demos for r in runs)
    hits = sum(r.fidelity * r.fidelity_demos for r in runs if r.fidelity_demos)
    return (hits / n if n else math.nan), n


def _half_width(p: float, n: int) -> float:
    return 1.96 * math.sqrt(p * (1 - p) / n) if n else math.nan


def rows(grid: Path) -> list[dict]:
    """Every (directory, mode, epsilon) row with its pooled fidelity and paired difference."""
    out = []
    for d in sorted(p for p in grid.iterdir() if (p / "runs.csv").exists()):
        settings = json.loads((d / "settings.json").read_text())
        runs = read_runs(d / "runs.csv")
        public = {r.seed: r for r in runs if r.row == PUBLIC}
        p0, n0 = _pooled(list(public.values()))
        groups: dict[tuple[str, str, float], list] = defaultdict(list)
        for r in runs:
            if r.row in (PUBLIC, REAL):
                groups[(r.row, "", r.epsilon)].append(r)
            elif r.row == DP:
                groups[(r.row, r.mode, r.epsilon)].append(r)
        for (row, mode, eps), rs in groups.items():
            p, n = _pooled(rs)
            cfg = (_config(settings, mode) if row == DP
                   else {**_config(settings, "fixed"), "mode": _reference(settings) or "-", "clusters": "-"})
            seed_deltas = [r.fidelity - public[r.seed].fidelity for r in rs if r.seed in public and row != PUBLIC]
            diff = p - p0 if row != PUBLIC else math.nan
            se = math.sqrt(p * (1 - p) / n + p0 * (1 - p0) / n0) if n and n0 and row != PUBLIC else math.nan
            totals = [r.epsilon_total for r in rs if math.isfinite(r.epsilon_total)]
            out.append({**cfg, "dir": d.name, "row": row, "epsilon": eps, "reference": _reference(settings),
                        "epsilon_total": sum(totals) / len(totals) if totals else math.inf,
                        "fidelity": p, "n": n, "diff": diff, "beyond": bool(diff - 2 * se > 0) if se == se else None,
                        "better": sum(x > 0 for x in seed_deltas), "seeds": len(rs),
                        "accuracy": sum(r.accuracy for r in rs) / len(rs),
                        "seconds_per_demo": sum(r.generate_seconds for r in rs) / max(1, sum(r.fidelity_demos for r in rs))})
    return out


_ROW_NAMES = {PUBLIC: "ε 0 (public prompt)", REAL: "real examples", DP: "DP"}


def markdown(table: list[dict]) -> str:
    """The table, reference rows deduplicated per dataset and hint."""
    head = ("| dataset | row | mode | label hint | clusters | width | ε (set) | ε incl. clustering | fidelity % (95 % interval) "
            "| demos | Δ vs ε 0 (seeds better) | beyond spread | ICL accuracy % | s per demo |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    seen = set()
    order = sorted(table, key=lambda r: (r["dataset"], r["row"] != PUBLIC, r["row"] != REAL, r["hint"], r["mode"],
                                        r["clusters"], r["width"], r["epsilon"], -r["n"]))
    for r in order:
        if r["row"] != DP:
            # (Real examples are scored by the evaluator alone: no model or temperature changes them.)
            key = (r["dataset"], r["row"], *((r["hint"], r["mode"]) if r["row"] == PUBLIC else ()))
            if key in seen:
                continue
            seen.add(key)
        p, n = r["fidelity"], r["n"]
        diff = "-" if r["row"] == PUBLIC else f"{100 * r['diff']:+.1f} ({r['better']}/{r['seeds']})"
        beyond = "-" if r["beyond"] is None else ("yes" if r["beyond"] else "no")
        hint = r["hint"] if r["row"] != REAL else "-"
        eps_total = "-" if r["row"] != DP else eps_text(round(r["epsilon_total"], 2))
        secs = f"{r['seconds_per_demo']:.1f}" if r["row"] == DP else "-"
        width = r["width"] if r["row"] == DP else "-"
        lines.append(f"| {r['dataset']} | {_ROW_NAMES[r['row']]} | {r['mode']} | {hint} | {r['clusters']} | {width} "
                     f"| {eps_text(r['epsilon'])} | {eps_total} | {100 * p:.1f} ± {100 * _half_width(p, n):.1f} | {n} "
                     f"| {diff} | {beyond} | {100 * r['accuracy']:.1f} | {secs} |")
    return "\n".join(lines) + "\n"


#: The line of a new task's generation defaults (proxy/task_config.py) in the plot.
DEFAULT_HINT, DEFAULT_LINE = "alias", "fixed, guidance 3, P=4, clusters off"


def plot(table: list[dict], path: Path) -> None:
    """Fidelity against epsilon on trec-opaque, one line per DP configuration measured at a finite epsilon.

    Cells run at epsilon infinity only are in the table, not here: without a finite-epsilon point they
    draw no trend, and twenty of them hid the rest. The default configuration is drawn thick.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = {0.0: 0, 1.0: 1, 4.0: 2, math.inf: 3}
    fig, axes = plt.subplots(1, 2, figsize=(12, 7), sharey=True)
    for ax, hint in zip(axes, ("word", "alias")):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # type: ignore[attr-defined]  # no colour twice per panel
        lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
        # The reference rows of the cell with the most demonstrations (some cells ran fewer seeds).
        # (Cells whose reference rows differ, another model or public temperature, are left out.)
        base = sorted((r for r in table if r["dataset"] == "trec-opaque" and r["row"] == PUBLIC and r["hint"] == hint
                       and not r["reference"]),
                      key=lambda r: -r["n"])
        for r in table:
            if (r["dataset"] == "trec-opaque" and r["row"] == DP and r["hint"] == hint and r["epsilon"] in xs
                    and r["width"] != 256 and not r["reference"]):
                lines[f"{r['mode']}, clusters {r['clusters']}"].append((xs[r["epsilon"]], 100 * r["fidelity"]))
        for name, pts in sorted(lines.items()):
            if not any(x in (xs[1.0], xs[4.0]) for x, _ in pts):
                continue
            pts = sorted(pts + [(0, 100 * b["fidelity"]) for b in base[:1]])
            default = hint == DEFAULT_HINT and name == DEFAULT_LINE
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", linewidth=3 if default else 1.2,
                    label=name + (" (the default)" if default else ""), zorder=3 if default else 2)
        real = sorted((r for r in table if r["dataset"] == "trec-opaque" and r["row"] == REAL and not r["reference"]),
                      key=lambda r: -r["n"])
        if real:
            ax.axhline(100 * real[0]["fidelity"], color="grey", linestyle="--", label="real examples")
        ax.set_xticks(list(xs.values()), ["0", "1", "4", "∞"])
        ax.set_xlabel("ε per demonstration set")
        ax.set_title(f"trec-opaque, label hint: {hint}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    axes[0].set_ylabel("fidelity % (24-120 demonstrations per point)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", type=Path)
    ap.add_argument("--out", type=Path, help="write the markdown table here (default: print)")
    ap.add_argument("--plot", type=Path, help="write the fidelity plot here")
    args = ap.parse_args()
    table = rows(args.grid)
    text = markdown(table)
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
