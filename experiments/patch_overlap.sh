#!/usr/bin/env bash
# Patch overlap as in AST Table 5: 16x16 patches with stride 16, 14, 12, 10 in both
# axes. The paper's AudioSet mAP sits beside ours (trend only: another task).
cd "$(dirname "$0")/.." && source experiments/sweep.sh
REFERENCE=references/ast_table5.yaml \
  sweep patch_overlap model.stride 16,14,12,10 experiment=esc50 "$@"
