"""Train and evaluate: ``python -m src.train [experiment=...] [key=value ...]``.

compose config -> validate -> dataset index -> features (once, cached)
-> for each held-out fold: fresh model -> fit -> evaluate -> fold results.json
-> aggregate over folds -> run results.json (+ W&B).

Returns the cross-validated accuracy (mean over folds) for Hydra sweepers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from src.config import ConfigError, validate_config  # noqa: E402
from src.data.esc50 import DatasetError  # noqa: E402

log = logging.getLogger("src.train")

# Keys that may differ between the attempts of one run (they do not change what
# a fold computes): a resumed run checks that everything else is unchanged.
_RESUME_IGNORED = ("data.folds", "trainer.verbose", "trainer.resume", "logger", "paths", "tags")


def run_dirname(overrides) -> str:
    """A directory name for a set of overrides: readable, filesystem-safe, bounded."""
    if not isinstance(overrides, str):  # hydra:overrides.task is a list
        overrides = ",".join(str(o) for o in overrides)
    text = str(overrides or "") or "default"
    safe = re.sub(r"[^A-Za-z0-9=,._+\-\[\]]+", "_", text)
    if len(safe) > 100:
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        safe = f"{safe[:80]}-{digest}"
    return safe


def sweep_dirname() -> str:
    """Directory name of a multirun: the command line's overrides (same command, same dir)."""
    return run_dirname([a for a in sys.argv[1:] if not a.startswith("-")])


OmegaConf.register_new_resolver("run_dirname", run_dirname, replace=True)
OmegaConf.register_new_resolver("sweep_dirname", sweep_dirname, replace=True)


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


def _wandb_group(cfg: DictConfig) -> str:
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().job.override_dirname
    except ValueError:
        overrides = ""
    # Seeds of one setting share a group, so W&B can average over them.
    parts = [p for p in overrides.split(",") if p and not p.startswith("seed=")]
    return f"{cfg.name}-{','.join(parts)}" if parts else str(cfg.name)


def _make_logger(cfg: DictConfig, fold: int | None, job_type: str, resolved: dict):
    if cfg.logger.name != "wandb":
        return None
    from src.training.wandb_logger import WandbLogger

    dir_ = Path(cfg.logger.dir or ".")
    dir_.mkdir(parents=True, exist_ok=True)
    name = f"{cfg.name}-fold{fold}" if fold is not None else f"{cfg.name}-cv"
    logger = WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.get("entity"),
        name=name,
        group=_wandb_group(cfg),
        job_type=job_type,
        tags=list(cfg.logger.get("tags") or []),
        mode=cfg.logger.get("mode"),
        dir=str(dir_),
        config=resolved,
        notes=cfg.logger.get("notes"),
    )
    logger.start()
    return logger


