"""Train and evaluate: ``python -m src.train [experiment=...] [key=value ...]``.

compose config -> validate -> dataset index -> feature store (each file decoded once;
bad files listed) -> for each test fold: train / validation / test splits -> fresh
model -> fit (validation every epoch: checkpoint choice, early stopping) -> test, once,
for the last-epoch model (and the validation-chosen, averaged or ensembled checkpoints)
-> fold_<k>/results.json -> run summary over every finished fold -> results.json (+ W&B).

``data.store.content=features`` (the default) fits the backbone on the stored features.
``data.store.content=waveform`` stores the decoded waveforms instead and fits the whole
waveform model (preprocessing, frontend, backbone: the frontend runs per batch in the
training step, on the accelerator), which waveform mixup (``augment.mixup_domain=
waveform``) needs. The trained weights are the backbone's either way (the frontend has
none), and so are the checkpoint, backup and averaging files.

Returns the mean validation metric over the folds (what a Hydra sweeper maximises: the
test split chooses nothing).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from src.config import ConfigError, fit_verbosity, validate_config  # noqa: E402
from src.data.index import DatasetError  # noqa: E402
from src.training.rundir import run_dirname  # noqa: E402

log = logging.getLogger("src.train")


def _task_overrides() -> list[str]:
    """The command's Hydra overrides; none when not run under Hydra (``run()`` called
    directly)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:
        return []


def _sweep_dirname(invariant=None) -> str:
    """Directory name of a multirun: the command line's overrides (same command, same dir)."""
    return run_dirname([a for a in sys.argv[1:] if not a.startswith("-")], invariant)


OmegaConf.register_new_resolver("run_dirname", run_dirname, replace=True)
OmegaConf.register_new_resolver("sweep_dirname", _sweep_dirname, replace=True)


