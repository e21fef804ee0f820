#!/usr/bin/env bash
# AST's AudioSet tables on the balanced training set, each beside the paper's numbers:
#   Table 5 (patch overlap): stride 16, 14, 12, 10 in both axes, ImageNet DeiT weights;
#   Table 2 (ImageNet pretraining): from scratch (model.pretrained=null) vs DeiT weights.
# Each run trains on balanced_train, selects on a validation split carved from it and
# reports mAP on eval (experiment=audioset_balanced: AST's recipe). Rerunning resumes.
#
#   experiments/ast_audioset.sh [overrides...]     e.g. data.root=/data/audioset
#
# Needs the AudioSet audio (data.root / data.file_pattern, see src/data/audioset.py),
# the DeiT weights (imported on first use) and a GPU: AST base384 has 87 M parameters.
# For a smoke run on the generated multi-label set (the stride sweep then starts from
# scratch, as the quickstart does; the model keeps AST base384's shape, which the DeiT
# weights need: model=small would not load them):
#   experiments/ast_audioset.sh experiment=tagging_quickstart model=ast_base384 \
#     data.generate.train_clips=60 data.generate.eval_clips=30 trainer.epochs=1 logger=none
cd "$(dirname "$0")/.." && source experiments/sweep.sh
# A smoke run may replace the experiment; AST's recipe is the default.
case " $* " in *" experiment="*) base=() ;; *) base=(experiment=audioset_balanced) ;; esac
REFERENCE=references/ast_table5.yaml \
  sweep ast_audioset_overlap model.stride 16,14,12,10 "${base[@]}" "$@"
REFERENCE=references/ast_table2.yaml \
  sweep ast_audioset_pretraining model.pretrained null,deit_base_distilled_384 "${base[@]}" "$@"