def train_fold(cfg: DictConfig, index, features, labels, fold: int, run_dir: Path, resolved):
    """Train a fresh model with ``fold`` held out; returns the fold's results."""
    import keras

    from src.data.pipeline import eval_dataset, feature_stats, training_dataset
    from src.evaluation.metrics import classification_report
    from src.models.build import build_model
    from src.training.callbacks import (
        AtomicBackupAndRestore,
        LearningRateLogger,
        backup_epoch,
        truncate_csv_log,
    )
    from src.training.mixup import apply_mixup
    from src.training.optim import build_optimizer, build_schedule

    fold_dir = run_dir / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    done = fold_dir / "results.json"
    if done.exists():
        log.info("fold %d already complete (%s), skipping", fold, done)
        return json.loads(done.read_text())

    folds = np.array([r.fold for r in index.records])
    train_folds = cfg.data.get("train_folds")
    if train_folds:  # fixed splits (e.g. Speech Commands: train=1, validation=2, test=3)
        train_idx = np.flatnonzero(np.isin(folds, [int(f) for f in train_folds]))
    else:  # cross-validation: every other fold trains
        train_idx = np.flatnonzero(folds != fold)
    test_idx = np.flatnonzero(folds == fold)
    x_train, y_train = features[train_idx], labels[train_idx]
    x_test, y_test = features[test_idx], labels[test_idx]

    if cfg.data.norm_mean is None or cfg.data.norm_std is None:
        mean, std = feature_stats(x_train)  # training folds only: no test leakage
    else:
        mean, std = float(cfg.data.norm_mean), float(cfg.data.norm_std)

    keras.utils.set_random_seed(int(cfg.seed))
    from src.training.distribute import enter_strategy, exit_strategy, jit_compile

    enter_strategy(cfg.trainer)  # trainer.strategy/mixed_precision until exit_strategy()
    model = build_model(
        cfg.model,
        cfg.frontend,
        num_classes=len(index.class_names),
        clip_samples=_clip_samples(cfg),
        augment_cfg=cfg.augment,
        norm_mean=mean,
        norm_std=std,
        class_names=index.class_names,
        target_frames=cfg.data.get("target_frames"),
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
    import tensorflow as tf

    if backbone.count_params() > 20_000_000 and not tf.config.list_logical_devices("GPU"):
        log.warning(
            "fold %d: %.0f M parameters on a CPU; expect hours per epoch. Train models this "
            "size on a GPU (README: Installation details, GPU).",
            fold, backbone.count_params() / 1e6,
        )
    t = cfg.trainer
    steps_per_epoch = math.ceil(len(train_idx) / int(t.batch_size))
    schedule = build_schedule(t.schedule, float(t.optimizer.lr), steps_per_epoch, int(t.epochs))
    backbone.compile(
        optimizer=build_optimizer(t.optimizer, schedule),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=float(t.label_smoothing)
        ),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile(t),
    )
    exit_strategy()  # the model keeps its strategy; what follows runs as before
    num_classes = len(index.class_names)

    def one_hot(ds):
        return ds.map(lambda x, y: (x, keras.ops.one_hot(y, num_classes)))

    train_ds = one_hot(training_dataset(x_train, y_train, int(t.batch_size), int(cfg.seed)))
    train_ds = apply_mixup(
        train_ds,
        prob=float(cfg.augment.get("mixup", 0.0)),
        alpha=float(cfg.augment.get("mixup_alpha", 10.0)),
        domain=str(cfg.augment.get("mixup_domain", "power")),
        seed=int(cfg.seed),
    )
    test_ds = one_hot(eval_dataset(x_test, y_test, int(t.eval_batch_size)))

    ckpt_dir = fold_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    # The backup says where training resumes; log rows of later epochs (written just
    # before a kill) are dropped, as those epochs run again.
    resumed = backup_epoch(fold_dir / "backup")
    truncate_csv_log(fold_dir / "metrics.csv", resumed)
    earlier = _full_history(fold_dir / "metrics.csv", {})  # epochs before an interruption
    if resumed:
        log.info("fold %d: resuming after %d completed epoch(s)", fold, resumed)
    callbacks = [
        LearningRateLogger(),  # first: the loggers below record its value
        keras.callbacks.ModelCheckpoint(
            str(ckpt_dir / "best.weights.h5"),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=max(earlier["val_accuracy"]) if earlier.get("val_accuracy") else None,
        ),
        keras.callbacks.ModelCheckpoint(str(ckpt_dir / "last.weights.h5"), save_weights_only=True),
        keras.callbacks.CSVLogger(str(fold_dir / "metrics.csv"), append=True),
        # Resume: restores weights, optimizer state and epoch after a crash. Last, so an
        # epoch in the backup is always in the log too.
        AtomicBackupAndRestore(str(fold_dir / "backup")),
    ]
    logger = _make_logger(cfg, fold, f"fold{fold}", resolved)
    if logger is not None:
        callbacks.append(logger.keras_callback())

    log.info(
        "fold %d: %d train / %d test clips, %d parameters",
        fold, len(train_idx), len(test_idx), model.count_params(),
    )
    start = time.time()
    exit_code = 1
    try:
        history = backbone.fit(
            train_ds,
            validation_data=test_ds,
            epochs=int(t.epochs),
            callbacks=callbacks,
            verbose=int(t.verbose),
            shuffle=False,  # the tf.data pipeline shuffles
        )
        train_time = time.time() - start
        eval_start = time.time()
        logits = backbone.predict(x_test, batch_size=int(t.eval_batch_size), verbose=0)
        eval_time = time.time() - eval_start
        report = classification_report(y_test, logits, index.class_names)
        hist = _full_history(fold_dir / "metrics.csv", history.history)
        result = {
            "fold": fold,
            **report,
            "loss": float(
                keras.losses.CategoricalCrossentropy(from_logits=True)(
                    keras.ops.one_hot(y_test, num_classes), logits
                )
            ),
            "best_epoch": int(np.argmax(hist["val_accuracy"]) + 1) if hist.get("val_accuracy") else None,
            "best_val_accuracy": float(max(hist["val_accuracy"])) if hist.get("val_accuracy") else None,
            "epochs": len(hist.get("loss", [])),
            "history": hist,
            "num_train": int(len(train_idx)),
            "num_test": int(len(test_idx)),
            "norm_mean": mean,
            "norm_std": std,
            "parameters": int(model.count_params()),
            "pretrained": pretrained,
            "train_time_s": train_time,
            # clips per second over this attempt's epochs (compilation included)
            "train_clips_per_s": len(train_idx) * max(len(history.history.get("loss", [])), 1)
            / max(train_time, 1e-9),
            "eval_clips_per_s": len(test_idx) / max(eval_time, 1e-9),
        }
        if t.save_model:
            model.save(fold_dir / "model.keras")
        _write_json(done, result)
        maps = save_fold_attention_maps(
            cfg, model, ckpt_dir / "best.weights.h5", x_test, y_test, index.class_names,
            fold_dir / "attention",
        )
        if logger is not None:
            for path in maps:
                logger.log_image(f"attention/{path.stem}", str(path))
            logger.log_summary(
                {"test/accuracy": result["accuracy"], "test/loss": result["loss"],
                 "parameters": result["parameters"], "train_time_s": train_time}
            )
            logger.log_confusion_matrix(report["confusion_matrix"], list(index.class_names))
        exit_code = 0
        log.info("fold %d: accuracy %.4f", fold, result["accuracy"])
        return result
    finally:
        if logger is not None:
            logger.finish(exit_code=exit_code)


