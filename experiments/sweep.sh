# Shared by the experiment scripts: run one Hydra multirun into a sweep directory
# named after the script and its arguments (the same command resumes the same
# sweep), then build its table and plot from the runs.
#
#   sweep NAME KEY VALUES [train overrides...]
#
# NAME: experiment name (runs/NAME/...); KEY=VALUES: the swept key, e.g.
# model.num_heads 1,2,4,8,16. Extra arguments are Hydra overrides and win over
# the script's own (so `experiment=quickstart trainer.epochs=1` makes a smoke run;
# `model.num_heads=1,2` sweeps those values, and the table expects those).
set -euo pipefail

PY=${PYTHON:-.venv/bin/python}

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
  local runs=${AUDIO_RUNS_DIR:-runs}
  local tag
  tag=$(printf '%s\n' "$key=$values" "$@" | sha1sum | cut -c1-10)
  local dir="$runs/$name/sweep-$tag"
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