def _write_json(path: Path, obj) -> None:
    """Atomic JSON write: a crash never leaves a half-written results file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def wandb_group(cfg, overrides=None) -> str:
    """``logger.group``, else the run's setting: ``name`` and the overrides that name its
    run directory, without the seed, so that the folds of one cross-validation (run by
    one command or several: ``data.folds`` is run-invariant) and the seeds of a setting
    share a group, however the setting was launched (``logger=wandb``, ``name=``,
    ``experiment=`` are left out too). ``overrides``: the command's (default: Hydra's)."""
    from src.training.rundir import run_dirname

    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    if overrides is None:
        overrides = _task_overrides()
    parts = [o for o in overrides if not str(o).startswith(("seed=", "+seed=", "++seed="))]
    setting = run_dirname(parts, list(cfg.get("run_invariant_keys") or []))
    return str(cfg.name) if setting == "default" else f"{cfg.name}-{setting}"


def _make_logger(cfg: DictConfig, name: str, job_type: str, resolved: dict, id_file: Path):
    """A W&B run (or None with logger=none); a rerun with the same ``id_file`` continues
    the same W&B run, with the epochs of the ``metrics.csv`` beside ``id_file`` that the
    W&B run lacks."""
    if cfg.logger.name != "wandb":
        return None
    from src.training.wandb_logger import WandbLogger, run_id_for

    dir_ = Path(cfg.logger.dir or ".")
    logger = WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.get("entity"),
        name=name,
        group=wandb_group(cfg),
        job_type=job_type,
        tags=list(cfg.logger.get("tags") or []),
        mode=cfg.logger.get("mode"),
        dir=str(dir_),
        config=resolved,
        notes=cfg.logger.get("notes"),
        run_id=run_id_for(id_file),
    )
    if logger.start():
        from src.training.callbacks import csv_log_rows

        # A resumed fit: the epochs before the interruption, as far as W&B lacks them.
        logged = logger.log_earlier_epochs(csv_log_rows(id_file.parent / "metrics.csv"))
        if logged:
            log.info("W&B: logged the %d epoch(s) before the resume again", logged)
    return logger


def _clip_samples(cfg: DictConfig) -> int:
    return int(round(float(cfg.data.clip_seconds) * int(cfg.data.sample_rate)))


def _pretrained_path(cfg: DictConfig) -> Path:
    """``model.pretrained`` as a file (a known name is imported on first use); a missing
    file or a failed import is a ConfigError (exit 2) with what to do instead."""
    from src.models.hf_import import WeightImportError
    from src.models.pretrained import PretrainedError, resolve_pretrained

    try:
        return resolve_pretrained(
            cfg.model.pretrained, cfg.paths.weights_dir, Path(cfg.paths.cache_dir) / "hub"
        )
    except PretrainedError as err:
        raise ConfigError(str(err)) from None
    except WeightImportError as err:
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained}: {err} Without internet access: "
            "import the checkpoint where there is (`python -m scripts.import_weights`) and "
            f"copy the .keras file into {cfg.paths.weights_dir}/, or train from scratch "
            "with model.pretrained=null."
        ) from None


def _check_pretrained_fits(cfg: DictConfig, index) -> None:
    """Load ``model.pretrained`` into the configured model once, before the feature pass:
    a file that does not fit fails now, naming the keys, not after the features."""
    from src.models.build import build_model
    from src.models.pretrained import PretrainedError, load_pretrained

    model = build_model(cfg.model, cfg.frontend, num_classes=index.num_classes,
                        clip_samples=_clip_samples(cfg), target_frames=cfg.data.get("target_frames"),
                        multi_label=index.multi_label)
    try:
        load_pretrained(model.backbone, _pretrained_path(cfg),
                        str(cfg.model.get("pretrained_adapt", "auto")), frontend=model.frontend)
    except PretrainedError as err:
        raise ConfigError(str(err)) from None


def _earlier_wall_time(results_file: Path) -> float | None:
    try:
        return float(json.loads(results_file.read_text())["wall_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _primary(index) -> str:
    return "mAP" if index.multi_label else "accuracy"


def _full_history(csv_path: Path, fallback: dict) -> dict:
    """Per-epoch metrics over the whole fold, including epochs before a resume."""
    from src.training.callbacks import csv_log_rows

    rows = csv_log_rows(csv_path)
    if rows:
        history = {}
        for k in (k for k in rows[-1] if k != "epoch"):
            values = [row.get(k) for row in rows]
            if any(v is not None for v in values) or k in fallback:
                history[k] = [v for v in values if v is not None]
        return history
    return {k: [float(v) for v in vals] for k, vals in fallback.items()}


def _epoch_range(value) -> list[int]:
    """``[a, b]`` (1-based, inclusive; checked by validate_config) as a list of epochs."""
    return [] if value is None else list(range(int(value[0]), int(value[1]) + 1))


def _subset_report(report: dict, primary: str) -> dict:
    """The scalar part of a metrics report (what a checkpoint variant's test adds)."""
    keep = {k: v for k, v in report.items() if isinstance(v, int | float) or v is None}
    keep.setdefault(primary, report.get(primary))
    return keep


def _waveform_training(model):
    """``model`` (an ``AudioTransformer``: waveform in) as ``fit`` trains it on waveform
    batches. Its variables are the backbone's (the frontend has none) and it reads and
    writes weight files as the backbone does (same layout, the optimizer's state
    included: the backbone and this model share one optimizer), so checkpoints, the
    resume backup and weight averaging are the same files as when the backbone is fit on
    stored features."""
    import keras

    class WaveformTraining(keras.Model):
        def __init__(self, audio_model, **kwargs):
            super().__init__(**kwargs)
            self.audio_model = audio_model
            self.built = True  # the waveform model is built

        def call(self, waveform, training=None):
            # (B, samples) -> preprocessing, frontend, target_frames -> backbone -> (B, K)
            return self.audio_model(waveform, training=training)

        def save_weights(self, filepath, *args, **kwargs):
            return self.audio_model.backbone.save_weights(filepath, *args, **kwargs)

        def load_weights(self, filepath, *args, **kwargs):
            return self.audio_model.backbone.load_weights(filepath, *args, **kwargs)

    return WaveformTraining(model, name="waveform_training", dtype="float32")


def train_fold(cfg: DictConfig, index, store, fold: int, run_dir: Path, resolved: dict):
    """Train a fresh model with ``fold`` as the test split; returns the fold's results."""
    import keras
    import tensorflow as tf

    from src.data.pipeline import (
        LabelTable,
        epoch_stream,
        eval_dataset,
        feature_stats,
        fits_in_memory,
        replay_on_resume,
        training_dataset,
    )
    from src.data.splits import make_splits
    from src.evaluation.evaluate import evaluate, score_clips, targets
    from src.models.build import build_model
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
    from src.training.fold_inputs import check_fold_inputs, fold_inputs
    from src.training.mixup import apply_mixup
    from src.training.optim import build_optimizer, build_schedule
    from src.training.provenance import git_info, package_versions
    from src.training.validation import (
        BestWeights,
        EpochWeights,
        LastWeights,
        PaperProtocolCurve,
        PatienceStop,
        ValidationMetrics,
        average_weights,
    )

    fold_dir = run_dir / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    done = fold_dir / "results.json"
    splits = make_splits(index, fold, cfg.data)
    # A finished fold is skipped and a begun one resumes only on the inputs it had.
    check_fold_inputs(fold_dir, fold_inputs(
        index, store, splits, _pretrained_path(cfg) if cfg.model.get("pretrained") else None,
    ), fold)
    if done.exists():
        log.info("fold %d already complete (%s), skipping", fold, done)
        return json.loads(done.read_text())

    t = cfg.trainer
    primary = _primary(index)
    log.info(
        "fold %d: %d train / %d validation (%s) / %d test clips",
        fold, len(splits.train), len(splits.val), splits.val_source, len(splits.test),
    )
    target_frames = cfg.data.get("target_frames")
    if cfg.data.norm_mean is None or cfg.data.norm_std is None:
        mean, std = feature_stats(  # the training split only: nothing of val or test
            store, index, splits.train, target_frames=target_frames,
            max_clips=cfg.data.get("stats_max_clips"), seed=int(cfg.data.get("split_seed", 0)),
        )
    else:
        mean, std = float(cfg.data.norm_mean), float(cfg.data.norm_std)

    keras.utils.set_random_seed(int(cfg.seed))
    enter_strategy(t)  # trainer.strategy/mixed_precision until exit_strategy()
    model = build_model(
        cfg.model,
        cfg.frontend,
        num_classes=index.num_classes,
        clip_samples=_clip_samples(cfg),
        augment_cfg=cfg.augment,
        norm_mean=mean,
        norm_std=std,
        class_names=index.class_names,
        target_frames=target_frames,
        multi_label=index.multi_label,
        remove_mean=bool(cfg.data.remove_mean),
    )
    backbone = model.backbone
    pretrained = None
    if cfg.model.get("pretrained"):
        from src.models.pretrained import load_pretrained

        loaded = load_pretrained(
            backbone, _pretrained_path(cfg), str(cfg.model.get("pretrained_adapt", "auto")),
            frontend=model.frontend,
        )
        pretrained = loaded.summary()
        log.info("fold %d: started from %s", fold, pretrained)
        for note in loaded.notes:
            log.info("fold %d: %s", fold, note)
        for warning in loaded.warnings:
            log.warning("fold %d: %s", fold, warning)
    elif int(cfg.model.get("freeze", 0) or 0) > 0:
        log.warning(
            "fold %d: model.freeze=%s keeps the lowest stage(s) fixed, but no weights are "
            "loaded (model.pretrained is null): they stay at their random start. Give "
            "model.pretrained=<backbone.keras>, or model.freeze=0 to train them.",
            fold, cfg.model.get("freeze"))
    if backbone.count_params() > 20_000_000 and not tf.config.list_logical_devices("GPU"):
        log.warning(
            "fold %d: %.0f M parameters on a CPU; expect hours per epoch. Train models this "
            "size on a GPU (README: Installation details, GPU).",
            fold, backbone.count_params() / 1e6,
        )
    batch = int(t.batch_size)
    balanced = bool(cfg.data.get("balanced_sampling", False))
    samples = int(cfg.data.get("samples_per_epoch") or len(splits.train))
    steps_per_epoch = math.ceil((samples if balanced else len(splits.train)) / batch)
    # Multi-worker: each worker streams its own shard files, repeated, for the planned
    # steps; every step then has a full batch on every worker (no uneven last batches).
    shard_by_file = str(t.get("strategy", "default")) == "multi_worker"
    stream = balanced or shard_by_file
    schedule = build_schedule(t.schedule, float(t.optimizer.lr), steps_per_epoch, int(t.epochs))
    smoothing = float(t.label_smoothing)
    if index.multi_label:
        # Targets y become y * (1 - e) + e / 2 per class (Keras' binary label smoothing).
        loss = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=smoothing)
        train_metrics = []
    else:
        # One-hot targets become (1 - e) * y + e / K.
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing)
        train_metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    backbone.compile(
        optimizer=build_optimizer(t.optimizer, schedule),
        loss=loss,
        metrics=train_metrics,
        jit_compile=jit_compile(t),
    )
    # The model that fit trains and evaluation scores: the backbone on stored features,
    # or the whole waveform model on stored waveforms (same weights, same optimizer).
    waveform = bool(getattr(store, "waveform", False))
    trained = backbone
    if waveform:
        trained = _waveform_training(model)
        trained.compile(
            optimizer=backbone.optimizer,
            loss=loss,
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")] if train_metrics else [],
            jit_compile=jit_compile(t),
        )
        log.info("fold %d: training on waveforms (the frontend runs in the training step)",
                 fold)
    exit_strategy()  # the model keeps its strategy; what follows runs as before

    labels = LabelTable(index)
    d = cfg.data
    train_ds = training_dataset(
        store, index, splits.train, labels, batch_size=batch, seed=int(cfg.seed),
        target_frames=target_frames, shuffle_buffer_mb=float(d.get("shuffle_buffer_mb", 512)),
        memory_cache_mb=float(d.get("memory_cache_mb", 1024)), balanced=balanced,
        samples_per_epoch=samples if balanced else None, repeat=stream,
        shard_by_file=shard_by_file,
    )
    train_ds = apply_mixup(
        train_ds,
        prob=float(cfg.augment.get("mixup", 0.0)),
        alpha=float(cfg.augment.get("mixup_alpha", 10.0)),
        domain=str(cfg.augment.get("mixup_domain", "power")),
        # new draws every epoch; under multi_worker the file list stays the only source
        seed=None if shard_by_file else int(cfg.seed) + 1,
    )
    eval_batch = int(t.eval_batch_size)

    def split_ds(rows):
        return eval_dataset(store, index, rows, batch_size=eval_batch,
                            target_frames=target_frames)

    val_ds, test_ds = split_ds(splits.val), split_ds(splits.test)

    ckpt_dir = fold_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    # The backup says where training resumes; log rows of later epochs (written just
    # before a kill) are dropped, as those epochs run again.
    resumed = backup_epoch(fold_dir / "backup")
    truncate_csv_log(fold_dir / "metrics.csv", resumed)
    earlier = _full_history(fold_dir / "metrics.csv", {})  # epochs before an interruption
    finished = backup_finished(fold_dir / "backup")
    if finished:
        log.info("fold %d: training had finished (%d epoch(s)); evaluating", fold, resumed)
    elif resumed:
        log.info("fold %d: resuming after %d completed epoch(s)", fold, resumed)
    # A resumed run replays the input of its trained epochs (trainer.exact_resume).
    replay = not finished and replay_on_resume(
        t.get("exact_resume", "auto"), resumed_epochs=resumed,
        cached=fits_in_memory(store, index, splits.train, float(d.get("memory_cache_mb", 1024))),
        strategy=str(t.get("strategy", "default")),
        backup_format=backup_replayable(fold_dir / "backup"),
    )
    if not shard_by_file:
        # Every epoch from one iterator: what an epoch draws depends on its pass only.
        if not stream:
            steps_per_epoch = int(train_ds.cardinality())  # one pass over the split
        train_ds = epoch_stream(train_ds, steps_per_epoch, resumed_epochs=resumed,
                                replay=replay)
    monitor = f"val_{primary}"
    validation = ValidationMetrics(lambda: evaluate(trained, val_ds, index)[0], index.label_type)
    callbacks = [
        InterruptCheck(),  # a Ctrl-C that Python dropped stops the run too
        LearningRateLogger(),  # first: the loggers below record its value
        validation,  # then val_*: everything after it may read them
        # Both atomic; the best one only of epochs the backup (written last) committed.
        BestWeights(ckpt_dir / "best.weights.h5", monitor, resumed,
                    float(np.nanmax(earlier[monitor])) if earlier.get(monitor) else None),
        LastWeights(ckpt_dir / "last.weights.h5"),
    ]
    epochs = int(t.epochs)
    avg_epochs = _epoch_range(t.get("average_epochs"))
    ens_epochs = _epoch_range(t.get("ensemble_epochs"))
    keep = EpochWeights(ckpt_dir / "epochs", sorted(set(avg_epochs) | set(ens_epochs)))
    if keep.epochs:
        callbacks.append(keep)
    stopper = None
    if t.get("early_stopping_patience"):
        stopper = PatienceStop(monitor, int(t.early_stopping_patience), earlier.get(monitor, []))
        callbacks.append(stopper)
    paper = None
    if t.get("paper_protocol", False):
        paper = PaperProtocolCurve(
            lambda: evaluate(trained, test_ds, index)[0], primary,
            fold_dir / "paper_protocol_test_curve.json", resumed_epochs=resumed,
        )
        callbacks.append(paper)
    callbacks += [
        EpochTime(),  # after validation and the checkpoints: the epoch's whole time
        CSVLog(fold_dir / "metrics.csv"),
        # Resume: restores weights, optimizer state and epoch after a crash. Last, so an
        # epoch in the backup is always in the log too.
        AtomicBackupAndRestore(str(fold_dir / "backup")),
    ]
    logger = _make_logger(cfg, f"{cfg.name}-fold{fold}", f"fold{fold}", resolved,
                          fold_dir / "wandb_run_id")
    if logger is not None:  # after the validation metrics and the CSV log, before the backup
        callbacks.insert(len(callbacks) - 1, logger.keras_callback())

    log.info("fold %d: %d parameters", fold, model.count_params())
    start = time.time()
    exit_code = 1
    try:
        history = trained.fit(
            train_ds,
            epochs=resumed if finished else epochs,  # finished: no epoch left to train
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            verbose=fit_verbosity(t.get("verbose", "auto")),
            shuffle=False,  # the tf.data pipeline shuffles
        )
        train_time = time.time() - start
        hist = _full_history(fold_dir / "metrics.csv", history.history)
        done_epochs = len(hist.get("loss", []))
        epoch_times = hist.get("epoch_time_s") or []
        timed_epochs = len(history.history.get("loss", []))  # this attempt's
        if done_epochs and len(epoch_times) == done_epochs:  # every attempt's epochs
            train_time, timed_epochs = float(sum(epoch_times)), done_epochs
        # Validation of the final model (the last epoch's report) and the test split, read
        # once per model variant, to report.
        eval_start = time.time()
        last_val = validation.last_report or evaluate(trained, val_ds, index)[0]
        report, scores = evaluate(trained, test_ds, index)
        eval_time = time.time() - eval_start
        pred_dir = fold_dir / "predictions"
        scores.save(pred_dir / "test_last.npz", index)
        if t.save_model:
            model.save(fold_dir / "model.keras")
        result = {
            "fold": fold,
            "label_type": index.label_type,
            "primary_metric": primary,
            **{f"test_{k}": v for k, v in report.items() if isinstance(v, int | float)},
            "test_report": report,
            **{f"val_{k}": v for k, v in last_val.items() if isinstance(v, int | float)},
            "splits": splits.summary(),
        }
        vals = hist.get(monitor) or []
        if vals and np.isnan(np.asarray(vals, np.float64)).all():
            log.warning("fold %d: %s is NaN in every epoch (diverged?): no best epoch",
                        fold, monitor)
        elif vals:
            best = int(np.nanargmax(vals))
            result["best_epoch"] = best + 1
            result[f"best_val_{primary}"] = float(vals[best])
        best_file = ckpt_dir / "best.weights.h5"
        if best_file.exists():
            backbone.load_weights(best_file)
            rep, sc = evaluate(trained, test_ds, index)
            sc.save(pred_dir / "test_best_val.npz", index)
            result["test_best_val"] = {"epoch": result.get("best_epoch"),
                                       **_subset_report(rep, primary)}
        kept = [e for e in avg_epochs if keep.path(e).exists()]
        if kept:
            average_weights(backbone, [keep.path(e) for e in kept])
            backbone.save_weights(ckpt_dir / "averaged.weights.h5")
            rep, sc = evaluate(trained, test_ds, index)
            sc.save(pred_dir / "test_averaged.npz", index)
            result["test_averaged"] = {"epochs": kept, **_subset_report(rep, primary)}
        members = [e for e in ens_epochs if keep.path(e).exists()]
        if members:
            probs = None
            for e in members:
                backbone.load_weights(keep.path(e))
                sc = score_clips(trained, test_ds, index.multi_label)
                probs = sc.probs if probs is None else probs + sc.probs
            sc.probs = probs / len(members)
            from src.evaluation.metrics import evaluation_report

            rep = evaluation_report(index.label_type, targets(index, sc.rows), sc.probs,
                                    list(index.class_names))
            sc.save(pred_dir / "test_ensemble.npz", index)
            result["test_ensemble"] = {"epochs": members, **_subset_report(rep, primary)}
        result.update({
            "epochs": done_epochs,
            "early_stopped_at": stopper.stopped_epoch if stopper else None,
            "history": hist,
            "num_train": int(len(splits.train)),
            "num_val": int(len(splits.val)),
            "num_test": int(len(splits.test)),
            "norm_mean": mean,
            "norm_std": std,
            "parameters": int(model.count_params()),
            "pretrained": pretrained,
            "train_time_s": train_time,
            # clips per second over the fold's epochs (compilation and validation
            # included), those of earlier attempts too
            "train_clips_per_s": (samples if balanced else len(splits.train))
            * timed_epochs / max(train_time, 1e-9) if timed_epochs else None,
            "eval_clips_per_s": len(splits.test) / max(eval_time, 1e-9),
            "git": git_info(),
            "versions": package_versions(),
        })
        if paper is not None:
            result["paper_protocol"] = {f"test_{primary}": paper.values}
        _write_json(done, result)
        remove_backup(fold_dir / "backup")
        maps = save_fold_attention_maps(
            cfg, model, best_file, test_ds, index, fold_dir / "attention", waveforms=waveform,
        )
        if logger is not None:
            for path in maps:
                logger.log_image(f"attention/{path.stem}", str(path))
            logger.log_summary(
                {f"test/{k}": v for k, v in report.items() if isinstance(v, int | float)}
                | {"parameters": result["parameters"], "train_time_s": train_time}
            )
            if index.multi_label:
                logger.log_table(
                    "test/per_class_ap", ["class", "AP", "AUC"],
                    [[n, report["per_class_ap"][n], report["per_class_auc"][n]]
                     for n in index.class_names],
                )
            else:
                logger.log_confusion_matrix(report["confusion_matrix"], list(index.class_names))
        exit_code = 0
        log.info("fold %d: test %s %.4f (last epoch)", fold, primary, result[f"test_{primary}"])
        return result
    except tf.errors.DataLossError as err:  # a shard failed its CRC while being read
        from src.data.pipeline import corrupt_shard_error

        raise corrupt_shard_error([s.path for s in store.shards], err) from None
    finally:
        if logger is not None:
            logger.finish(exit_code=exit_code)


