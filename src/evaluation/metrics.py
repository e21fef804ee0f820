"""Classification metrics and cross-validation aggregation (pure NumPy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``m[i, j]`` = clips of true class i predicted as j."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return m


def classification_report(y_true, logits, class_names: Sequence[str]) -> dict:
    """Accuracy, per-class accuracy (recall) and the confusion matrix."""
    y_true = np.asarray(y_true, int)
    y_pred = np.asarray(logits).argmax(axis=-1)
    k = len(class_names)
    m = confusion_matrix(y_true, y_pred, k)
    support = m.sum(axis=1)
    per_class = {
        name: (float(m[i, i] / support[i]) if support[i] else None)
        for i, name in enumerate(class_names)
    }
    return {
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "num_clips": int(len(y_true)),
        "per_class_accuracy": per_class,
        "confusion_matrix": m.tolist(),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0, as numpy's default), NaN-free input."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std())


def aggregate_folds(fold_results: Sequence[dict]) -> dict:
    """Cross-validated summary of per-fold results.

    * ``last_epoch``: accuracy of each fold's final model, mean and std.
    * ``best_mean_epoch`` (AST's protocol): the epoch whose held-out accuracy,
      averaged over the folds, is highest; mean and std at that epoch. Only
      defined when every fold has the same number of epochs.
    """
    folds = [r["fold"] for r in fold_results]
    last = [r["accuracy"] for r in fold_results]
    mean, std = mean_std(last)
    out = {
        "folds": folds,
        "num_folds": len(folds),
        "last_epoch": {"mean": mean, "std": std, "per_fold": last},
    }
    curves = [r.get("history", {}).get("val_accuracy") for r in fold_results]
    if curves and all(c for c in curves) and len({len(c) for c in curves}) == 1:
        arr = np.asarray(curves, dtype=np.float64)  # (folds, epochs)
        epoch = int(arr.mean(axis=0).argmax())
        m, s = mean_std(arr[:, epoch])
        out["best_mean_epoch"] = {
            "epoch": epoch + 1,
            "mean": m,
            "std": s,
            "per_fold": arr[:, epoch].tolist(),
        }
    return out
