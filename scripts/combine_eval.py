"""Merge the runs of several `dpicl eval --out` directories into one fidelity table and plot.

`dpicl eval` runs one mechanism per directory; the README compares mechanisms (and modes run in
separate directories) side by side. This reads each directory's runs.csv, keeps them apart by
mechanism and mode as the per-directory tables do, and writes:

  OUT.md            the fidelity table (numbers only; runs.csv never holds text)
  OUT-fidelity.png  fidelity against epsilon, one line per mechanism and mode
  OUT-accuracy.png  ICL accuracy against epsilon, the same lines

Usage: python scripts/combine_eval.py OUT DIR [DIR ...] [--title TITLE]

A run (mechanism, seed, row, mode, epsilon) found in several directories is taken from the first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aggregation.evaluation import fidelity_markdown, plot_accuracy, read_runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output path without extension")
    ap.add_argument("dirs", type=Path, nargs="+", help="dpicl eval --out directories")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    runs, seen = [], set()
    for d in args.dirs:
        path = d / "runs.csv"
        if not path.exists():
            ap.error(f"{path} does not exist")
        for r in read_runs(path):
            # Every directory has its own reference rows (epsilon 0, real examples) per seed; the
            # first directory given keeps its run, so that no seed is counted twice.
            key = (r.mechanism, r.seed, r.row, r.mode, r.epsilon)
            if key not in seen:
                seen.add(key)
                runs.append(r)
    datasets = sorted({r.dataset for r in runs})
    if len(datasets) != 1:
        ap.error(f"the directories hold runs of several datasets ({', '.join(datasets)}); combine one at a time")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(fidelity_markdown(runs) + "\n")
    title = args.title or datasets[0]
    plot_accuracy(runs, args.out.with_name(args.out.name + "-fidelity.png"), metric="fidelity", title=title)
    plot_accuracy(runs, args.out.with_name(args.out.name + "-accuracy.png"), title=title)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
