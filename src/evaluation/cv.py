"""The run-level summary, aggregated from every fold's own results file.

Each fold writes ``fold_<k>/results.json`` when it finishes. The run's summary is built
from all of them that are in the run directory, whichever command trained them: a run
of ``data.folds=[2]`` after a five-fold run summarises five folds, not one. Folds
trained by different commits, from a dirty tree, or with different library versions
are summarised with a warning that says so.

Summaries, each over the folds (mean and population std, ``ddof=0``):

* ``last_epoch``: the test metric of each fold's final model: the headline number.
* ``best_val``: the test metric of each fold's checkpoint chosen by validation.
* ``averaged`` / ``ensemble``: weight-averaged and ensembled checkpoints, when run.
* ``paper_protocol_best_mean_epoch``: AST's protocol, when the folds recorded their
  test metric per epoch (``trainer.paper_protocol=true``): the one epoch whose test
  metric, averaged over the folds, is highest. The test folds choose the epoch, so the
  number is optimistic; it is kept only to be quoted beside AST's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["aggregate", "fold_results", "mean_std", "summarise"]

PAPER_NOTE = (
    "AST's protocol: the epoch is chosen by the test folds' mean metric, so the number "
    "is optimistic; quote it only beside AST's own."
)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std())


def fold_results(run_dir: str | Path) -> list[dict]:
    """Every finished fold's results in ``run_dir`` (``fold_<k>/results.json``), by fold."""
    out = []
    for path in sorted(Path(run_dir).glob("fold_*/results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("skipping %s: cannot read it (%s)", path, err)
            continue
        if isinstance(data, dict) and "fold" in data:
            out.append(data)
    return sorted(out, key=lambda r: int(r["fold"]))


def _summary(values: list[float], folds: list[int], metric: str) -> dict:
    mean, std = mean_std(values)
    return {"metric": metric, "mean": mean, "std": std, "per_fold": values, "folds": folds}


def _provenance(results: list[dict]) -> dict:
    commits = sorted({str((r.get("git") or {}).get("commit")) for r in results})
    dirty = sorted(int(r["fold"]) for r in results if (r.get("git") or {}).get("dirty"))
    versions: dict[str, set] = {}
    for r in results:
        for name, v in (r.get("versions") or {}).items():
            versions.setdefault(name, set()).add(str(v))
    differing = {k: sorted(v) for k, v in versions.items() if len(v) > 1}
    warnings = []
    if len(commits) > 1:
        warnings.append(f"the folds were trained by {len(commits)} different commits: "
                        f"{', '.join(c[:10] for c in commits)}")
    if dirty:
        warnings.append(f"fold(s) {dirty} were trained from a tree with uncommitted changes")
    if differing:
        warnings.append("the folds used different versions of "
                        + ", ".join(f"{k} ({', '.join(v)})" for k, v in differing.items()))
    return {"commits": commits, "dirty_folds": dirty, "differing_versions": differing,
            "mixed": bool(warnings), "warnings": warnings}


def summarise(results: list[dict], primary: str) -> dict:
    """The cross-validated summary of fold results (see the module docstring)."""
    folds = [int(r["fold"]) for r in results]
    key = f"test_{primary}"
    out = {
        "folds": folds,
        "num_folds": len(folds),
        "primary_metric": primary,
        "last_epoch": _summary([float(r[key]) for r in results], folds, key),
    }
    for name, field in (("best_val", "test_best_val"), ("averaged", "test_averaged"),
                        ("ensemble", "test_ensemble")):
        vals = [r.get(field) for r in results]
        if vals and all(isinstance(v, dict) and primary in v for v in vals):
            out[name] = _summary([float(v[primary]) for v in vals], folds, f"{field}.{primary}")
    curves = [(r.get("paper_protocol") or {}).get(key) for r in results]
    if curves and all(curves) and len({len(c) for c in curves}) == 1:
        arr = np.asarray(curves, dtype=np.float64)  # (folds, epochs)
        epoch = int(arr.mean(axis=0).argmax())
        m, s = mean_std(arr[:, epoch])
        out["paper_protocol_best_mean_epoch"] = {
            "metric": key, "epoch": epoch + 1, "mean": m, "std": s,
            "per_fold": arr[:, epoch].tolist(), "note": PAPER_NOTE,
        }
    out["provenance"] = _provenance(results)
    return out


def aggregate(run_dir: str | Path, primary: str) -> tuple[dict, list[dict]]:
    """``(summary, fold results)`` over every finished fold in ``run_dir``."""
    results = fold_results(run_dir)
    if not results:
        raise ValueError(f"no finished fold (fold_*/results.json) in {run_dir}")
    summary = summarise(results, primary)
    for w in summary["provenance"]["warnings"]:
        log.warning("%s: %s", run_dir, w)
    return summary, results