def save_fold_attention_maps(cfg, model, best_weights, test_ds, index, out_dir,
                             waveforms=False):
    """Attention rollout PNGs of the fold's validation-chosen model for a few test clips
    (one per class, ``trainer.attention_maps`` of them). A plot never fails a run.
    ``waveforms``: ``test_ds`` holds waveform windows (their features are computed with
    the model's frontend)."""
    count = int(cfg.trainer.get("attention_maps", 0) or 0)
    backbone = model.backbone
    if count <= 0 or not hasattr(backbone, "patch_embed"):
        return []
    try:
        from src.evaluation.attention_maps import save_attention_maps

        if best_weights.exists():
            backbone.load_weights(best_weights)  # model.keras already holds the last epoch
        picked, labels, seen = [], [], set()
        for x, rows, _w in test_ds:
            if waveforms:
                x = model.features(x)
            for xi, row in zip(np.asarray(x), rows.numpy()):
                label = index.label_lists()[int(row)]
                first = label[0] if label else -1
                if first not in seen and int(row) not in {r for r, _ in picked}:
                    seen.add(first)
                    picked.append((int(row), xi))
                    labels.append(list(label) if index.multi_label else max(first, 0))
                if len(picked) == count:
                    break
            if len(picked) == count:
                break
        if not picked:
            return []
        hop = getattr(model.frontend, "hop_samples", None)
        rate = model.frontend.sample_rate / hop if hop else None
        return save_attention_maps(
            backbone, np.stack([x for _, x in picked]), labels,
            list(index.class_names), out_dir, frame_rate=rate, prefix="best",
            multi_label=index.multi_label,
        )
    except Exception as err:  # noqa: BLE001
        log.warning("attention maps were not written: %s", err)
        return []


