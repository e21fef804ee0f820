#!/usr/bin/env bash
# Feed-forward width ff_dim in {1, 2, 4, 8} x embed_dim (embed_dim 64).
cd "$(dirname "$0")/.." && source experiments/sweep.sh
sweep ablate_ff_dim model.ff_dim 64,128,256,512 experiment=esc50 model.embed_dim=64 "$@"
