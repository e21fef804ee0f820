"""Callbacks that evaluate during training: validation each epoch (what every choice
reads), early stopping on it, the best and last checkpoints and those kept for weight
averaging (all written atomically), and AST's
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
    "BestWeights",
    "EpochWeights",
    "LastWeights",
    "PaperProtocolCurve",
    "PatienceStop",
    "ValidationMetrics",
    "average_weights",
    "save_weights_atomically",
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


def save_weights_atomically(model, path: str | os.PathLike) -> Path:
    """``model.save_weights(path)`` through a temporary file and a rename, so that a
    kill mid-write leaves the previous file (or none), never a truncated one."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name.removesuffix('.weights.h5')}.tmp.weights.h5")
    model.save_weights(tmp, overwrite=True)
    os.replace(tmp, final)
    return final


class LastWeights(keras.callbacks.Callback):
    """The weights of the latest epoch in ``path``, written atomically every epoch."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)

    def on_epoch_end(self, epoch, logs=None):
        save_weights_atomically(self.model, self.path)


class BestWeights(keras.callbacks.Callback):
    """The weights of the epoch with the highest ``monitor`` (a validation metric; ties
    keep the earlier epoch) in ``path``, consistent with a resumed run's history.

    A new best is written atomically to ``best.pending.weights.h5`` with its epoch in
    ``best.pending.json``, and becomes ``path`` once its epoch is committed to the
    backup, which the callbacks after this one write at the same epoch end: when the
    next epoch begins, or training ends. At construction a pending file of an epoch the
    backup holds (``epoch < resumed_epochs``) is promoted and one of a later epoch, which
    the resumed run trains again, is dropped. So ``path`` always holds the best of the
    epochs in the history, and ``best`` (``best_so_far`` given from that history) its value.
    """

    def __init__(self, path: str | os.PathLike, monitor: str, resumed_epochs: int = 0,
                 best_so_far: float | None = None):
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.pending = self.path.with_name("best.pending.weights.h5")
        self.pending_meta = self.path.with_name("best.pending.json")
        self.best = None if best_so_far is None or np.isnan(best_so_far) else float(best_so_far)
        committed = False
        if self.pending.exists() and self.pending_meta.exists():
            try:
                committed = int(json.loads(self.pending_meta.read_text())["epoch"]) < int(
                    resumed_epochs)
            except (ValueError, KeyError, TypeError):
                committed = False
        if committed:
            self._promote()
        else:
            self.pending.unlink(missing_ok=True)
            self.pending_meta.unlink(missing_ok=True)

    def _promote(self) -> None:
        if self.pending.exists():
            os.replace(self.pending, self.path)
        self.pending_meta.unlink(missing_ok=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._promote()

    def on_train_end(self, logs=None):
        self._promote()

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or np.isnan(float(value)):
            return
        if self.best is not None and not float(value) > self.best:
            return
        self.best = float(value)
        # The epoch first: pending weights never stand without the epoch they belong to.
        tmp = self.pending_meta.with_name(f".{self.pending_meta.name}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"epoch": int(epoch), self.monitor: self.best}))
        os.replace(tmp, self.pending_meta)
        save_weights_atomically(self.model, self.pending)


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
        save_weights_atomically(self.model, self.path(epoch + 1))


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
