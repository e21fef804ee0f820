"""Evaluate an ensemble of finished runs: the average of their test probabilities.

    python -m scripts.ensemble RUN_DIR [RUN_DIR ...] [--variant last|best_val|averaged|ensemble]
        [--json]

Every fold writes the clip-level test probabilities of each model it tests to
``fold_<k>/predictions/test_<variant>.npz``. For each fold present in every run, the
probabilities are averaged over the runs (the clips must be the same: same dataset and
split) and scored as in training (accuracy, or mAP / AUC / d' / lwlrap); the folds that
are not in every run are left out, with a warning. No model is run and the test split is
not read again. Folds are summarised as the runs are (mean and population std). Exit
status 2 when the runs cannot be combined.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

VARIANTS = ("last", "best_val", "averaged", "ensemble")


def _predictions(run_dir: Path, variant: str) -> dict[int, Path]:
    out = {}
    for f in sorted(run_dir.glob(f"fold_*/predictions/test_{variant}.npz")):
        out[int(f.parents[1].name.split("_", 1)[1])] = f
    return out


def ensemble(run_dirs: list[Path], variant: str = "last") -> dict:
    """Per-fold and summarised metrics of the runs' averaged test probabilities."""
    from src.evaluation.cv import mean_std
    from src.evaluation.metrics import evaluation_report

    for d in run_dirs:
        if not Path(d).is_dir():
            raise ValueError(f"{d}: not a run directory (no such directory)")
    found = [_predictions(Path(d), variant) for d in run_dirs]
    for d, f in zip(run_dirs, found):
        if not f:
            raise ValueError(f"{d}: no fold_*/predictions/test_{variant}.npz (a finished run "
                             "of this version writes them)")
    folds = sorted(set.intersection(*(set(f) for f in found)))
    if not folds:
        raise ValueError("the runs have no test fold in common: "
                         + "; ".join(f"{d}: folds {sorted(f)}" for d, f in zip(run_dirs, found)))
    per_fold = []
    for fold in folds:
        parts = [np.load(f[fold]) for f in found]
        ref = parts[0]
        for d, p in zip(run_dirs[1:], parts[1:]):
            if not np.array_equal(p["keys"], ref["keys"]) or not np.array_equal(
                p["targets"], ref["targets"]
            ):
                raise ValueError(f"{d} fold {fold}: other test clips or labels than "
                                 f"{run_dirs[0]}; only runs on the same split combine")
        probs = np.mean([p["probs"].astype(np.float64) for p in parts], axis=0)
        report = evaluation_report(str(ref["label_type"]), ref["targets"], probs,
                                   [str(c) for c in ref["class_names"]])
        per_fold.append({"fold": fold, "primary_metric": report["primary_metric"],
                         "value": report["primary"], "report": report})
    for d, f in zip(run_dirs, found):
        if set(f) - set(folds):
            print(f"warning: {d}: fold(s) {sorted(set(f) - set(folds))} left out (their "
                  f"test_{variant}.npz is not in every run)", file=sys.stderr)
    values = [p["value"] for p in per_fold]
    mean, std = mean_std(values)
    return {"runs": [str(d) for d in run_dirs], "variant": variant, "folds": folds,
            "metric": f"test_{per_fold[0]['primary_metric']}", "mean": mean, "std": std,
            "per_fold": values, "reports": per_fold}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.ensemble",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--variant", choices=VARIANTS, default="last",
                        help="which model of each fold (default: the last-epoch model)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        out = ensemble(args.runs, args.variant)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2, default=float))
    else:
        print(f"ensemble of {len(args.runs)} run(s), {args.variant} models, folds {out['folds']}: "
              f"{out['metric']} {out['mean']:.4f} +- {out['std']:.4f}")
        for fold, v in zip(out["folds"], out["per_fold"]):
            print(f"  fold {fold}: {v:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
