"""Clip-level evaluation of a backbone on a split of the feature store.

Each clip's windows (:func:`src.data.pipeline.eval_dataset`) are scored, turned into
probabilities (softmax for single-label models, sigmoid for multi-label ones) and
averaged per clip, weighted by coverage. The metrics are computed on these clip scores
(:func:`src.evaluation.metrics.evaluation_report`), with the loss of the averaged
probabilities.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from src.data.index import DatasetIndex

__all__ = ["ClipScores", "clip_loss", "evaluate", "probabilities", "score_clips"]


def probabilities(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    if multi_label:
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclasses.dataclass
class ClipScores:
    rows: np.ndarray  # record rows, in store order
    probs: np.ndarray  # (clips, classes), window-averaged probabilities
    windows: int  # windows scored in all

    def save(self, path: str | os.PathLike, index: DatasetIndex) -> Path:
        """``rows``, ``keys`` (ids or file paths), ``probs``, ``targets``, ``class_names``
        and ``label_type`` as a compressed .npz, written atomically (``python -m
        scripts.ensemble`` averages these over runs)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array([index.records[int(r)].key or index.records[int(r)].path
                         for r in self.rows])
        y = targets(index, self.rows)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez_compressed(
            tmp, rows=self.rows, keys=keys, probs=self.probs.astype(np.float32),
            targets=y.astype(np.uint8 if index.multi_label else np.int64),
            class_names=np.array(index.class_names), label_type=np.array(index.label_type),
        )
        os.replace(tmp, path)
        return path


def score_clips(backbone, dataset: tf.data.Dataset, multi_label: bool) -> ClipScores:
    """Run ``backbone`` over ``dataset`` (batches of ``(windows, rows, weights)``) and
    average the windows' probabilities per clip."""
    sums: dict[int, np.ndarray] = {}
    weights: dict[int, float] = {}
    order: list[int] = []
    count = 0
    for x, rows, w in dataset:
        logits = np.asarray(backbone.predict_on_batch(x), np.float64)
        probs = probabilities(logits, multi_label)
        for row, p, wt in zip(rows.numpy().tolist(), probs, w.numpy().tolist()):
            if row not in sums:
                sums[row] = np.zeros_like(p)
                weights[row] = 0.0
                order.append(row)
            sums[row] += wt * p
            weights[row] += wt
        count += len(probs)
    if not order:
        return ClipScores(np.zeros(0, np.int64), np.zeros((0, 0)), 0)
    rows = np.array(order, np.int64)
    probs = np.stack([sums[r] / max(weights[r], 1e-12) for r in order])
    return ClipScores(rows, probs, count)


def targets(index: DatasetIndex, rows: Sequence[int]) -> np.ndarray:
    """Single-label: class indices ``(n,)``; multi-label: multi-hot ``(n, K)``."""
    if not index.multi_label:
        return np.array([int(index.records[int(r)].label) for r in rows], np.int64)
    y = np.zeros((len(rows), index.num_classes), np.float32)
    for i, r in enumerate(rows):
        y[i, list(index.records[int(r)].label)] = 1.0
    return y


def clip_loss(y, probs: np.ndarray, multi_label: bool) -> float:
    """Cross-entropy of the clip-level probabilities (binary per class when multi-label)."""
    p = np.clip(probs, 1e-7, 1.0 - 1e-7)
    if multi_label:
        return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def evaluate(backbone, dataset, index: DatasetIndex) -> tuple[dict, ClipScores]:
    """The metrics of ``backbone`` on the clips of ``dataset`` and the clip scores."""
    from src.evaluation.metrics import evaluation_report

    scores = score_clips(backbone, dataset, index.multi_label)
    y = targets(index, scores.rows)
    report = evaluation_report(index.label_type, y, scores.probs, list(index.class_names))
    report["loss"] = clip_loss(y, scores.probs, index.multi_label)
    report["num_windows"] = int(scores.windows)
    return report, scores
