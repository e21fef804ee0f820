"""Keras callbacks used by the training loop."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import keras


class InterruptCheck(keras.callbacks.Callback):
    """Raises KeyboardInterrupt before the next step (or epoch) once Ctrl-C was pressed,
    also when Python dropped the first one (see
    :func:`src.training.rundir.remember_interrupts`). Batch-begin hooks keep Keras'
    asynchronous batch-end dispatch."""

    def _check(self, *_args, **_kwargs):
        from src.training.rundir import interrupt_requested

        if interrupt_requested():
            raise KeyboardInterrupt

    on_train_batch_begin = on_test_batch_begin = on_epoch_begin = _check


class LearningRateLogger(keras.callbacks.Callback):
    """Adds ``learning_rate``, the rate the epoch trained with, to the epoch logs.

    A schedule (such as the per-epoch `src.training.optim.EpochSchedule`) is
    evaluated at the epoch's first step (``optimizer.iterations`` when the epoch
    began); a constant learning rate is logged as it is. Put it first in the
    callback list so CSVLogger and W&B see the value.
    """

    def __init__(self):
        super().__init__()
        self._first_step = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._first_step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        opt = self.model.optimizer
        lr = getattr(opt, "_learning_rate", None)
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            lr = lr(self._first_step)
        else:
            lr = opt.learning_rate
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))


FINISHED = "finished"  # in a backup dir: fit returned; only the results remain to write


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` whose backup is replaced atomically, restores the model's
    random generators too, and is kept until the caller has written its results.

    Keras writes ``latest.weights.h5`` in place, so a run killed during that write
    leaves a truncated file and the next run fails to load it. Here each backup's
    weights go to a file of their own (``epoch_<n>.weights.h5``), complete before
    ``training_metadata.json``, which names it, is replaced (``os.replace``): the
    metadata always names a complete file of its own epoch, so a run killed at any
    moment resumes from its last complete epoch with that epoch's weights and
    optimizer state.

    The metadata also holds the state of every ``keras.random.SeedGenerator`` in the
    model (dropout, SpecAugment, patchout), which Keras' weight files leave out: a
    resumed run draws what an uninterrupted one would have drawn from the epoch on.

    Keras deletes the backup when ``fit`` returns; a run killed after that, while it
    evaluates and saves (minutes on AudioSet), would train again from epoch 1. Here
    ``fit``'s end writes a ``finished`` marker instead (:func:`backup_finished`: resume
    with no epoch left to train), and :func:`remove_backup` deletes the backup once the
    results are on disk.
    """

    def __init__(self, backup_dir, **kwargs):
        super().__init__(backup_dir, delete_checkpoint=False, **kwargs)

    def on_train_begin(self, logs=None):
        self._load_model()  # no fallback to Keras' previous-backup copies: there are none

    def on_epoch_begin(self, epoch, logs=None):
        marker = os.path.join(self.backup_dir, FINISHED)
        if os.path.exists(marker):  # an earlier fit's: this one trains on
            os.remove(marker)

    def on_train_end(self, logs=None):
        if os.path.exists(self._training_metadata_path):  # at least one epoch is backed up
            with open(os.path.join(self.backup_dir, FINISHED), "w") as fh:
                fh.write("fit returned; the results were not written yet\n")

    def _load_model(self):
        if not self.model.built:
            raise ValueError(f"the model must be built before fit to resume it ({self.model})")
        weights = backup_weights(self.backup_dir)
        if weights is None:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(str(weights))
        meta = json.loads(Path(self._training_metadata_path).read_text())
        set_seed_states(self.model, meta.get("seed_generators", {}))
        self.model._initial_epoch = int(meta["epoch"])

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch_{self._current_epoch}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        tmp_weights = path + ".tmp.weights.h5"
        self.model.save_weights(tmp_weights, overwrite=True)
        os.replace(tmp_weights, path)
        tmp_meta = self._training_metadata_path + ".tmp"
        with open(tmp_meta, "w") as fh:
            json.dump({"epoch": self._current_epoch, "batch": self._last_batch_seen,
                       "weights": name, "seed_generators": seed_states(self.model)}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_meta, self._training_metadata_path)
        for old in Path(self.backup_dir).glob("*.weights.h5"):  # earlier epochs' files
            if old.name != name:
                old.unlink(missing_ok=True)


def _seed_generators(model) -> dict:
    """The model's ``keras.random.SeedGenerator`` objects, each once, by a name that is
    the same for the same model built again: their position in the model's layer order
    and their layer's class (layer names carry Keras' global counters, and layers of a
    functional model may have no path)."""
    out, seen = {}, set()
    layers = model._flatten_layers(include_self=True) if hasattr(model, "_flatten_layers") else []
    for layer in layers:
        for gen in getattr(layer, "_seed_generators", []):
            if id(gen) not in seen:
                seen.add(id(gen))
                out[f"{len(out)}:{type(layer).__name__}"] = gen
    return out


def seed_states(model) -> dict:
    """``{name: [seed, counter]}`` of every random generator in ``model``."""
    return {name: [int(v) for v in keras.ops.convert_to_numpy(gen.state)]
            for name, gen in _seed_generators(model).items()}


