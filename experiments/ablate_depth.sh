#!/usr/bin/env bash
# Encoder depth: 1, 2, 4, 6 TransformerBlocks.
cd "$(dirname "$0")/.." && source experiments/sweep.sh
sweep ablate_depth model.num_layers 1,2,4,6 experiment=esc50 "$@"
