"""Callbacks that evaluate during training: validation each epoch (what every choice
reads), early stopping on it, the checkpoints kept for weight averaging, and AST's
per-epoch test curve (its paper protocol, kept apart from everything that chooses).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "EpochWeights",
    "PaperProtocolCurve",
    "PatienceStop",
    "ValidationMetrics",
    "average_weights",
    "validation_keys",
]

# What each label type reports into the epoch logs after validation (val_<name>).
VALIDATION_KEYS = {
    "single": ("loss", "accuracy"),
    "multi": ("loss", "mAP", "mean_auc", "d_prime", "lwlrap"),
}


def validation_keys(label_type: str) -> tuple[str, ...]:
    return tuple(f"val_{k}" for k in VALIDATION_KEYS[label_type])


class ValidationMetrics(keras.callbacks.Callback):
    """Evaluates the validation split at the end of every epoch and puts ``val_*`` into
    the epoch logs, before the callbacks that read them (checkpoint, early stopping,
    CSV, W&B): put it first. ``evaluate()`` returns a metrics report
    (:func:`src.evaluation.evaluate.evaluate`)."""

    def __init__(self, evaluate: Callable[[], dict], label_type: str):
        super().__init__()
        self._evaluate = evaluate
        self.label_type = label_type
        self.last_report: dict | None = None

    def on_epoch_end(self, epoch, logs=None):
        report = self._evaluate()
        self.last_report = report
        if logs is not None:
            for name in VALIDATION_KEYS[self.label_type]:
                value = report.get(name)
                logs[f"val_{name}"] = float("nan") if value is None else float(value)


class PatienceStop(keras.callbacks.Callback):
    """Early stopping on a validation metric, resume-safe: the decision is taken from the
    whole history (``earlier`` values from before a resume, then this run's), not from
    state that a restart would lose. Stops when the best epoch lies ``patience`` epochs
    back."""

    def __init__(self, monitor: str, patience: int, earlier: Sequence[float] = (),
                 mode: str = "max"):
        super().__init__()
        self.monitor = monitor
        self.patience = int(patience)
        self.values = [float(v) for v in earlier]
        self.sign = 1.0 if mode == "max" else -1.0
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        self.values = self.values[:epoch] + [float(value)]
        arr = self.sign * np.nan_to_num(np.asarray(self.values), nan=-np.inf)
        best = int(np.argmax(arr))
        if len(self.values) - 1 - best >= self.patience:
            self.stopped_epoch = epoch + 1
            log.info("early stopping after epoch %d: %s was best at epoch %d",
                     epoch + 1, self.monitor, best + 1)
            self.model.stop_training = True


class EpochWeights(keras.callbacks.Callback):
    """Saves the weights of the epochs in ``epochs`` (1-based) as
    ``<dir>/epoch_<e>.weights.h5`` (atomically), for weight averaging and ensembles."""

    def __init__(self, directory: str | os.PathLike, epochs: Sequence[int]):
        super().__init__()
        self.directory = Path(directory)
        self.epochs = {int(e) for e in epochs}

    def path(self, epoch: int) -> Path:
        return self.directory / f"epoch_{int(epoch):03d}.weights.h5"

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 not in self.epochs:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(epoch + 1)
        tmp = final.with_name(f".{final.stem}.tmp.weights.h5")
        self.model.save_weights(tmp, overwrite=True)
        os.replace(tmp, final)


def average_weights(model, files: Sequence[str | os.PathLike]) -> None:
    """Set ``model``'s weights to the mean of the weight files (as AST averages the
    checkpoints of its last epochs). Non-float weights (counters) keep the last file's."""
    if not files:
        raise ValueError("no checkpoints to average")
    total = None
    for f in files:
        model.load_weights(f)
        values = [np.asarray(w, np.float64) for w in model.get_weights()]
        total = values if total is None else [t + v for t, v in zip(total, values)]
    last = model.get_weights()
    mean = [
        (t / len(files)).astype(w.dtype) if np.issubdtype(w.dtype, np.floating) else w
        for t, w in zip(total, last)
    ]
    model.set_weights(mean)


class PaperProtocolCurve(keras.callbacks.Callback):
    """AST's paper protocol needs the test metric after every epoch. It is written to its
    own file (``path``: a JSON list, one value per epoch), never into the epoch logs, so
    no checkpoint, early stopping or search can read it."""

    def __init__(self, evaluate: Callable[[], dict], metric: str, path: str | os.PathLike,
                 resumed_epochs: int = 0):
        super().__init__()
        self._evaluate = evaluate
        self.metric = metric
        self.path = Path(path)
        values = []
        if self.path.exists():
            try:
                values = [float(v) for v in json.loads(self.path.read_text())]
            except (OSError, ValueError):
                values = []
        self.values = values[: int(resumed_epochs)]

    def on_epoch_end(self, epoch, logs=None):
        report = self._evaluate()
        self.values = self.values[:epoch] + [float(report[self.metric])]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.values))
        os.replace(tmp, self.path)