def set_seed_states(model, states: dict) -> None:
    """Restore :func:`seed_states`; generators the saved states do not name keep theirs."""
    import numpy as np

    for name, gen in _seed_generators(model).items():
        if name in states:
            gen.state.assign(np.asarray(states[name], dtype=gen.state.dtype))


def backup_weights(backup_dir: str | os.PathLike) -> Path | None:
    """The weights file of the backup in ``backup_dir``: the one its metadata names
    (``latest.weights.h5`` for a backup from before files were named by epoch); None
    when there is no complete backup."""
    meta = Path(backup_dir) / "training_metadata.json"
    if not meta.exists():
        return None
    name = json.loads(meta.read_text()).get("weights", "latest.weights.h5")
    weights = Path(backup_dir) / name
    return weights if weights.exists() else None


def backup_replayable(backup_dir: str | os.PathLike) -> bool:
    """Whether the backup names its weights file (written by this version, whose runs
    read every epoch from one input stream that a resume can replay)."""
    meta = Path(backup_dir) / "training_metadata.json"
    return meta.exists() and "weights" in json.loads(meta.read_text())


def backup_epoch(backup_dir: str | os.PathLike) -> int:
    """Epochs completed according to a backup written by :class:`AtomicBackupAndRestore`
    (0 when there is none)."""
    if backup_weights(backup_dir) is None:
        return 0
    return int(json.loads((Path(backup_dir) / "training_metadata.json").read_text())["epoch"])


def backup_finished(backup_dir: str | os.PathLike) -> bool:
    """Whether the fit that wrote this backup returned (it stopped at its last epoch, or
    early): a resumed run then trains no further epoch."""
    return (Path(backup_dir) / FINISHED).exists() and backup_epoch(backup_dir) > 0


def remove_backup(backup_dir: str | os.PathLike) -> None:
    """Delete a backup once the results it led to are written."""
    import shutil

    shutil.rmtree(backup_dir, ignore_errors=True)


class CSVLog(keras.callbacks.CSVLogger):
    """Keras' CSVLogger appending to a run's ``metrics.csv`` in the file's own columns.

    Keras takes the columns from the first epoch of each ``fit`` and writes the header
    only into a new file: a resumed run whose epochs log another set of keys (a code
    update added one) would write its values under the wrong names. Here the first
    epoch of an appending ``fit`` adopts the file's header; keys the file lacks are
    added as new columns (the file rewritten once, earlier rows ``NA`` there), and
    columns it has that this ``fit`` does not log are written ``NA``."""

    def __init__(self, filename):
        super().__init__(str(filename), append=True)

    def on_epoch_end(self, epoch, logs=None):
        if self.keys is None and logs:
            self._adopt_header(dict(logs))
        super().on_epoch_end(epoch, logs)

    def _adopt_header(self, logs) -> None:
        path = Path(self.filename)
        if not (path.exists() and path.stat().st_size):
            return
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh, delimiter=self.sep) if r]
        if not rows or rows[0][:1] != ["epoch"]:
            return
        old = rows[0][1:]
        new = sorted(logs)
        if not any(k.startswith("val_") for k in new):  # as Keras' own columns
            new += [f"val_{k}" for k in new]
        keys = old + [k for k in new if k not in old]
        if keys != old:
            self.csv_file.close()
            width = len(keys) + 1
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w", newline="") as fh:
                csv.writer(fh, delimiter=self.sep).writerows(
                    [["epoch", *keys], *(r + ["NA"] * (width - len(r)) for r in rows[1:])])
            os.replace(tmp, path)
            self.csv_file = open(path, "a")  # noqa: SIM115 (closed by on_train_end)
        self.keys = keys


class EpochTime(keras.callbacks.Callback):
    """Adds ``epoch_time_s``, the epoch's wall time from its start to this callback's
    end of epoch (training, then what the callbacks before it did: validation), to the
    epoch logs. Logged with the epoch (CSV log, W&B), it gives the training time of a
    fold over every attempt, resumed or not."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and hasattr(self, "_start"):
            logs["epoch_time_s"] = time.perf_counter() - self._start


def csv_number(text) -> float | None:
    """A CSVLogger cell as a number; None for empty cells and Keras' ``NA`` (its
    CSVLogger writes ``val_*`` columns of ``NA`` when a fit has no validation data)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def csv_log_rows(csv_path: str | os.PathLike) -> list[dict[str, float | None]]:
    """The rows of a CSVLogger file as numbers, one per epoch in epoch order (a resumed
    run appends: the last row of an epoch wins); ``[]`` when there is no file."""
    path = Path(csv_path)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_epoch = {int(row["epoch"]): row for row in rows if row.get("epoch") not in (None, "")}
    return [{**{k: csv_number(v) for k, v in by_epoch[e].items() if k != "epoch"}, "epoch": e}
            for e in sorted(by_epoch)]


def truncate_csv_log(csv_path: str | os.PathLike, epochs: int) -> None:
    """Keep only the rows of the first ``epochs`` epochs in a CSVLogger file, so the
    log agrees with the backup a resumed run starts from (rows of epochs after the
    backup would be trained again)."""
    path = Path(csv_path)
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    keep = [r for r in body if r and int(r[0]) < epochs]
    if len(keep) == len(body):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *keep])
    os.replace(tmp, path)
