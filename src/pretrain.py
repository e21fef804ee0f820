"""Self-supervised pretraining: ``python -m src.pretrain experiment=ssast data=folder
data.root=DIR`` (or any registered dataset, ``data=esc50 ...``: labels are never read).

compose config -> validate (model, masking; before any data work) -> dataset index ->
feature store (each file decoded once; bad files listed, or left out with
``data.skip_bad_files=true``) -> the clips of ``pretrain.folds`` at least one patch long
-> a validation split of ``data.val_fraction`` -> masked patch modelling
(:mod:`src.models.ssast`: cluster masking, InfoNCE + 10 x MSE) on random crops of
``data.clip_seconds`` -> ``<run dir>/backbone.keras`` (+ ``pretrain.export``) and
``results.json``.

The backbone is a waveform model (frontend + :class:`SpectrogramTransformer`) with the
weights of a fine-tuning model; fine-tune it with ``python -m src.train ...
model.pretrained=<path> model.pooling=mean`` (SSAST fine-tunes on mean-pooled patch
tokens; ``experiment=ssast_quickstart`` does this). Fine-tuning may use overlapping
strides or another clip length: the position grid is adapted.

The run directory is named after the overrides, as a training run's: the same command
continues a killed run from its last completed epoch (weights, optimizer, epoch), one
process at a time (a lock), and a finished run only prints where its backbone is.
W&B (``logger=wandb``) logs both losses and the masked-patch retrieval accuracy per
epoch, for the training and the validation split.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

from src import import_tensorflow  # noqa: E402

import_tensorflow()  # before the modules below import it

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from src.config import ConfigError, fit_verbosity, positive_key, validate_config  # noqa: E402
from src.data.index import DatasetError  # noqa: E402
from src.models.pretrained import PretrainedError  # noqa: E402

# Importing src.train registers the run-directory resolvers that conf/pretrain.yaml uses.
from src.train import (  # noqa: E402
    _clip_samples,
    _full_history,
    _make_logger,
    _pretrained_path,
    _quiet_tensorflow,
    _write_json,
    build_features,
)

log = logging.getLogger("src.pretrain")

BACKBONE = "backbone.keras"
# What a pretraining run leaves in its directory (moved aside by trainer.resume=false).
_STATE = ("backup", "metrics.csv", BACKBONE, "results.json", "wandb_run_id", "inputs.json")


# ----------------------------------------------------------------------------- config


def _mask_settings(cfg: DictConfig, num_patches: int) -> tuple[int, tuple[int, int]]:
    """``(masked patches per clip, (cluster_min, cluster_max))`` of ``pretrain.mask``."""
    from src.models.ssast import mask_count

    m = cfg.pretrain.mask
    try:
        count = mask_count(num_patches, m.get("count"), m.get("fraction"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        lo, hi = int(m.cluster_min), int(m.cluster_max)
    except (TypeError, ValueError):
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise ConfigError(
            f"pretrain.mask.cluster_min={m.get('cluster_min')!r} / cluster_max="
            f"{m.get('cluster_max')!r}: cluster sizes must be whole numbers with "
            "1 <= cluster_min <= cluster_max (SSAST: 3 and 5)."
        )
    return count, (lo, hi)


def validate_pretrain_config(cfg: DictConfig) -> dict:
    """Every check that needs no data: the shared ones (:func:`validate_config`), then
    what masked patch pretraining needs of the model and the masking. Returns
    ``{"grid", "num_patches", "mask_count", "cluster_sizes", "train_grid",
    "train_mask_count"}`` (the last two differ from the first two with structured
    patchout, which shrinks the grid of a training step)."""
    if cfg.model.get("type", "transformer") != "transformer":
        raise ConfigError(
            f"model.type={cfg.model.get('type')}: masked patch pretraining needs a "
            "transformer (model.type=transformer); the linear baseline has no patches."
        )
    validate_config(cfg, training=False)
    store_cfg = cfg.data.get("store") or {}
    if store_cfg.get("content", "features") != "features":
        raise ConfigError(
            f"data.store.content={store_cfg.get('content')}: masked patch pretraining reads "
            "log-mel patches from a feature store; set data.store.content=features (the "
            "default)."
        )
    from src.models.build import build_model
    from src.models.ssast import check_pretrainable

    model = build_model(
        cfg.model, cfg.frontend, num_classes=2, clip_samples=_clip_samples(cfg),
        target_frames=cfg.data.get("target_frames"),
    )
    try:
        check_pretrainable(model.backbone)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        weight = float(cfg.pretrain.mse_weight)
    except (TypeError, ValueError):
        weight = -1.0
    if weight < 0:
        raise ConfigError(
            f"pretrain.mse_weight={cfg.pretrain.get('mse_weight')!r} must be a number >= 0 "
            "(SSAST: 10)."
        )
    if cfg.pretrain.get("head_hidden") is not None:
        positive_key(cfg, "pretrain.head_hidden")  # a whole number, named in the error
    from src.models.ssast import training_grid, training_mask_count

    backbone = model.backbone
    count, sizes = _mask_settings(cfg, backbone.num_patches)
    train_grid = training_grid(backbone)
    # A cluster wider than the grid is clipped on every side: the first one covers most
    # of the grid, and every clip's mask is about the first cells in patch order.
    grid = tuple(backbone.grid)
    if sizes[1] > max(grid):
        raise ConfigError(
            f"pretrain.mask.cluster_max={sizes[1]} is wider than the patch grid ({grid[0]} "
            f"x {grid[1]}), so the masks would hardly vary between clips; use cluster sizes "
            f"of at most {max(grid)} (SSAST: 3..5, on a grid of 8 x 64)."
        )
    try:
        train_count = training_mask_count(count, int(backbone.num_patches),
                                          train_grid[0] * train_grid[1])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return {"grid": list(backbone.grid), "num_patches": int(backbone.num_patches),
            "mask_count": count, "cluster_sizes": list(sizes),
            "train_grid": list(train_grid), "train_mask_count": train_count}


def _folds(cfg: DictConfig, index) -> list[int]:
    value = cfg.pretrain.get("folds")
    available = index.folds()
    if value is None:
        return available
    folds = [int(value)] if isinstance(value, int | str) else [int(f) for f in value]
    missing = sorted(set(folds) - set(available))
    if not folds or missing:
        raise ConfigError(
            f"pretrain.folds={folds}: the dataset at {index.root} has folds {available}"
            + (f", not {missing}" if missing else "")
            + "; list some of them, or null for all."
        )
    return folds


# ----------------------------------------------------------------------------- data


class _Unlabeled:
    """The label table :func:`~src.data.pipeline.training_dataset` reads, for
    pretraining: no targets, whatever the dataset's labels."""

    def target(self, row):
        import tensorflow as tf

        return tf.zeros([0], tf.float32)


