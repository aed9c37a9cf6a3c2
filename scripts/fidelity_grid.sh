#!/usr/bin/env bash
# The decision table of docs/fidelity-grid.md (issue 19; its deciding rows in README "Fidelity and
# accuracy against epsilon"): every cell is one
# `dpicl eval` directory under docs/eval/grid, run with --resume so a stopped grid continues
# where it stopped; scripts/grid_table.py turns the directories into the table.
#
#   bash scripts/fidelity_grid.sh STAGE [STAGE ...]
#
# Stages (run in this order on 2 idle cores; minutes measured on this machine, see docs/fidelity-grid.md):
#   ceiling  trec-opaque, fixed mode, words/aliases x clusters off/4/16 x dp/public, epsilon inf
#   finite   the same grid at epsilon 1 and 4
#   modes    the chosen configuration in resample and block k = 2, 4, 8 (epsilon 1, 4, inf)
#   trec     trec and an unseen label mapping, fixed mode, chosen configuration and plain
#   guidance the public prior's guidance g on trec-opaque (aliases: 2, 3, 5 at epsilon inf and 3 at 1, 4;
#            words: 3 at 1, 4, inf and 0.5 at 1, 4; 16 DP clusters with g = 3 at inf), then g = 3 at inf
#            on trec and the unseen mapping
#   prefix   only the first P tokens private (P = 2, 4, 6; words with g = 1 and 3, aliases with g = 3 and 5,
#            M = 10 and 20; aliases with g = 3 in resample mode; trec and the unseen mapping with g = 3, P = 4;
#            aliases, g = 3: resample with M = 20, P = 4 and fixed with M = 30, N = 1, P = 3)
#   defaults the default configuration of a new task on trec, the unseen mapping and trec-opaque at 1, 4, inf
#   prefix-clusters  aliases, g = 3, P = 4 inside 16 and 4 DP clusters; aliases, g = 5, P = 4, M = 20
#   levers   the default configuration with other public / private temperatures, N = 4, and the Gemma 3 270M
#            generator (trec-opaque)
#   alone    one prompt of real examples, no aggregation (M = 1, N = 2 and 6, epsilon inf); the default with
#            M = 5 at inf and M = 20 at 1, 4, inf (and at 1, 4 on trec and the unseen mapping)
#   precision  the plain words cell at epsilon inf with the int8 and the bfloat16 generator (2 seeds each;
#            both slower than float32 on this CPU, docs/sources.md)
#
# Every cell: M=10, N=2 (the task default), T=15, 5 seeds x 2 sets x 6 labels = 60 scored
# demonstrations per row, 50 test questions for the ICL accuracy column, prompts padded to 104
# tokens (what `max_prompt_tokens: auto` derives for these prompts is 91-105; `width` re-runs the
# chosen cell at the old default 256 to show that the narrower width costs no fidelity).
#   one HINT K METHOD MODE [BLOCK]   a single trec-opaque configuration at epsilon 1, 4, inf
set -euo pipefail
OUT=${GRID_OUT:-docs/eval/grid}
SEEDS=${GRID_SEEDS:-5}
WIDTH=${GRID_WIDTH:-104}
mkdir -p "$OUT"

cell() {  # NAME DATASET HINT K METHOD MODES EPSILONS [extra dpicl eval options]
  local name=$1 dataset=$2 hint=$3 k=$4 method=$5 modes=$6 eps=$7
  shift 7
  echo "== $name: $dataset hint=$hint clusters=$k/$method modes=$modes epsilons=$eps $*"
  # The reference rows (zero-shot, epsilon 0, real examples) do not depend on clustering or mode:
  # take them from the plain fixed-mode cell of the same dataset and hint when it exists.
  local ref="$OUT/${name%%-*}-fixed-$hint-c0" block=null same=() prev="" a own=""
  for a in "$@"; do  # the options that do not change the reference rows
    case $a in --public-temperature|--temperature|--model|--precision) own=1 ;; esac  # they change the epsilon-0 row: run its own
    [ "$prev" = --block-tokens ] && block=$a
    [ "$prev" = --guidance ] && same+=("guidance=$a")
    [ "$prev" = --num-subsets ] && same+=("num_subsets=$a")
    [ "$prev" = --shots-per-subset ] && same+=("shots_per_subset=$a")
    [ "$prev" = --private-tokens ] && same+=("private_tokens=$a")
    prev=$a
  done
  if [ "$OUT/$name" != "$ref" ] && [ -s "$ref/runs.csv" ] && [ "$WIDTH" = 104 ] && [ -z "$own" ]; then
    python scripts/grid_reference.py "$ref" "$OUT/$name" "clusters=$k" "clustering=$method" "block_tokens=$block" \
      "${same[@]}"
  fi
  dpicl eval --dataset "$dataset" --quick --seeds "$SEEDS" --n-test 50 --fidelity-demos 2 \
    --label-hint "$hint" --clusters "$k" --clustering "$method" --modes "$modes" --epsilons "$eps" \
    --max-prompt-tokens "$WIDTH" --resume --no-progress --out "$OUT/$name" "$@"
}

