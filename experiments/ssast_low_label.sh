#!/usr/bin/env bash
# Does masked patch pretraining (SSAST, src.pretrain) pay off with few labels?
#
# SET=generated (default): the synthetic quickstart generator in ESC-50 layout (12
# classes, CLIPS_PER_CLASS clips of 2 s per class in 5 folds);
#   1. pretrain a small transformer on folds 1-3, labels ignored (experiment=ssast);
#   2. fine-tune it with k labelled clips per class from fold 4 (data.train_per_class=k;
#      validation: a quarter of fold 4, carved before the k are drawn), test on fold 5
#      (experiment=ssast_quickstart: mean pooling, the pretrained patch embedding kept);
#   3. the same model from scratch (model.pretrained=null model.freeze=0), and the
#      linear baseline (model=linear_baseline) on the same splits;
#   each transformer variant with its own peak learning rate (LR_PRETRAINED, LR_SCRATCH),
#   chosen on the validation split (never the test fold) at k=5, seeds 0 and 1, from
#   {2e-4, 5e-4, 1e-3, 2e-3, 4e-3}: validation accuracy pretrained 41.3 / 44.6 / 49.2 /
#   48.8 % at 5e-4 / 1e-3 / 2e-3 / 4e-3, scratch 32.9 / 32.5 / 29.2 % at 2e-4 / 5e-4 /
#   1e-3 (README: Self-supervised pretraining);
# for k in KS and every seed in SEEDS (the seed also draws the k clips and the
# validation split: data.split_seed), then print a markdown table of the test accuracy
# (last epoch; mean +- std over the seeds) into $OUT/table.md.
#
# SET=debian: real recordings, the sound files of Debian packages (scripts/debian_sounds.py
# builds the corpus into CORPUS on first use; about 1 GB of downloads). The task is the
# package a sound comes from: every package with at least MIN_FILES files is a class, and
# PER_CLASS of its files (evenly spread over its sorted names) form a labelled set in 5
# folds. Pretraining reads every other file of the corpus (the labelled set's folds 1-3
# and all files of the other packages), never folds 4 and 5. Steps 2 and 3 as above, on
# CLIP_SECONDS crops.
#
#   experiments/ssast_low_label.sh                    # about 30 min on 2 CPU cores
#   KS="5" SEEDS="0" experiments/ssast_low_label.sh   # one setting
#   SET=debian experiments/ssast_low_label.sh         # real recordings
#   experiments/ssast_low_label.sh logger=wandb       # extra overrides go to every run
#   PRETRAIN_ARGS="model.patchout.time=4" OUT=runs/ssast_low_label_patchout \
#     experiments/ssast_low_label.sh                  # overrides for the pretraining only
#
# Runs go to $OUT (runs/ssast_low_label, or runs/ssast_low_label_debian; below it
# VARIANT/lrLR/kK-seedS); a finished run is not run again, so the same command resumes
# an interrupted comparison. The test fold is never read by the pretraining.
cd "$(dirname "$0")/.."
set -euo pipefail

PY=${PYTHON:-.venv/bin/python}
SET=${SET:-generated}
KS=${KS:-"5 10 20"}
SEEDS=${SEEDS:-"0 1"}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-50}
LR_PRETRAINED=${LR_PRETRAINED:-2e-3}
LR_SCRATCH=${LR_SCRATCH:-2e-4}
LR_LINEAR=${LR_LINEAR:-5e-4}     # experiment=ssast_quickstart's
read -r -a PRETRAIN_EXTRA <<< "${PRETRAIN_ARGS:-}"  # overrides for the pretraining only
FINETUNE=(data.train_folds=[4] data.folds=[5] data.val_fraction=0.25
          trainer.verbose=0 trainer.attention_maps=0)
case $SET in
  generated)
    OUT=${OUT:-${AUDIO_RUNS_DIR:-runs}/ssast_low_label}
    CLIPS_PER_CLASS=${CLIPS_PER_CLASS:-200}
    # The data has its own root, so the quickstart set is left alone.
    DATA=(data=quickstart "data.root=\${paths.cache_dir}/ssast_low_label"
          "data.generate.clips_per_class=$CLIPS_PER_CLASS")
    PRETRAIN_DATA=("${DATA[@]}" pretrain.folds=[1,2,3])
    ;;
  debian)
    OUT=${OUT:-${AUDIO_RUNS_DIR:-runs}/ssast_low_label_debian}
    CORPUS=${CORPUS:-${AUDIO_DATA_DIR:-data}/debian_sounds}
    MIN_FILES=${MIN_FILES:-50}
    PER_CLASS=${PER_CLASS:-100}
    CLIP_SECONDS=${CLIP_SECONDS:-2}
    if [ ! -f "$CORPUS/manifest.csv" ]; then
      "$PY" -m scripts.debian_sounds "$CORPUS"
    fi
    mkdir -p "$OUT"
    # Two views of the corpus as symbolic links: labelled/PACKAGE/* and unlabeled/*.
    "$PY" - "$CORPUS/audio" "$OUT" "$MIN_FILES" "$PER_CLASS" <<'EOF'
import os
import shutil
import sys
from pathlib import Path

from src.data.folder import read_folder

audio, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
min_files, per_class = int(sys.argv[3]), int(sys.argv[4])
files = {p.name: sorted(f.name for f in p.iterdir()) for p in sorted(audio.iterdir())
         if p.is_dir()}
