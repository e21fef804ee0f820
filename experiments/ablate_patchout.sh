#!/usr/bin/env bash
# Patchout (PaSST) ablation: structured patchout sizes (time columns x frequency rows
# dropped per training step) against test accuracy and training throughput (clips/s, the
# "train clips/s" column), on ESC-50 by default with PaSST's disentangled position
# embeddings. Inference always sees every patch.
#
#   experiments/ablate_patchout.sh [overrides...]
#   experiments/ablate_patchout.sh experiment=quickstart data.folds=[1,2,3,4,5]   # CPU
#
# The grid depends on the clip length and stride (ESC-50: 12 x 50; the quickstart: 7 x 23
# with stride 8); TIME / FREQ override the swept sizes, e.g. TIME=0,5,10 FREQ=0,2.
cd "$(dirname "$0")/.." && source experiments/sweep.sh
time_values=${TIME:-0,10,20}
freq_values=${FREQ:-0,3}
rest=()  # a swept key given as an override replaces the script's values
for arg in "$@"; do
  case "$arg" in
    model.patchout.time=*) time_values=${arg#model.patchout.time=} ;;
    model.patchout.freq=*) freq_values=${arg#model.patchout.freq=} ;;
    *) rest+=("$arg") ;;
  esac
done
set -- ${rest[@]+"${rest[@]}"}
case " $* " in *" experiment="*) base=() ;; *) base=(experiment=esc50) ;; esac
dir=$(sweep_dir ablate_patchout "$(printf '%s\n' "$time_values" "$freq_values" "$@")" \
  "model.patchout.time=$time_values" "model.patchout.freq=$freq_values" "$@")
"$PY" -m src.train -m name=ablate_patchout hydra.sweep.dir="$dir" \
  model.pos_embedding=disentangled "${base[@]}" \
  model.patchout.time="$time_values" model.patchout.freq="$freq_values" "$@"
keys=(--by model.patchout.time,model.patchout.freq --expect "model.patchout.time=$time_values"
      --expect "model.patchout.freq=$freq_values")
wandb=(--log-wandb "${WANDB_PROJECT:-audio-transformer}" --name ablate_patchout)
case " $* " in *" logger=none "*) wandb=() ;; esac
"$PY" -m scripts.make_tables "$dir" "${keys[@]}" --plot "$dir/ablate_patchout.png" \
  "${wandb[@]}" | tee "$dir/table.md"
"$PY" -m scripts.make_tables "$dir" "${keys[@]}" --format latex > "$dir/table.tex" 2>/dev/null
echo "ablate_patchout: $dir (table.md, table.tex, ablate_patchout.png)"
