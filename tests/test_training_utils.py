"""Schedules, mixup, metrics and the linear baseline."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from src.evaluation.metrics import aggregate_folds, classification_report, confusion_matrix
from src.models import load_model
from src.models.build import build_model
from src.training.mixup import apply_mixup, mixup_batch
from src.training.optim import EpochSchedule, build_optimizer


def lr_at(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_ast_step_decay_schedule():
    # AST: constant for 5 epochs (0-4), then x0.85 each epoch.
    s = EpochSchedule(1e-4, steps_per_epoch=10, kind="step_decay", decay_start=5, decay_factor=0.85)
    per_epoch = [lr_at(s, e * 10 + 3) for e in range(8)]
    expected = [1e-4] * 5 + [1e-4 * 0.85, 1e-4 * 0.85**2, 1e-4 * 0.85**3]
    np.testing.assert_allclose(per_epoch, expected, rtol=1e-6)


def test_warmup_then_cosine():
    s = EpochSchedule(1e-3, steps_per_epoch=4, kind="cosine", warmup_epochs=1, total_epochs=10)
    np.testing.assert_allclose(lr_at(s, 0), 1e-3 * 0.25 * 1.0, rtol=1e-5)  # cos(0) = 1
    assert lr_at(s, 1) > lr_at(s, 0)
    assert lr_at(s, 39) < 1e-5
    np.testing.assert_allclose(lr_at(s, 20), 0.5e-3, rtol=1e-5)  # half way: cos(pi/2) = 0


def test_schedule_and_optimizer_errors():
    with pytest.raises(ValueError, match="trainer.schedule.name"):
        EpochSchedule(1e-3, 10, kind="linear")
    with pytest.raises(ValueError, match="trainer.optimizer.name"):
        build_optimizer({"name": "lion"}, 1e-3)


def test_adam_gets_the_ast_betas():
    opt = build_optimizer({"name": "adam", "beta_1": 0.95, "beta_2": 0.999, "weight_decay": 5e-7},
                          1e-4)
    assert (opt.beta_1, opt.beta_2, opt.weight_decay) == (0.95, 0.999, 5e-7)


def test_mixup_power_domain_matches_mixed_power():
    x = np.log(np.stack([np.full((3, 2), 4.0), np.full((3, 2), 1.0)])).astype("float32")
    y = np.eye(2, dtype="float32")
    mx, my = mixup_batch(tf.constant(x), tf.constant(y), prob=1.0, alpha=10.0, domain="power",
                         seed=tf.constant([1, 2]))
    mx, my = mx.numpy(), my.numpy()
    np.testing.assert_allclose(my.sum(-1), 1.0, atol=1e-6)
    for i in range(2):
        lam = my[i, i]
        other = 1 - i
        if lam == 1.0:  # permuted onto itself
            np.testing.assert_allclose(mx[i], x[i], atol=1e-5)
            continue
        expected = np.log(lam**2 * np.exp(x[i]) + (1 - lam) ** 2 * np.exp(x[other]))
        np.testing.assert_allclose(mx[i], expected, atol=1e-5)


def test_mixup_probability_zero_and_one():
    x = tf.random.normal((64, 5, 4))
    y = tf.one_hot(tf.range(64), 64)  # one class per example: lam = the largest label
    ds = tf.data.Dataset.from_tensors((x, y))
    assert apply_mixup(ds, prob=0.0, alpha=10, domain="logmel", seed=0) is ds
    (mx, my), = list(apply_mixup(ds, prob=1.0, alpha=10, domain="logmel", seed=0))
    lam = my.numpy().max(-1)
    # Beta(10, 10) concentrates around 0.5 (max(lam, 1 - lam) in [0.5, 0.8] mostly);
    # an example paired with itself is left unchanged (lam = 1).
    assert np.mean((lam >= 0.5) & (lam < 0.8)) > 0.8
    np.testing.assert_allclose(my.numpy().sum(-1), 1.0, atol=1e-6)
    (mx2, _), = list(apply_mixup(ds, prob=1.0, alpha=10, domain="logmel", seed=0))
    np.testing.assert_array_equal(mx.numpy(), mx2.numpy())  # deterministic per seed


def test_classification_report_and_confusion():
    y = [0, 0, 1, 2, 2, 2]
    logits = np.eye(3)[[0, 1, 1, 2, 2, 0]]
    r = classification_report(y, logits, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": pytest.approx(2 / 3)}
    assert confusion_matrix(y, np.argmax(logits, 1), 3).tolist() == [[1, 1, 0], [0, 1, 0],
                                                                      [1, 0, 2]]


def test_aggregate_folds_last_epoch_and_ast_protocol():
    folds = [
        {"fold": 1, "accuracy": 0.80, "history": {"val_accuracy": [0.5, 0.9, 0.80]}},
        {"fold": 2, "accuracy": 0.70, "history": {"val_accuracy": [0.6, 0.7, 0.70]}},
    ]
    s = aggregate_folds(folds)
    assert s["last_epoch"]["mean"] == pytest.approx(0.75)
    assert s["last_epoch"]["std"] == pytest.approx(0.05)
    b = s["best_mean_epoch"]
    assert b["epoch"] == 2 and b["mean"] == pytest.approx(0.8) and b["std"] == pytest.approx(0.1)


def test_linear_baseline_round_trip_and_learns(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_model({"type": "linear"}, {"n_mels": 16}, num_classes=2, clip_samples=4000)
    x = np.random.default_rng(0).standard_normal((2, 4000)).astype("float32")
    before = keras.ops.convert_to_numpy(model(x))
    model.save(tmp_path / "m.keras")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(load_model(tmp_path / "m.keras")(x)),
                                  before)
    backbone = model.backbone
    frames = model.frontend.num_frames(4000)
    feats = np.random.default_rng(1).standard_normal((64, frames, 16)).astype("float32")
    labels = (np.arange(64) % 2).astype("int32")
    feats[labels == 1, :, 3] += 1.5
    backbone.compile(optimizer=keras.optimizers.Adam(1e-2),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     metrics=["accuracy"])
    hist = backbone.fit(feats, labels, epochs=20, batch_size=16, verbose=0).history
    assert hist["accuracy"][-1] > 0.9


def test_linear_baseline_rejects_unknown_stats():
    with pytest.raises(ValueError, match="model.stats"):
        build_model({"type": "linear", "stats": ["median"]}, {"n_mels": 16}, num_classes=2,
                    clip_samples=4000)


def _tiny_fit(backup_dir, epochs, callbacks=()):
    from src.training.callbacks import AtomicBackupAndRestore

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).standard_normal((8, 4)).astype("float32")
    y = np.zeros((8, 2), "float32")
    backup = AtomicBackupAndRestore(str(backup_dir), delete_checkpoint=False)
    return model.fit(x, y, epochs=epochs, verbose=0, callbacks=[*callbacks, backup])


def test_backup_survives_a_write_cut_short(tmp_path):
    """A kill while the backup is written leaves the previous backup whole."""
    from src.training.callbacks import backup_epoch

    backup = tmp_path / "backup"
    _tiny_fit(backup, epochs=2)
    assert backup_epoch(backup) == 2
    assert sorted(p.name for p in backup.iterdir()) == ["latest.weights.h5",
                                                        "training_metadata.json"]


    class CutShort(keras.callbacks.Callback):
        """The process dies halfway through writing the weights of epoch 3."""

        def on_epoch_end(self, epoch, logs=None):
            def save_weights(filepath, overwrite=True):
                with open(filepath, "wb") as fh:
                    fh.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 88)  # a truncated HDF5 file
                raise KeyboardInterrupt

            self.model.save_weights = save_weights

    with pytest.raises(KeyboardInterrupt):
        _tiny_fit(backup, epochs=3, callbacks=[CutShort()])
    assert backup_epoch(backup) == 2  # the previous backup is whole
    history = _tiny_fit(backup, epochs=3)
    assert len(history.history["loss"]) == 1  # epochs 1-2 restored, epoch 3 trained
    assert backup_epoch(backup) == 3


def test_csv_log_is_cut_back_to_the_backup(tmp_path):
    from src.training.callbacks import truncate_csv_log

    log = tmp_path / "metrics.csv"
    log.write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n3,0.7\n")
    truncate_csv_log(log, 3)
    assert log.read_text().split() == ["epoch,loss", "0,1.0", "1,0.9", "2,0.8"]
    truncate_csv_log(log, 0)
    assert log.read_text().split() == ["epoch,loss"]
    truncate_csv_log(tmp_path / "absent.csv", 2)  # nothing to do