def _usable(store, index, rows: np.ndarray, min_frames: int, seconds: float):
    """The rows whose clips are at least one patch long (a variable-length store keeps
    every file at its own length); a clear error when none is."""
    if not store.variable_length:
        return rows, []  # every clip is cut or padded to data.clip_seconds
    frames = store.frames_of()
    length = np.array([frames.get(index.records[int(r)].path, 0) for r in rows])
    ok = length >= min_frames
    short = [index.records[int(r)].path for r in rows[~ok]]
    if not ok.any():
        raise DatasetError(
            f"all {len(rows)} clip(s) under {index.root} are shorter than one patch "
            f"({min_frames} frames, about {seconds:.2f} s of audio); masked patch pretraining "
            "needs clips of at least one patch: use longer audio (or a smaller "
            "model.patch_size)."
        )
    if short:
        log.warning(
            "%d clip(s) shorter than one patch (%d frames, about %.2f s) are left out: %s",
            len(short), min_frames, seconds, ", ".join(short[:10]),
        )
    return rows[ok], short


def _carve(rows: np.ndarray, fraction: float, seed: int,
           groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)``: a random ``fraction`` of ``rows`` (at least one clip when
    there are two or more) for validation, drawn with ``seed``. ``groups`` (each row's
    source recording, see ``DatasetIndex.groups``): whole sources join the validation
    split, in random order, until it holds its share; None or all distinct: clip by clip."""
    n = len(rows)
    n_val = int(round(float(fraction) * n))
    n_val = min(max(n_val, 1), n - 1) if n >= 2 else 0
    rng = np.random.default_rng([int(seed), 7])
    if groups is None or len(np.unique(groups)) == n:
        perm = rng.permutation(rows)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    from src.data.splits import take_whole_groups

    ids, inverse = np.unique(groups, return_inverse=True)
    chosen = take_whole_groups(rng.permutation(len(ids)), np.bincount(inverse), n_val)
    val = np.isin(inverse, chosen)
    return np.sort(rows[~val]), np.sort(rows[val])


def _eval_batches(store, index, rows, batch_size: int) -> int:
    """Batches of :func:`~src.data.pipeline.eval_dataset` over ``rows`` (its windows: half
    a window apart over a longer clip), so that Keras knows the validation length."""
    from src.data.windows import window_starts

    window = int(store.clip_frames)
    if store.variable_length:
        frames = store.frames_of()
        n = sum(len(window_starts(frames[index.records[int(r)].path], window,
                                  max(1, window // 2))) for r in rows)
    else:
        n = store.count(index.records[int(r)].path for r in rows)
    return -(-n // int(batch_size))


def _masked(ds, grid, count, sizes, fixed_seed=None, seed=None):
    """``{"features", "mask_index"}`` batches: fresh masks for every batch (training),
    from stateless seeds of ``seed`` that are new every epoch (``None``: TensorFlow's
    stateful op, under multi_worker, where the file list stays the only source), or the
    same masks every epoch, from ``fixed_seed`` and the batch's position (validation)."""
    import tensorflow as tf

    from src.data.pipeline import epoch_seeds
    from src.models.ssast import cluster_masks

    def element(x, seed):
        masks = cluster_masks(seed, tf.shape(x)[0], grid, count, sizes)
        return {"features": x, "mask_index": masks}

    if fixed_seed is None:
        if seed is not None:
            return tf.data.Dataset.zip((ds, epoch_seeds(int(seed)))).map(
                lambda batch, s: element(batch[0], s), num_parallel_calls=tf.data.AUTOTUNE)

        def fresh(x, *_):
            return element(x, tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int32))

        return ds.map(fresh, num_parallel_calls=tf.data.AUTOTUNE)

    def fixed(i, batch):
        return element(batch[0], tf.stack([tf.constant(int(fixed_seed), tf.int64), i]))

    return ds.enumerate().map(fixed, num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- run dir


def _prepare(run_dir: Path, resolved: dict, resume: bool, invariant) -> bool:
    """Check an existing run dir before continuing in it, or move its state aside
    (``trainer.resume=false``); True when the run there is complete."""
    from src.training.rundir import check_same_config

    state = [run_dir / n for n in _STATE if (run_dir / n).exists()]
    if not state:
        return False
    if not resume:
        dest = run_dir / "previous" / time.strftime("%Y-%m-%d_%H-%M-%S")
        dest.mkdir(parents=True)
        for p in state + [q for q in [run_dir / "config.yaml"] if q.exists()]:
            shutil.move(str(p), dest / p.name)
        log.warning("trainer.resume=false: moved the earlier pretraining in %s to %s",
                    run_dir, dest)
        return False
    check_same_config(run_dir, resolved, invariant, kind="pretraining run")
    return (run_dir / "results.json").exists() and (run_dir / BACKBONE).exists()


def _save_model(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def _export(cfg: DictConfig, path: Path) -> str | None:
    """Copy the backbone to ``pretrain.export`` (atomically); its absolute path."""
    export = cfg.pretrain.get("export")
    if not export:
        return None
    export = Path(str(export)).expanduser().absolute()
    export.parent.mkdir(parents=True, exist_ok=True)
    tmp = export.with_name(f".{export.stem}.tmp.keras")
    shutil.copyfile(path, tmp)
    os.replace(tmp, export)
    return str(export)


def _override(key: str, value: str) -> str:
    """``key=value`` as a shell word Hydra parses back to ``value`` (run directories are
    named after overrides, so their paths hold ``=`` and ``,``)."""
    import re
    import shlex

    if re.fullmatch(r"[A-Za-z0-9_./~+-]+", value):
        return f"{key}={value}"
    return shlex.quote(f"{key}='{value}'")


def _done_message(cfg: DictConfig, results: dict) -> str:
    path = results["backbone"]
    val = results.get("final", {}).get("val_retrieval_accuracy")
    quality = f", validation retrieval accuracy {val:.3f}" if val is not None else ""
    lines = [
        f"{cfg.name}: pretrained backbone ({results['epochs']} epoch(s){quality}; wall time "
        f"{results['wall_time_s']:.0f}s): {path}",
    ]
    if results.get("export"):
        lines.append(f"copied to: {results['export']}")
    # The model keys a fine-tuning run must share with this backbone, as overrides.
    from src.models.pretrained import MUST_MATCH

    shape = " ".join(_override(f"model.{k}", str(cfg.model[k])) for k in MUST_MATCH
                     if k in cfg.model)
    lines.append(
        f"fine-tune with: python -m src.train <data overrides> model={cfg.model.name} "
        f"{shape} {_override('model.pretrained', results.get('export') or path)} "
        "model.pooling=mean"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run


def run(cfg: DictConfig, run_dir: Path, checked: dict | None = None) -> dict:
    """Pretrain in ``run_dir`` (resuming what is there); returns the run's results."""
    from src.data.datasets import load_index
    from src.training import distribute
    from src.training.rundir import RunLock

    checked = checked or validate_pretrain_config(cfg)
    run_dir = distribute.setup(cfg, run_dir)
    start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    invariant = list(cfg.get("run_invariant_keys") or [])
    with RunLock(run_dir):
        resolved = OmegaConf.to_container(cfg, resolve=True)
        complete = _prepare(run_dir, resolved, bool(cfg.trainer.resume), invariant)
        if not complete:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

        index = load_index(cfg.data)
        folds = _folds(cfg, index)  # checked before the (long) feature pass
        if cfg.model.get("pretrained"):
            log.info("model.pretrained: %s", _pretrained_path(cfg))
        t0 = time.time()
        store, index, skipped = build_features(cfg, index)
        feature_time = time.time() - t0
        rows = np.array([i for i, r in enumerate(index.records) if r.fold in folds], np.int64)
        if len(rows) == 0:
            raise DatasetError(
                f"no readable audio left in folds {folds} of {index.root} "
                f"({len(skipped)} file(s) skipped as unreadable)."
            )
        patch = int(cfg.model.patch_size)
        hop_s = float(cfg.frontend.get("hop_length", 10)) / (
            1000.0 if cfg.frontend.get("unit", "ms") == "ms" else float(cfg.data.sample_rate)
        )
        rows, short = _usable(store, index, rows, patch, patch * hop_s)
        by_source = bool(cfg.data.get("split_by_source", True))
        train_rows, val_rows = _carve(rows, float(cfg.data.val_fraction),
                                      int(cfg.data.get("split_seed", 0) or 0),
                                      index.groups()[rows] if by_source else None)
        # A finished or begun pretraining goes on only with the clips and features (and
        # starting weights) it had: else the old backbone would be reported and exported
        # as if it came from these.
        from types import SimpleNamespace

        from src.training.fold_inputs import check_fold_inputs, fold_inputs

        splits = SimpleNamespace(train=train_rows, val=val_rows, test=[])
        inputs = fold_inputs(index, store, splits,
                             _pretrained_path(cfg) if cfg.model.get("pretrained") else None)
        check_fold_inputs(run_dir, inputs, None, finished=complete)
        if complete:
            results = json.loads((run_dir / "results.json").read_text())
            log.info("pretraining in %s is complete", run_dir)
            results["export"] = _export(cfg, run_dir / BACKBONE)
            return results
        from src.models import native

        native.prepare(cfg.model, cfg.trainer)  # a first build outside the epochs' time
        return _pretrain(cfg, run_dir, index, store, train_rows, val_rows, checked, resolved,
                         {"skipped_files": skipped, "short_files": short,
                          "feature_time_s": feature_time, "folds": folds, "start": start})


def _pretrain(cfg, run_dir, index, store, train_rows, val_rows, checked, resolved, extra):
    import keras
    import tensorflow as tf

    from src.data.pipeline import (
        epoch_stream,
        eval_dataset,
        feature_stats,
        fits_in_memory,
        replay_on_resume,
        training_dataset,
    )
    from src.models.build import build_model
    from src.models.ssast import MaskedPatchPretrainer
    from src.training.callbacks import (
        AtomicBackupAndRestore,
        CSVLog,
        EpochTime,
        InterruptCheck,
        LearningRateLogger,
        backup_epoch,
        backup_finished,
        backup_replayable,
        remove_backup,
        truncate_csv_log,
    )
    from src.training.distribute import enter_strategy, exit_strategy, jit_compile
    from src.training.optim import build_optimizer, build_schedule
    from src.training.provenance import provenance

    t, d = cfg.trainer, cfg.data
    grid, count, sizes = tuple(checked["grid"]), checked["mask_count"], checked["cluster_sizes"]
    log.info(
        "%s: pretraining on %d clips (folds %s; %d for validation), patch grid %d x %d, "
        "%d of %d patches masked per clip (clusters %d..%d)",
        d.name, len(train_rows), extra["folds"], len(val_rows), grid[0], grid[1], count,
        checked["num_patches"], sizes[0], sizes[1],
    )
    train_grid, train_count = tuple(checked["train_grid"]), checked["train_mask_count"]
    if train_grid != grid:
        log.info("patchout: training steps keep a %d x %d grid, %d of its %d patches masked "
                 "(validation: the whole grid)", train_grid[0], train_grid[1], train_count,
                 train_grid[0] * train_grid[1])
    target_frames = d.get("target_frames")
    if d.norm_mean is None or d.norm_std is None:
        mean, std = feature_stats(
            store, index, train_rows, target_frames=target_frames,
            max_clips=d.get("stats_max_clips"), seed=int(d.get("split_seed", 0) or 0),
        )
    else:
        mean, std = float(d.norm_mean), float(d.norm_std)

    keras.utils.set_random_seed(int(cfg.seed))
    enter_strategy(t)
    model = build_model(
        cfg.model, cfg.frontend, num_classes=2, clip_samples=_clip_samples(cfg),
        norm_mean=mean, norm_std=std, target_frames=target_frames,
        remove_mean=bool(d.remove_mean),
    )
    backbone = model.backbone
    if cfg.model.get("pretrained"):
        from src.models.pretrained import load_pretrained

        loaded = load_pretrained(backbone, _pretrained_path(cfg),
                                 str(cfg.model.get("pretrained_adapt", "auto")),
                                 frontend=model.frontend)
        log.info("started from %s", loaded.summary())
    pretrainer = MaskedPatchPretrainer(
        backbone, mse_weight=float(cfg.pretrain.mse_weight),
        head_hidden=cfg.pretrain.get("head_hidden"), name="pretrainer",
    )
    pretrainer.build()
    batch = int(t.batch_size)
    steps = math.ceil(len(train_rows) / batch)
    schedule = build_schedule(t.schedule, float(t.optimizer.lr), steps, int(t.epochs))
    pretrainer.compile(optimizer=build_optimizer(t.optimizer, schedule),
                       jit_compile=jit_compile(t))
    exit_strategy()

    seed = int(cfg.seed)
    shard_by_file = str(t.get("strategy", "default")) == "multi_worker"
    train_ds = training_dataset(
        store, index, train_rows, _Unlabeled(), batch_size=batch, seed=seed,
        target_frames=target_frames, shuffle_buffer_mb=float(d.get("shuffle_buffer_mb", 512)),
        memory_cache_mb=float(d.get("memory_cache_mb", 1024)),
        shard_by_file=shard_by_file,
    )
    train_ds = _masked(train_ds, train_grid, train_count, sizes,
                       seed=None if shard_by_file else seed + 5)
    val_ds = None
    if len(val_rows):
        eval_batch = int(t.eval_batch_size)
        val_ds = eval_dataset(store, index, val_rows, batch_size=eval_batch,
                              target_frames=target_frames)
        val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(
            _eval_batches(store, index, val_rows, eval_batch)))
        val_ds = _masked(val_ds, grid, count, sizes, fixed_seed=int(d.get("split_seed", 0) or 0))
    else:
        log.warning("one clip only: no validation split (metrics are the training ones)")

    csv_path = run_dir / "metrics.csv"
    resumed = backup_epoch(run_dir / "backup")
    truncate_csv_log(csv_path, resumed)
    finished = backup_finished(run_dir / "backup")
    if finished:
        log.info("pretraining had finished (%d epoch(s)); saving the backbone", resumed)
    elif resumed:
        log.info("resuming after %d completed epoch(s)", resumed)
    replay = not finished and replay_on_resume(
        t.get("exact_resume", "auto"), resumed_epochs=resumed,
        cached=fits_in_memory(store, index, train_rows, float(d.get("memory_cache_mb", 1024))),
        strategy=str(t.get("strategy", "default")),
        backup_format=backup_replayable(run_dir / "backup"),
    )
    steps_per_epoch = None  # multi_worker: one pass per epoch, as Keras iterates it
    if not shard_by_file:
        steps_per_epoch = int(train_ds.cardinality())
        train_ds = epoch_stream(train_ds, steps_per_epoch, resumed_epochs=resumed,
                                replay=replay)
    callbacks = [
        InterruptCheck(),  # a Ctrl-C that Python dropped stops the run too
        LearningRateLogger(),
        EpochTime(),
        CSVLog(csv_path),
        AtomicBackupAndRestore(str(run_dir / "backup")),
    ]
    logger = _make_logger(cfg, f"{cfg.name}-pretrain", "pretrain", resolved,
                          run_dir / "wandb_run_id")
    if logger is not None:  # after the CSV log, before the backup
        callbacks.insert(len(callbacks) - 1, logger.keras_callback())
    log.info("%d backbone parameters (+ %d in the mask token and heads)",
             backbone.count_params(), pretrainer.count_params() - backbone.count_params())

    fit_start = time.time()
    exit_code = 1
    try:
        history = pretrainer.fit(
            train_ds, validation_data=val_ds, callbacks=callbacks,
            epochs=resumed if finished else int(t.epochs),  # finished: nothing left to train
            steps_per_epoch=steps_per_epoch,
            verbose=fit_verbosity(t.get("verbose", "auto")), shuffle=False,
        )
        train_time = time.time() - fit_start
        hist = _full_history(csv_path, history.history)
        times = hist.get("epoch_time_s") or []
        if times and len(times) == len(hist.get("loss", [])):  # every attempt's epochs
            train_time = float(sum(times))
        path = run_dir / BACKBONE
        pretrainer.release_backbone()
        _save_model(model, path)
        export = _export(cfg, path)
        final = {k: v[-1] for k, v in hist.items() if v}
        trained = hist.get("nce_loss") or []
        if trained and all(math.isnan(v) for v in trained):
            log.warning(
                "no masked patch of the %d training clip(s) had content that varies "
                "(silent or constant audio) in any epoch: the training losses are NaN and "
                "the backbone has learned nothing from them. Leave the silent files out "
                "(python -m scripts.check_data lists them) or point data.root at "
                "recordings with sound.", len(train_rows))
        if len(val_rows) and math.isnan(final.get("val_nce_loss", 0.0)):
            log.warning(
                "the %d validation clip(s) have no masked patch whose content varies "
                "(silent or constant audio), so the validation metrics are NaN: draw "
                "another split (data.split_seed=N, data.val_fraction) or leave the silent "
                "files out (python -m scripts.check_data lists them).", len(val_rows))
        results = {
            "experiment": cfg.name,
            "dataset": d.name,
            "backbone": str(path.absolute()),
            "export": export,
            "folds": extra["folds"],
            "num_train": int(len(train_rows)),
            "num_val": int(len(val_rows)),
            "grid": list(grid),
            "num_patches": checked["num_patches"],
            "mask_count": count,
            "cluster_sizes": list(sizes),
            "train_grid": list(train_grid),
            "train_mask_count": train_count,
            "epochs": len(hist.get("loss", [])),
            "final": final,
            "history": hist,
            "norm_mean": mean,
            "norm_std": std,
            "parameters": int(backbone.count_params()),
            "skipped_files": extra["skipped_files"],
            "short_files": extra["short_files"],
            "feature_time_s": extra["feature_time_s"],
            "train_time_s": train_time,
            "wall_time_s": time.time() - extra["start"],
            "config": resolved,
            **provenance(),
        }
        _write_json(run_dir / "results.json", results)
        remove_backup(run_dir / "backup")
        if logger is not None:
            logger.log_summary({**{f"final/{k}": v for k, v in final.items()},
                                "backbone": results["backbone"],
                                "parameters": results["parameters"]})
        exit_code = 0
        return results
    except tf.errors.DataLossError as err:
        from src.data.pipeline import corrupt_shard_error

        raise corrupt_shard_error([s.path for s in store.shards], err) from None
    finally:
        if logger is not None:
            logger.finish(exit_code=exit_code)


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    _quiet_tensorflow()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from src.training.rundir import remember_interrupts

    remember_interrupts()
    try:
        checked = validate_pretrain_config(cfg)
        results = run(cfg, run_dir, checked)
    except KeyboardInterrupt:
        from src.training.rundir import stop_on_interrupt

        stop_on_interrupt(log, run_dir)
    except (ConfigError, DatasetError, PretrainedError) as err:
        from src.training.rundir import stop_on_error

        stop_on_error(log, err, run_dir, cfg.paths.runs_dir)
    msg = _done_message(cfg, results)
    from src.training.rundir import log_to_files

    log_to_files(log, logging.INFO, msg)  # and once on the terminal:
    print(msg, flush=True)
    val = results.get("final", {}).get("val_loss", results.get("final", {}).get("loss"))
    return float(val) if val is not None else float("nan")


if __name__ == "__main__":
    from src.config import exit_on_bad_overrides

    exit_on_bad_overrides(sys.argv[1:], "pretrain")
    main()