def save_fold_attention_maps(cfg, model, best_weights, x_test, y_test, class_names, out_dir):
    """Attention rollout PNGs of the fold's best model for a few held-out clips (one per
    class, ``trainer.attention_maps`` of them). A plot never fails a run."""
    count = int(cfg.trainer.get("attention_maps", 0) or 0)
    backbone = model.backbone
    if count <= 0 or not hasattr(backbone, "patch_embed") or len(y_test) == 0:
        return []
    try:
        from src.evaluation.attention_maps import save_attention_maps

        if best_weights.exists():
            backbone.load_weights(best_weights)  # model.keras already holds the last epoch
        picked, seen = [], set()
        for i, label in enumerate(y_test):
            if int(label) not in seen:
                seen.add(int(label))
                picked.append(i)
            if len(picked) == count:
                break
        hop = getattr(model.frontend, "hop_samples", None)
        rate = model.frontend.sample_rate / hop if hop else None
        return save_attention_maps(
            backbone, x_test[picked], y_test[picked], list(class_names), out_dir,
            frame_rate=rate, prefix="best",
        )
    except Exception as err:  # noqa: BLE001
        log.warning("attention maps were not written: %s", err)
        return []


def _full_history(csv_path: Path, fallback: dict) -> dict:
    """Per-epoch metrics over the whole fold, including epochs before a resume."""
    import csv

    if csv_path.exists():
        with open(csv_path) as fh:
            rows = list(csv.DictReader(fh))
        by_epoch = {}
        for row in rows:  # a resumed run appends; keep the last row of each epoch
            by_epoch[int(row["epoch"])] = row
        if by_epoch:
            keys = [k for k in rows[-1] if k != "epoch"]
            return {
                k: [float(by_epoch[e][k]) for e in sorted(by_epoch) if by_epoch[e].get(k)]
                for k in keys
            }
    return {k: [float(v) for v in vals] for k, vals in fallback.items()}