classes = {name: fs for name, fs in files.items() if len(fs) >= min_files}
if len(classes) < 2:
    sys.exit(f"only {len(classes)} package(s) of {audio} have >= {min_files} files; "
             "lower MIN_FILES")
for view in ("labelled", "unlabeled"):
    shutil.rmtree(out / view, ignore_errors=True)
for name, fs in classes.items():
    n = min(per_class, len(fs))
    (out / "labelled" / name).mkdir(parents=True)
    for f in (fs[i * len(fs) // n] for i in range(n)):
        os.symlink(audio / name / f, out / "labelled" / name / f)
index = read_folder(out / "labelled", labels_from_subdirs=True, num_folds=5)
held = {r.key for r in index.records if r.fold in (4, 5)}
kept = 0
for name, fs in files.items():
    (out / "unlabeled" / name).mkdir(parents=True)
    for f in fs:
        if f"{name}/{f}" not in held:
            os.symlink(audio / name / f, out / "unlabeled" / name / f)
            kept += 1
print(f"labelled: {len(index.records)} files of {len(classes)} packages "
      f"({', '.join(classes)}); unlabeled (pretraining): {kept} files")
EOF
    DATA=(data=folder "data.clip_seconds=$CLIP_SECONDS")
    PRETRAIN_DATA=("${DATA[@]}" "data.root=$OUT/unlabeled")
    FINETUNE+=("data.root=$OUT/labelled" data.labels_from_subdirs=true data.num_folds=5)
    ;;
  *)
    echo "SET=$SET: use SET=generated or SET=debian" >&2
    exit 2
    ;;
esac
BACKBONE=$OUT/backbone.keras
start=$(date +%s)

echo "== pretraining (labels ignored): $BACKBONE"
"$PY" -m src.pretrain experiment=ssast "${PRETRAIN_DATA[@]}" \
  pretrain.mask.fraction=0.9 "trainer.epochs=$PRETRAIN_EPOCHS" trainer.verbose=2 \
  "name=ssast_low_label_$SET" "pretrain.export=$BACKBONE" "hydra.run.dir=$OUT/pretrain" \
  "${PRETRAIN_EXTRA[@]}" "$@"

finetune() {  # variant k seed lr overrides...
  local variant=$1 k=$2 seed=$3 lr=$4
  shift 4
  local dir=$OUT/$variant/lr$lr/k$k-seed$seed
  # A finished run is not trained again: src.train skips it after checking that its
  # inputs (data, splits, the pretrained backbone) are the ones it was trained on, and
  # stops naming the change otherwise (a new backbone: add trainer.resume=false).
  echo "== $variant, k=$k, seed $seed, learning rate $lr"
  "$PY" -m src.train "${DATA[@]}" "${FINETUNE[@]}" "data.train_per_class=$k" \
    "seed=$seed" "data.split_seed=$seed" "trainer.optimizer.lr=$lr" \
    "name=ssast_low_label_${SET}_$variant" "hydra.run.dir=$dir" "$@" | tail -n 1
}

for k in $KS; do
  for seed in $SEEDS; do
    finetune pretrained "$k" "$seed" "$LR_PRETRAINED" experiment=ssast_quickstart \
      "model.pretrained=$BACKBONE" "${@}"
    finetune scratch "$k" "$seed" "$LR_SCRATCH" experiment=ssast_quickstart \
      model.pretrained=null model.freeze=0 "${@}"
    finetune linear "$k" "$seed" "$LR_LINEAR" experiment=ssast_quickstart \
      model=linear_baseline "${@}"
  done
done

"$PY" - "$OUT" "$KS" "$SEEDS" "$(($(date +%s) - start))" \
  "$LR_PRETRAINED $LR_SCRATCH $LR_LINEAR" <<'EOF' | tee "$OUT/table.md"
import json
import statistics
import sys
from pathlib import Path

out, ks, seeds, wall = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
variants = ("pretrained", "scratch", "linear")
lrs = dict(zip(variants, sys.argv[5].split()))


def accuracy(variant, k, seed):
    path = out / variant / f"lr{lrs[variant]}" / f"k{k}-seed{seed}" / "results.json"
    return json.loads(path.read_text())["test_accuracy"] * 100 if path.exists() else None


def cell(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}"


pre = json.loads((out / "pretrain" / "results.json").read_text())
print(f"Test accuracy (%) on fold 5 with k labelled clips per class from fold 4 (last "
      f"epoch, seeds {', '.join(seeds)}); pretraining: {pre['num_train']} unlabeled clips, "
      f"{pre['epochs']} epochs, {pre['mask_count']} of "
      f"{pre['num_patches']} patches masked"
      + (f" ({pre['train_mask_count']} of the {pre['train_grid'][0]} x "
         f"{pre['train_grid'][1]} a training step keeps, patchout)"
         if pre.get("train_grid", pre["grid"]) != pre["grid"] else "")
      + "; fine-tuning peak learning rates: "
      + ", ".join(f"{v} {lrs[v]}" for v in variants) + ".\n")
print("| k | " + " | ".join(variants) + " | pretrained - scratch |")
print("|---|" + "---|" * (len(variants) + 1))
for k in ks:
    acc = {v: [accuracy(v, k, s) for s in seeds] for v in variants}
    gain = [p - s for p, s in zip(acc["pretrained"], acc["scratch"])
            if p is not None and s is not None]
    print(f"| {k} | " + " | ".join(cell(acc[v]) for v in variants) + f" | {cell(gain)} |")
print(f"\nwall time {int(wall) / 60:.0f} min (this invocation)")
EOF
