#!/usr/bin/env bash
# Feed-forward width ff_dim in {1, 2, 4, 8} x embed_dim (embed_dim 64).
# Extra arguments are Hydra overrides (see ablate_heads.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m src.train -m experiment=esc50 name=ablate_ff_dim \
  model.embed_dim=64 model.ff_dim=64,128,256,512 "$@"