def check_data(cfg: DictConfig, index):
    """Check every clip once (cached) before any training; stop or skip bad ones."""
    from src.data.check import check_records, filter_records

    report = check_records(
        index.records,
        sample_rate=int(cfg.data.sample_rate),
        clip_samples=_clip_samples(cfg),
        cache_dir=Path(cfg.paths.cache_dir),
    )
    notes = report.notes()
    if notes:
        kinds = {}
        for p in notes:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        log.info("audio notes (handled): %s", ", ".join(f"{n} {k}" for k, n in kinds.items()))
    fatal = report.fatal()
    if not fatal:
        return index, []
    if not cfg.data.get("skip_bad_files", False):
        fatal_report = type(report)(problems=fatal, num_files=report.num_files)
        raise DatasetError(
            f"{len(fatal)} of {report.num_files} audio file(s) under {index.root} cannot be "
            f"decoded:\n{fatal_report.summary()}\nFix or remove them, or run with "
            "data.skip_bad_files=true to leave them out (they are listed in results.json). "
            f"Full report: python -m scripts.check_data data={cfg.data.name} "
            f"data.root={index.root}"
        )
    index, dropped = filter_records(index, report)
    log.warning(
        "data.skip_bad_files=true: leaving out %d file(s): %s",
        len(dropped), ", ".join(p.path for p in dropped[:20]),
    )
    return index, [{"path": p.path, "kind": p.kind, "message": p.message} for p in dropped]


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def prepare_run_dir(run_dir: Path, resolved: dict, resume: bool) -> None:
    """Check an existing run dir before reusing it (resume) or move it aside."""
    earlier = sorted(run_dir.glob("fold_*")) + [p for p in [run_dir / "results.json"] if p.exists()]
    if not earlier:
        return
    if not resume:
        dest = run_dir / "previous" / time.strftime("%Y-%m-%d_%H-%M-%S")
        dest.mkdir(parents=True)
        for p in earlier + [p for p in [run_dir / "config.yaml"] if p.exists()]:
            shutil.move(str(p), dest / p.name)
        log.warning("trainer.resume=false: moved the earlier results of %s to %s", run_dir, dest)
        return
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    old = _flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    new = _flatten(resolved)

    def relevant(key):
        return not any(key == k or key.startswith(k + ".") for k in _RESUME_IGNORED)

    # Keys the earlier run did not have are new options at their defaults: not a change.
    diff = sorted(k for k in old if relevant(k) and old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
        raise ConfigError(
            f"{run_dir} holds a run with a different config ({shown}). Run with "
            f"trainer.resume=false to start over there (the earlier results are moved to "
            f"{run_dir}/previous/), or change name=... to use another directory."
        )
    log.info("resuming the run in %s", run_dir)


def _pretrained_path(cfg: DictConfig) -> Path:
    """``model.pretrained`` as a file (a known name is imported on first use)."""
    from src.models.pretrained import resolve_pretrained

    return resolve_pretrained(
        cfg.model.pretrained, cfg.paths.weights_dir, Path(cfg.paths.cache_dir) / "hub"
    )


def _clip_samples(cfg: DictConfig) -> int:
    return int(round(float(cfg.data.clip_seconds) * int(cfg.data.sample_rate)))


def run(cfg: DictConfig, run_dir: Path) -> float:
    from src.data.datasets import load_index
    from src.data.pipeline import compute_features
    from src.evaluation.metrics import aggregate_folds
    from src.models.build import build_frontend
    from src.training import distribute
    from src.training.provenance import provenance

    run_dir = distribute.setup(cfg, run_dir)  # devices first; a non-chief worker's own dir
    start = time.time()
    if cfg.trainer.get("deterministic", False):
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # same seed, same numbers
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    prepare_run_dir(run_dir, resolved, resume=bool(cfg.trainer.resume))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    index = load_index(cfg.data)
    folds = [int(f) for f in cfg.data.folds]
    available = index.folds()
    missing = [f for f in folds if f not in available]
    if missing:
        raise ConfigError(
            f"data.folds={folds} includes {missing}, which the dataset at {index.root} does not "
            f"have (folds: {available}). Set data.folds to a subset of {available}."
        )
    log.info(
        "%s: %d clips, %d classes, folds %s; held out in turn: %s",
        cfg.data.name, len(index.records), len(index.class_names), available, folds,
    )

    index, skipped = check_data(cfg, index)
    if cfg.model.get("pretrained"):  # fetch / import before the (long) feature pass
        log.info("model.pretrained: %s", _pretrained_path(cfg))

    frontend = build_frontend(cfg.frontend)
    paths = [r.path for r in index.records]
    labels = np.array([r.label for r in index.records], dtype=np.int32)
    cache_dir = Path(cfg.paths.cache_dir) / "features" if cfg.data.feature_cache else None
    t0 = time.time()
    features = compute_features(
        frontend,
        paths,
        sample_rate=int(cfg.data.sample_rate),
        clip_samples=_clip_samples(cfg),
        remove_mean=bool(cfg.data.remove_mean),
        cache_dir=cache_dir,
        desc=f"{cfg.data.name} features",
    )
    feature_time = time.time() - t0
    target_frames = cfg.data.get("target_frames")
    if target_frames is not None:  # the saved model does the same after its frontend
        from src.models.audio_transformer import fit_frames

        features = np.asarray(fit_frames(features, int(target_frames)))
    if not np.isfinite(features).all():
        bad = sorted({paths[i] for i in np.flatnonzero(~np.isfinite(features).all(axis=(1, 2)))})
        raise DatasetError(f"non-finite features for {len(bad)} clip(s): {bad[:10]}")
    log.info("features %s in %.1fs", features.shape, feature_time)

    fold_results = []
    for fold in folds:
        fold_results.append(train_fold(cfg, index, features, labels, fold, run_dir, resolved))

    summary = aggregate_folds(fold_results)
    results = {
        "experiment": cfg.name,
        "dataset": cfg.data.name,
        "accuracy": summary["last_epoch"]["mean"],
        "accuracy_std": summary["last_epoch"]["std"],
        "cv": summary,
        "per_fold": [{k: v for k, v in r.items() if k != "history"} for r in fold_results],
        "history": {r["fold"]: r["history"] for r in fold_results},
        "class_names": list(index.class_names),
        "skipped_files": skipped,
        "parameters": fold_results[0]["parameters"],
        "epochs": int(cfg.trainer.epochs),
        "feature_time_s": feature_time,
        "train_time_s": sum(r["train_time_s"] for r in fold_results),
        "wall_time_s": time.time() - start,
        "config": resolved,
        **provenance(),
    }
    _write_json(run_dir / "results.json", results)

    if len(folds) > 1 and cfg.logger.name == "wandb":
        logger = _make_logger(cfg, None, "cv_summary", resolved)
        if logger is not None:
            cv = {"cv/accuracy_mean": results["accuracy"], "cv/accuracy_std": results["accuracy_std"]}
            if "best_mean_epoch" in summary:
                b = summary["best_mean_epoch"]
                cv.update({"cv/best_epoch": b["epoch"], "cv/best_epoch_accuracy_mean": b["mean"],
                           "cv/best_epoch_accuracy_std": b["std"]})
            logger.log_summary(cv)
            logger.finish()

    msg = (
        f"{cfg.name}: accuracy {results['accuracy']:.4f} +- {results['accuracy_std']:.4f} "
        f"(last epoch, {len(folds)} fold(s)); wall time {results['wall_time_s']:.0f}s; "
        f"results in {run_dir / 'results.json'}"
    )
    log.info(msg)
    print(msg, flush=True)
    return float(results["accuracy"])


def _quiet_tensorflow() -> None:
    """TensorFlow's Python-side warnings (retracing, tfio graph conversion) are noise here."""
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    _quiet_tensorflow()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate_config(cfg)
        return run(cfg, run_dir)
    except (ConfigError, DatasetError) as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
