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


# --------------------------------------------------------------------------------------
# Multi-label tagging metrics (AudioSet / FSD50K style, as AST's ``utilities/stats.py``)
# --------------------------------------------------------------------------------------

# Number of array elements processed per block; bounds the temporary memory.
_BLOCK_ELEMENTS = 1 << 20


def _check_multilabel(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to a boolean (N, K) label matrix and float64 (N, K) scores."""
    y = np.asarray(y_true)
    s = np.asarray(scores)
    if y.ndim != 2 or s.ndim != 2:
        raise ValueError(
            f"y_true and scores must be 2-D (clips, classes); got shapes {y.shape} and {s.shape}"
        )
    if y.shape != s.shape:
        raise ValueError(f"shape mismatch: y_true {y.shape} vs scores {s.shape}")
    if y.dtype != bool:
        if not (np.issubdtype(y.dtype, np.number) and ((y == 0) | (y == 1)).all()):
            raise ValueError("y_true must contain only 0/1 (or boolean) labels")
        y = y == 1
    try:
        s = s.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"scores must be real numbers: {err}") from None
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y, s


def _rank_stats(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tie-aware ranking sums for each row of ``(labels, scores)``, both (M, n).

    Each row is sorted once (ascending). For a positive item whose tie group (all items
    of the row with exactly its score) spans sorted positions ``a..b`` (0-based):

    * precision at its threshold = positives with score >= its score / items with
      score >= its score = ``(P - positives before a) / (n - a)``: the whole tie group
      enters together, as in sklearn's precision-recall curve;
    * ascending average rank (1-based) = ``(a + b) / 2 + 1``, as ``scipy.stats.rankdata``.

    Only the positives are visited after the sort (binary searches over the flattened
    positions of tie-group boundaries). Returns ``(precision_sum, rank_sum)`` over the
    positives of each row.
    """
    m, n = scores.shape
    if n == 0 or m == 0:
        return np.zeros(m), np.zeros(m)
    order = np.argsort(scores, axis=1)
    s = np.take_along_axis(scores, order, axis=1)
    hit = np.flatnonzero(np.take_along_axis(labels, order, axis=1))  # sorted positives
    new = np.ones((m, n), dtype=bool)
    np.not_equal(s[:, 1:], s[:, :-1], out=new[:, 1:])  # True where a tie group starts
    starts = np.flatnonzero(new)  # each row starts a group, so groups never span rows
    group = np.searchsorted(starts, hit, side="right") - 1
    a = starts[group]  # flat position of each positive's group start
    b = np.append(starts[1:], m * n)[group] - 1  # ... and group end
    row = hit // n
    row_first = row * n
    pos = np.bincount(row, minlength=m)
    # positives of the same row strictly before the group start
    before = np.searchsorted(hit, a) - np.searchsorted(hit, row_first)
    precision = (pos[row] - before) / (n - (a - row_first))
    rank = (a + b - 2 * row_first) / 2.0 + 1.0
    return (
        np.bincount(row, weights=precision, minlength=m),
        np.bincount(row, weights=rank, minlength=m),
    )


def _ap_auc(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (column) AP and ROC AUC of validated inputs, sorting each column once."""
    n, k = y.shape
    yt, st = np.ascontiguousarray(y.T), np.ascontiguousarray(s.T)  # (K, N): rows are classes
    precision_sum = np.empty(k)
    rank_sum = np.empty(k)
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for i in range(0, k, step):
        precision_sum[i : i + step], rank_sum[i : i + step] = _rank_stats(
            yt[i : i + step], st[i : i + step]
        )
    pos = y.sum(axis=0).astype(np.float64)
    neg = n - pos
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = np.where(pos > 0, precision_sum / pos, np.nan)
        auc = (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)
    auc[(pos == 0) | (neg == 0)] = np.nan
    return ap, auc


def average_precision(y_true, scores) -> np.ndarray:
    """Average precision of each class (column), NaN for classes with no positive.

    ``AP = sum_t (R_t - R_{t-1}) P_t`` over the distinct score thresholds ``t`` in
    decreasing order (no interpolation), where all clips sharing a score enter together;
    this equals ``sklearn.metrics.average_precision_score(y_true[:, k], scores[:, k])``,
    the per-class AP that AST's ``stats.py`` reports.
    """
    return _ap_auc(*_check_multilabel(y_true, scores))[0]


def roc_auc(y_true, scores) -> np.ndarray:
    """Area under the ROC curve of each class (column).

    Computed as the Mann-Whitney statistic with average ranks (a positive-negative pair
    with equal scores counts 1/2): ``(sum of positive ranks - P(P+1)/2) / (P * N)``, which
    equals ``sklearn.metrics.roc_auc_score(y_true[:, k], scores[:, k])``. NaN for classes
    without positives or without negatives.
    """
    return _ap_auc(*_check_multilabel(y_true, scores))[1]


def d_prime(auc):
    """Sensitivity index ``d' = sqrt(2) * Phi^-1(auc)`` (AST: ``norm().ppf(auc) * sqrt(2)``).

    Returns a float for scalar input and an array otherwise; 0.5 maps to 0, 1 to +inf.
    """
    from scipy.special import ndtri

    out = np.sqrt(2.0) * ndtri(np.asarray(auc, dtype=np.float64))
    return float(out) if out.ndim == 0 else out


def lwlrap(y_true, scores) -> float:
    """Label-weighted label-ranking average precision (DCASE 2019 task 2, FSD50K).

    For every (clip, positive label) pair: the fraction of the clip's labels scored at or
    above that label that are positive (ties count as at or above); the mean over all
    pairs, so each positive label counts equally. Equals
    ``sklearn.metrics.label_ranking_average_precision_score(y_true, scores,
    sample_weight=y_true.sum(1))``; clips without labels do not count. NaN when there
    is no positive at all.
    """
    y, s = _check_multilabel(y_true, scores)
    keep = y.any(axis=1)
    y, s = y[keep], s[keep]
    total = int(y.sum())
    if total == 0:
        return float("nan")
    step = max(1, _BLOCK_ELEMENTS // y.shape[1])
    precision_sum = sum(
        _rank_stats(y[i : i + step], s[i : i + step])[0].sum() for i in range(0, len(y), step)
    )
    return float(precision_sum / total)


def _nanmean_or_nan(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def multilabel_report(y_true, scores, class_names: Sequence[str]) -> dict:
    """Multi-label tagging summary: mAP, mean AUC, d', lwlrap and per-class values.

    * ``mAP``: mean AP over the classes with at least one positive in ``y_true``
      (the others are listed in ``classes_without_positives``);
    * ``mean_auc``: mean AUC over classes with both positives and negatives;
      ``d_prime`` is ``d_prime(mean_auc)``, as AST reports it;
    * ``per_class_ap`` / ``per_class_auc``: ``{name: value or None}`` (None: undefined).

    ``scores`` may be logits or probabilities: every metric depends only on their order.
    """
    y, s = _check_multilabel(y_true, scores)
    names = list(class_names)
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} class names for {y.shape[1]} score columns")
    ap, auc = _ap_auc(y, s)
    mean_auc = _nanmean_or_nan(auc)
    missing = [name for name, v in zip(names, ap) if np.isnan(v)]

    def as_dict(values):
        return {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, values)}

    return {
        "mAP": _nanmean_or_nan(ap),
        "mean_auc": mean_auc,
        "d_prime": d_prime(mean_auc),
        "lwlrap": lwlrap(y, s),
        "per_class_ap": as_dict(ap),
        "per_class_auc": as_dict(auc),
        "num_classes_evaluated": int((~np.isnan(ap)).sum()),
        "classes_without_positives": {"count": len(missing), "names": missing},
        "num_clips": int(y.shape[0]),
    }


def evaluation_report(label_type: str, y_true, scores, class_names: Sequence[str]) -> dict:
    """``classification_report`` (``"single"``, integer labels) or ``multilabel_report``
    (``"multi"``, 0/1 label matrix), with ``primary_metric`` ("accuracy" / "mAP") and
    ``primary`` (its value) added."""
    if label_type == "single":
        report, key = classification_report(y_true, scores, class_names), "accuracy"
    elif label_type == "multi":
        report, key = multilabel_report(y_true, scores, class_names), "mAP"
    else:
        raise ValueError(f"label_type must be 'single' or 'multi', got {label_type!r}")
    return {**report, "primary_metric": key, "primary": report[key]}