def _data_overrides(cfg: DictConfig, index) -> str:
    """The command's overrides that choose the dataset and how it is read, for a
    ``scripts.check_data`` command that checks the same files."""
    import shlex

    overrides = _task_overrides()
    keep = ("data", "experiment", "frontend", "paths")
    chosen = [o for o in overrides if str(o).lstrip("+~").split("=")[0].split(".")[0] in keep]
    if not chosen:
        chosen = [f"data={cfg.data.name}", f"data.root={index.root}"]
    return " ".join(shlex.quote(str(o)) for o in chosen)


def _check_skipped_share(cfg: DictConfig, index, bad: set[str]) -> None:
    """Stop when ``data.skip_bad_files`` would leave out more than
    ``data.max_skipped_fraction`` of any data fold the run reads: that is a broken copy or
    a wrong decoder, not a few bad downloads, and a test split thinned that much is
    another test. (The key is run-invariant: raising it reruns nothing.)"""
    from src.data.splits import fold_list

    limit = float(cfg.data.get("max_skipped_fraction", 0.05))  # checked by validate_config
    train_folds = fold_list(cfg.data.get("train_folds"))
    used = None if train_folds is None else {  # None: every fold trains some test fold
        *train_folds, *(fold_list(cfg.data.get("val_folds")) or []),
        *(fold_list(cfg.data.get("folds")) or [])}
    totals, gone = {}, {}
    for r in index.records:
        if used is not None and r.fold not in used:
            continue
        totals[r.fold] = totals.get(r.fold, 0) + 1
        if r.path in bad:
            gone[r.fold] = gone.get(r.fold, 0) + 1
    over = [(f, gone[f], totals[f]) for f in sorted(gone) if gone[f] / totals[f] > limit]
    if over:
        which = "; ".join(f"data fold {f}: {n} of {t} ({100.0 * n / t:.1f}%)"
                          for f, n, t in over)
        raise DatasetError(
            f"data.skip_bad_files=true would leave out more unreadable clips than "
            f"data.max_skipped_fraction={limit:g} allows ({which}), e.g. "
            f"{', '.join(sorted(bad)[:3])}. Fix or re-download them (full report: python "
            f"-m scripts.check_data {_data_overrides(cfg, index)}), or raise "
            "data.max_skipped_fraction to train and test on what is left."
        )


