#!/usr/bin/env bash
# Number of attention heads at fixed width (per-head size = embed_dim / heads, so
# the parameter count stays the same, as in "Attention Is All You Need" Table 3 A).
#   experiments/ablate_heads.sh                                   # ESC-50, 5 folds
#   experiments/ablate_heads.sh experiment=quickstart trainer.epochs=1 logger=none   # smoke
cd "$(dirname "$0")/.." && source experiments/sweep.sh
sweep ablate_heads model.num_heads 1,2,4,8,16 experiment=esc50 model.embed_dim=64 "$@"
