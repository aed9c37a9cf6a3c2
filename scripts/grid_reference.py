"""Seed a new fidelity-grid directory with the reference rows of a finished sibling.

The zero-shot, epsilon-0 and real-example rows of `dpicl eval` depend on the dataset, the label hint,
the seeds and the generation settings, never on the DP rows' clustering, mode or epsilon (every run
is seeded from its own key), so a sibling directory that differs only in those computed them already.
This copies those rows (runs.csv, their demos.jsonl lines) and writes the new directory's
settings.json, so that `dpicl eval --resume` runs only the DP rows. It refuses when the two
directories differ in anything else.

Usage: python scripts/grid_reference.py SOURCE_DIR TARGET_DIR key=value ...  (the settings that differ:
clusters, clustering, block_tokens, guidance, num_subsets, shots_per_subset, private_tokens)
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

REFERENCE_ROWS = {"zero_shot", "epsilon_0", "non_private"}
# M, N and P too: the epsilon-0 row reads the public prompt alone, whatever they are.
MAY_DIFFER = {"clusters", "clustering", "block_tokens", "guidance", "num_subsets", "shots_per_subset", "private_tokens"}


def _value(text: str) -> object:
    """``null``, an int, a float or the text itself, as settings.json stores the setting."""
    if text == "null":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    src, dst, *pairs = sys.argv[1:]
    source, target = Path(src), Path(dst)
    if (target / "runs.csv").exists():
        return  # already seeded or run: --resume takes it from here
    settings = json.loads((source / "settings.json").read_text())
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in MAY_DIFFER:
            sys.exit(f"{key} changes the reference rows; run them")
        settings[key] = _value(value)
    with open(source / "runs.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, runs = reader.fieldnames, [r for r in reader if r["row"] in REFERENCE_ROWS]
    demos = [line for line in (source / "demos.jsonl").read_text().splitlines()
             if json.loads(line)["row"] in REFERENCE_ROWS]
    target.mkdir(parents=True, exist_ok=True)
    with open(target / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(runs)
    (target / "demos.jsonl").write_text("".join(line + "\n" for line in demos))
    (target / "settings.json").write_text(json.dumps(settings, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