def build_features(cfg: DictConfig, index):
    """The dataset's feature store (or, with ``data.store.content=waveform``, its
    waveform store), each file decoded once; bad files stop the run (with the list)
    unless ``data.skip_bad_files``. Returns ``(store, index without the bad files,
    skipped files)``."""
    import dataclasses

    from src.data.check import CheckReport
    from src.data.store import build_store
    from src.models.build import build_frontend

    frontend = build_frontend(cfg.frontend)
    st = cfg.data.get("store") or {}
    content = str(st.get("content", "features"))
    store = build_store(
        index, frontend, sample_rate=int(cfg.data.sample_rate), clip_samples=_clip_samples(cfg),
        cache_dir=Path(cfg.paths.cache_dir) / ("waveforms" if content == "waveform" else "features"),
        name=str(cfg.data.name), remove_mean=bool(cfg.data.remove_mean),
        variable_length=bool(cfg.data.get("variable_length", False)),
        shard_clips=int(st.get("shard_clips", 512)), verify=str(st.get("verify", "auto")),
        content=content,
    )
    report = CheckReport(problems=store.problems, num_files=len({r.path for r in index.records}))
    notes = report.notes()
    if notes:
        kinds = {}
        for p in notes:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        log.info("audio notes (handled): %s", ", ".join(f"{n} {k}" for k, n in kinds.items()))
    fatal = report.fatal()
    if not fatal:
        return store, index, []
    sources = {r.path: r.source for r in index.records if r.source}
    if not cfg.data.get("skip_bad_files", False):
        fatal = [
            dataclasses.replace(p, message=f"{p.message} ({sources[p.path]})")
            if p.path in sources else p
            for p in fatal
        ]
        fatal_report = CheckReport(problems=fatal, num_files=report.num_files,
                                   num_checked=report.num_files)
        raise DatasetError(
            f"{len(fatal)} of {report.num_files} audio file(s) under {index.root} cannot be "
            f"used:\n{fatal_report.summary()}\nFix or remove them, or run with "
            "data.skip_bad_files=true to leave them out (they are listed in results.json). "
            f"Full report: python -m scripts.check_data {_data_overrides(cfg, index)}"
        )
    bad = {p.path for p in fatal}
    kept = tuple(r for r in index.records if r.path not in bad)
    log.warning(
        "data.skip_bad_files=true: leaving out %d file(s): %s",
        len(bad), ", ".join(sorted(bad)[:20]),
    )
    skipped = [{"path": p.path, "kind": p.kind, "message": p.message,
                "source": sources.get(p.path)} for p in fatal]
    return store, dataclasses.replace(index, records=kept), skipped