grid() {  # EPSILONS: trec-opaque fixed, every hint and clustering
  for hint in alias word; do
    cell "opaque-fixed-$hint-c0" trec-opaque "$hint" 0 dp fixed "$1"
    for k in 4 16; do
      for method in dp public; do
        cell "opaque-fixed-$hint-c$k$method" trec-opaque "$hint" "$k" "$method" fixed "$1"
      done
    done
  done
}

unseen_mapping() {  # TREC with label words the code has never seen (the mapping is data)
  local f="$OUT/trec-unseen.jsonl"
  if [ ! -s "$f" ]; then
    dpicl data trec -o "$f.tmp"
    python - "$f.tmp" "$f" <<'EOF'
import json, sys
words = {"NUM": "river", "LOC": "candle", "HUM": "tiger", "DESC": "copper", "ENTY": "window", "ABBR": "saddle"}
with open(sys.argv[1]) as src, open(sys.argv[2], "w") as dst:
    for line in src:
        row = json.loads(line)
        row["label"] = words[row["label"]]
        dst.write(json.dumps(row) + "\n")
EOF
    rm "$f.tmp"
  fi
  echo "$f"
}

# The configuration the ceiling and finite stages chose (override to re-run the later stages).
HINT=${GRID_HINT:-alias}
K=${GRID_K:-4}
METHOD=${GRID_METHOD:-dp}

if [ "${1:-}" = cell ]; then  # cell NAME DATASET HINT K METHOD MODES EPSILONS [options]: one directory
  shift
  cell "$@"
  exit
fi

if [ "${1:-}" = one ]; then
  shift
  hint=$1 k=$2 method=$3 mode=$4 block=${5:-}
  tag=$mode${block}
  cell "opaque-$tag-$hint-c$k$([ "$k" = 0 ] || echo "$method")" trec-opaque "$hint" "$k" "$method" "$mode" 1,4,inf \
    ${block:+--block-tokens "$block"}
  exit
fi

