# Shared by the experiment scripts: run one Hydra multirun into a sweep directory
# named after the script and the setting its arguments give (the same command, or the same
# setting in another order, resumes the same sweep), then build its table and plot.
#
#   sweep NAME KEY VALUES [train overrides...]
#
# NAME: experiment name (runs/NAME/...); KEY=VALUES: the swept key, e.g.
# model.num_heads 1,2,4,8,16. Extra arguments are Hydra overrides and win over
# the script's own (so `experiment=quickstart trainer.epochs=1` makes a smoke run;
# `model.num_heads=1,2` sweeps those values, and the table expects those).
set -euo pipefail

PY=${PYTHON:-.venv/bin/python}

# sweep_dir SCRIPT LEGACY_TEXT OVERRIDES...: runs/SCRIPT/sweep-<tag>, the tag a digest of
# the overrides that change the runs (src.training.rundir.sweep_tag: sorted, without the
# run-invariant keys); a sweep begun under the earlier tag (a digest of LEGACY_TEXT, the
# arguments as typed) continues there.
sweep_dir() {
  local script=$1 legacy=$2
  shift 2
  local runs=${AUDIO_RUNS_DIR:-runs} tag old
  tag=$("$PY" -c 'import sys; from src.training.rundir import sweep_tag
print(sweep_tag(sys.argv[1:]))' "$@")
  old=$(printf '%s\n' "$legacy" | sha1sum | cut -c1-10)
  if [ -d "$runs/$script/sweep-$old" ] && [ ! -d "$runs/$script/sweep-$tag" ]; then
    tag=$old
  fi
  printf '%s\n' "$runs/$script/sweep-$tag"
}

sweep() {
  local name=$1 key=$2 values=$3
  shift 3
  local rest=() arg
  for arg in "$@"; do
    case "$arg" in
      "$key="*) values=${arg#"$key="} ;;
      *) rest+=("$arg") ;;
    esac
  done
  set -- ${rest[@]+"${rest[@]}"}
  local dir
  dir=$(sweep_dir "$name" "$(printf '%s\n' "$key=$values" "$@")" "$key=$values" "$@")
  "$PY" -m src.train -m name="$name" hydra.sweep.dir="$dir" "$key=$values" "$@"
  local reference=()
  if [ -n "${REFERENCE:-}" ]; then reference=(--reference "$REFERENCE"); fi
  local wandb=(--log-wandb "${WANDB_PROJECT:-audio-transformer}" --name "$name")
  case " $* " in *" logger=none "*) wandb=() ;; esac
  "$PY" -m scripts.make_tables "$dir" --by "$key" --expect "$key=$values" \
    --plot "$dir/$name.png" "${reference[@]}" "${wandb[@]}" | tee "$dir/table.md"
  # The same rows as table.md, missing ones included (its warnings were printed above).
  "$PY" -m scripts.make_tables "$dir" --by "$key" --expect "$key=$values" --format latex \
    "${reference[@]}" > "$dir/table.tex" 2>/dev/null
  echo "sweep: $dir (table.md, table.tex, $name.png)"
}