def run(cfg: DictConfig, run_dir: Path) -> float:
    from src.data.datasets import load_index
    from src.data.splits import fold_list
    from src.evaluation.cv import aggregate
    from src.training import distribute
    from src.training.provenance import provenance
    from src.training.rundir import RunLock, prepare_run_dir

    run_dir = distribute.setup(cfg, run_dir)  # devices first; a non-chief worker's own dir
    start = time.time()
    if cfg.trainer.get("deterministic", False):
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # same seed, same numbers
    run_dir.mkdir(parents=True, exist_ok=True)
    invariant = list(cfg.get("run_invariant_keys") or [])
    with RunLock(run_dir):
        resolved = OmegaConf.to_container(cfg, resolve=True)
        prepare_run_dir(run_dir, resolved, resume=bool(cfg.trainer.resume), invariant=invariant)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

        index = load_index(cfg.data)
        folds = fold_list(cfg.data.folds)
        available = index.folds()
        missing = [f for f in folds if f not in available]
        if missing:
            raise ConfigError(
                f"data.folds={folds} includes {missing}, which the dataset at {index.root} "
                f"does not have (folds: {available}). Set data.folds to a subset of "
                f"{available}."
            )
        if index.num_classes < 2:
            raise ConfigError(
                f"the dataset at {index.root} has {index.num_classes} class(es); training "
                "a classifier needs at least two (unlabeled audio: python -m src.pretrain)."
            )
        log.info(
            "%s: %d clips, %d classes (%s-label), folds %s; test folds in turn: %s",
            cfg.data.name, len(index.records), index.num_classes, index.label_type,
            available, folds,
        )
        for key, value in index.info.items():
            log.info("%s: %s", key, value if not isinstance(value, dict) or len(value) < 12
                     else f"{len(value)} entries (in results.json)")
        if cfg.model.get("pretrained"):  # fetch / import before the (long) feature pass
            log.info("model.pretrained: %s", _pretrained_path(cfg))
            _check_pretrained_fits(cfg, index)

        t0 = time.time()
        full_index = index
        store, index, skipped = build_features(cfg, index)
        _check_skipped_share(cfg, full_index, {s["path"] for s in skipped})
        feature_time = time.time() - t0
        log.info("features ready in %.1fs (%s)", feature_time, store.directory)
        from src.models import native

        native.prepare(cfg.model, cfg.trainer)  # a first build outside the epochs' time

        earlier = run_dir / "results.json"
        # Every fold finished earlier: the run's wall time stays the one that trained them.
        nothing_to_do = earlier.exists() and all(
            (run_dir / f"fold_{f}" / "results.json").exists() for f in folds)
        for fold in folds:
            train_fold(cfg, index, store, fold, run_dir, resolved)

        primary = _primary(index)
        summary, fold_results = aggregate(run_dir, primary)
        key = f"test_{primary}"
        results = {
            "experiment": cfg.name,
            "dataset": cfg.data.name,
            "label_type": index.label_type,
            "primary_metric": primary,
            key: summary["last_epoch"]["mean"],
            f"{key}_std": summary["last_epoch"]["std"],
            f"val_{primary}": float(np.mean([r[f"val_{primary}"] for r in fold_results])),
            "cv": summary,
            "per_fold": [
                {k: v for k, v in r.items() if k not in ("history", "test_report")}
                for r in fold_results
            ],
            "history": {r["fold"]: r["history"] for r in fold_results},
            "class_names": list(index.class_names),
            "dataset_info": index.info,
            "skipped_files": skipped,
            "parameters": fold_results[0]["parameters"],
            "epochs": int(cfg.trainer.epochs),
            "feature_time_s": feature_time,
            "feature_store": str(store.directory),
            "train_time_s": sum(r["train_time_s"] for r in fold_results),
            "wall_time_s": (nothing_to_do and _earlier_wall_time(earlier)) or time.time() - start,
            "config": resolved,
            **provenance(),
        }
        _write_json(run_dir / "results.json", results)

        if len(fold_results) > 1 and cfg.logger.name == "wandb":
            logger = _make_logger(cfg, f"{cfg.name}-cv", "cv_summary", resolved,
                                  run_dir / "wandb_cv_run_id")
            if logger is not None:
                cv = {f"cv/{key}_mean": summary["last_epoch"]["mean"],
                      f"cv/{key}_std": summary["last_epoch"]["std"],
                      "cv/num_folds": summary["num_folds"]}
                if "paper_protocol_best_mean_epoch" in summary:
                    b = summary["paper_protocol_best_mean_epoch"]
                    cv.update({"cv/paper_protocol_epoch": b["epoch"],
                               f"cv/paper_protocol_{key}_mean": b["mean"],
                               f"cv/paper_protocol_{key}_std": b["std"]})
                logger.log_summary(cv)
                logger.finish()

    n = summary["num_folds"]
    msg = (
        f"{cfg.name}: test {primary} {results[key]:.4f} +- {results[f'{key}_std']:.4f} "
        f"(last epoch, {n} fold(s): {summary['folds']}); "
        + ("every fold was complete already; " if nothing_to_do else "")
        + f"wall time {results['wall_time_s']:.0f}s; results in {run_dir / 'results.json'}"
    )
    from src.training.rundir import log_to_files

    log_to_files(log, logging.INFO, msg)  # and once on the terminal:
    print(msg, flush=True)
    # What a hyper-parameter search maximises: validation, never test.
    return float(results[f"val_{primary}"])


def _quiet_tensorflow() -> None:
    """TensorFlow imported quietly (`src.import_tensorflow`); its Python-side warnings
    (retracing, tfio graph conversion) are noise here."""
    from src import import_tensorflow

    tf = import_tensorflow()

    tf.get_logger().setLevel(logging.ERROR)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    _quiet_tensorflow()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from src.training.rundir import remember_interrupts

    remember_interrupts()
    try:
        validate_config(cfg)
        return run(cfg, run_dir)
    except KeyboardInterrupt:
        from src.training.rundir import stop_on_interrupt

        stop_on_interrupt(log, run_dir)
    except (ConfigError, DatasetError) as err:
        from src.training.rundir import stop_on_error

        stop_on_error(log, err, run_dir, cfg.paths.runs_dir)


if __name__ == "__main__":
    from src.config import exit_on_bad_overrides

    exit_on_bad_overrides(sys.argv[1:], "train")
    main()