for stage in "$@"; do
  case "$stage" in
    ceiling) grid inf ;;
    finite) grid 1,4,inf ;;
    modes)
      cell "opaque-resample-$HINT-c$K$METHOD" trec-opaque "$HINT" "$K" "$METHOD" resample 1,4,inf
      for b in 2 4 8; do
        cell "opaque-block$b-$HINT-c$K$METHOD" trec-opaque "$HINT" "$K" "$METHOD" block 1,4,inf --block-tokens "$b"
      done ;;
    trec)
      unseen=$(unseen_mapping)
      for ds in trec "$unseen"; do
        tag=$([ "$ds" = trec ] && echo trec || echo unseen)
        cell "$tag-fixed-word-c0" "$ds" word 0 dp fixed 1,4,inf
        [ "$HINT" = word ] || cell "$tag-fixed-$HINT-c0" "$ds" "$HINT" 0 dp fixed 1,4,inf
        [ "$K" = 0 ] || cell "$tag-fixed-$HINT-c$K$METHOD" "$ds" "$HINT" "$K" "$METHOD" fixed 1,4,inf
      done ;;
    guidance)
      for g in 2 3 5; do
        cell "opaque-fixed-alias-c0-g$g" trec-opaque alias 0 dp fixed "$([ $g = 3 ] && echo inf,4,1 || echo inf)" --guidance $g
      done
      cell opaque-fixed-word-c0-g3 trec-opaque word 0 dp fixed inf,4,1 --guidance 3
      cell opaque-fixed-word-c0-g0.5 trec-opaque word 0 dp fixed 1,4 --guidance 0.5
      cell opaque-fixed-alias-c16dp-g3 trec-opaque alias 16 dp fixed inf --guidance 3
      cell opaque-fixed-word-c0-g3-m20 trec-opaque word 0 dp fixed 1,4 --guidance 3 --num-subsets 20
      cell trec-fixed-word-c0-g3 trec word 0 dp fixed inf --guidance 3
      cell unseen-fixed-word-c0-g3 "$(unseen_mapping)" word 0 dp fixed inf --guidance 3 ;;
    prefix)  # only the first P of the T = 15 tokens private (the budget of 15 buys P stronger tokens)
      cell opaque-fixed-word-c0-g3-p4 trec-opaque word 0 dp fixed 1,4,inf --guidance 3 --private-tokens 4
      cell opaque-fixed-word-c0-p4 trec-opaque word 0 dp fixed 1,4,inf --private-tokens 4
      cell opaque-fixed-word-c0-g3-p2 trec-opaque word 0 dp fixed 1,4 --guidance 3 --private-tokens 2
      cell opaque-fixed-alias-c0-g3-p4 trec-opaque alias 0 dp fixed 1,4,inf --guidance 3 --private-tokens 4
      cell opaque-fixed-alias-c0-g3-p4-m20 trec-opaque alias 0 dp fixed 1,4 --guidance 3 --private-tokens 4 \
        --num-subsets 20
      cell opaque-fixed-alias-c0-g5-p4 trec-opaque alias 0 dp fixed 1,4 --guidance 5 --private-tokens 4
      cell opaque-fixed-alias-c0-g3-p6 trec-opaque alias 0 dp fixed 1,4 --guidance 3 --private-tokens 6
      cell opaque-resample-alias-c0-g3-p4 trec-opaque alias 0 dp resample 1,4 --guidance 3 --private-tokens 4
      cell trec-fixed-alias-c0-g3-p4 trec alias 0 dp fixed 1,4 --guidance 3 --private-tokens 4
      cell trec-fixed-word-c0-g3-p4 trec word 0 dp fixed 1,4 --guidance 3 --private-tokens 4
      cell unseen-fixed-alias-c0-g3-p4 "$(unseen_mapping)" alias 0 dp fixed 1,4 --guidance 3 --private-tokens 4
      cell opaque-resample-alias-c0-g3-p4-m20 trec-opaque alias 0 dp resample 1,4 --guidance 3 --private-tokens 4 \
        --num-subsets 20
      cell opaque-fixed-alias-c0-g3-p3-m30n1 trec-opaque alias 0 dp fixed 1,4 --guidance 3 --private-tokens 3 \
        --num-subsets 30 --shots-per-subset 1 ;;
    defaults)  # the default configuration of a new task (aliases, guidance 3, P = 4) on all three datasets,
      # epsilon 1, 4, inf (run with GRID_SEEDS=10: 120 demonstrations per cell on trec-opaque)
      cell opaque-fixed-alias-c0-g3-p4 trec-opaque alias 0 dp fixed 1,4,inf --guidance 3 --private-tokens 4
      cell trec-fixed-alias-c0-g3-p4 trec alias 0 dp fixed 1,4,inf --guidance 3 --private-tokens 4
      cell unseen-fixed-alias-c0-g3-p4 "$(unseen_mapping)" alias 0 dp fixed 1,4,inf --guidance 3 --private-tokens 4 ;;
    prefix-clusters)  # the private prefix inside DP clusters (parallel composition), and the two epsilon-4 levers together
      cell opaque-fixed-alias-c16dp-g3-p4 trec-opaque alias 16 dp fixed 1,4,inf --guidance 3 --private-tokens 4
      cell opaque-fixed-alias-c4dp-g3-p4 trec-opaque alias 4 dp fixed 1,4 --guidance 3 --private-tokens 4
      cell opaque-fixed-alias-c0-g5-p4-m20 trec-opaque alias 0 dp fixed 1,4 --guidance 5 --private-tokens 4 \
        --num-subsets 20 ;;
    levers)  # what else might lift the default's ceiling (trec-opaque; these cells run their own reference rows
      # where a temperature or the model changes them): public tokens at temperature 0.5; private tokens at
      # 0.25 (near argmax) with the public ones at 1; N = 4 shots per prompt (width 192 fits them); the
      # Gemma 3 270M generator (its three cells were run with GRID_SEEDS=10)
      cell opaque-fixed-alias-c0-g3-p4-pt0.5 trec-opaque alias 0 dp fixed inf --guidance 3 --private-tokens 4 \
        --public-temperature 0.5
      cell opaque-fixed-alias-c0-g3-t0.25-p4 trec-opaque alias 0 dp fixed inf --guidance 3 --temperature 0.25 \
        --public-temperature 1 --private-tokens 4
      WIDTH=192 cell opaque-fixed-alias-c0-g3-p4-n4 trec-opaque alias 0 dp fixed inf,4 --guidance 3 --private-tokens 4 \
        --shots-per-subset 4
      cell opaque-fixed-alias-c0-g3-p4-gemma trec-opaque alias 0 dp fixed inf,4,1 --guidance 3 --private-tokens 4 \
        --model gemma3-270m
      cell trec-fixed-alias-c0-g3-p4-gemma trec alias 0 dp fixed 1,4,inf --guidance 3 --private-tokens 4 --model gemma3-270m
      cell unseen-fixed-alias-c0-g3-p4-gemma "$(unseen_mapping)" alias 0 dp fixed 1,4,inf --guidance 3 --private-tokens 4 \
        --model gemma3-270m ;;
    alone)  # what the generator writes from real examples with no aggregation (M = 1, epsilon inf: not private),
      # against the default's aggregate of ten prompts; and the default with five and twenty prompts
      cell opaque-fixed-alias-c0-m1 trec-opaque alias 0 dp fixed inf --num-subsets 1
      cell opaque-fixed-alias-c0-g3-p4-m1 trec-opaque alias 0 dp fixed inf --num-subsets 1 --guidance 3 --private-tokens 4
      cell opaque-fixed-alias-c0-g3-p4-m5 trec-opaque alias 0 dp fixed inf --num-subsets 5 --guidance 3 --private-tokens 4
      WIDTH=256 cell opaque-fixed-alias-c0-n6-m1 trec-opaque alias 0 dp fixed inf --num-subsets 1 --shots-per-subset 6
      cell opaque-fixed-alias-c0-g3-p4-m20 trec-opaque alias 0 dp fixed 1,4,inf --guidance 3 --private-tokens 4 \
        --num-subsets 20
      cell trec-fixed-alias-c0-g3-p4-m20 trec alias 0 dp fixed 1,4 --guidance 3 --private-tokens 4 --num-subsets 20
      cell unseen-fixed-alias-c0-g3-p4-m20 "$(unseen_mapping)" alias 0 dp fixed 1,4 --guidance 3 --private-tokens 4 \
        --num-subsets 20 ;;
    precision)  # the precision changes the epsilon-0 row too, so these directories run their own references
      for p in int8:int8 bfloat16:bf16; do
        dpicl eval --dataset trec-opaque --quick --seeds 2 --n-test 50 --fidelity-demos 2 --label-hint word \
          --modes fixed --epsilons inf --max-prompt-tokens "$WIDTH" --precision "${p%%:*}" --resume --no-progress \
          --out "$OUT/opaque-fixed-word-c0-${p##*:}"
      done ;;
    width) WIDTH=256 cell "opaque-fixed-$HINT-c$K$METHOD-w256" trec-opaque "$HINT" "$K" "$METHOD" fixed inf ;;
    *) echo "unknown stage $stage (ceiling, finite, modes, trec, guidance, prefix, prefix-clusters, defaults, levers, alone, precision, width; or: one HINT K METHOD MODE [BLOCK])" >&2; exit 2 ;;
  esac
done
