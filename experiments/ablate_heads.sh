#!/usr/bin/env bash
# Number of attention heads at fixed width (per-head size = embed_dim / heads, so
# the parameter count stays the same, as in "Attention Is All You Need" Table 3 A).
# Extra arguments are Hydra overrides, e.g. a smoke run:
#   experiments/ablate_heads.sh experiment=quickstart trainer.epochs=1 logger=none
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m src.train -m experiment=esc50 name=ablate_heads \
  model.embed_dim=64 model.num_heads=1,2,4,8,16 "$@"
