"""Schedules, mixup, metrics and the linear baseline."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from src.evaluation.metrics import aggregate_folds, classification_report, confusion_matrix
from src.models import load_model
from src.models.build import build_model
from src.training.mixup import apply_mixup, mixup_batch
from src.training.optim import Adam, AdamW, EpochSchedule, build_optimizer


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


def _one_step(opt, start: float, grad: float) -> float:
    """The value of a scalar weight ``start`` after one step of ``opt`` with ``grad``."""
    w = keras.Variable(np.float32(start))
    opt.apply_gradients([(tf.constant(np.float32(grad)), w)])
    return float(keras.ops.convert_to_numpy(w))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_weight_decay_zero_is_no_decay_and_epsilon_is_used(name):
    """``weight_decay: 0.0`` means no decay for AdamW too (not Keras' default of 0.01), and
    ``epsilon`` reaches AdamW as it reaches Adam."""
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1.0
    cfg = {"name": name, "lr": lr, "beta_1": b1, "beta_2": b2, "weight_decay": 0.0,
           "epsilon": eps}
    opt = build_optimizer(cfg, lr)
    assert type(opt) is {"adam": Adam, "adamw": AdamW}[name] and opt.fused
    assert not opt.weight_decay and opt.epsilon == eps
    # A zero gradient moves nothing but decay: the weight stays where it is.
    assert _one_step(build_optimizer(cfg, lr), 3.0, 0.0) == 3.0
    # One step with gradient g from m = v = 0 (Keras' Adam): the weight moves by
    # lr * sqrt(1 - b2) / (1 - b1) * (1 - b1) g / (sqrt((1 - b2) g^2) + eps); the
    # default epsilon (1e-7) would move it by about lr.
    g = 1.0
    step = lr * np.sqrt(1 - b2) * g / (np.sqrt((1 - b2) * g * g) + eps)
    assert _one_step(build_optimizer(cfg, lr), 3.0, g) == pytest.approx(3.0 - step, rel=1e-6)
    # A decay that is asked for is decoupled: w <- w - lr * wd * w, on top of the step.
    decayed = build_optimizer({**cfg, "weight_decay": 0.5}, lr)
    assert _one_step(decayed, 3.0, 0.0) == pytest.approx(3.0 * (1 - lr * 0.5), rel=1e-6)


# The fused Adam update (one ResourceApplyAdam per variable) against Keras' own.

_SHAPES = [(7, 5), (5,), (3, 4, 2)]


def _adam_run(opt, steps=4, sparse_last=False):
    """Weights after ``steps`` steps of ``opt`` from fixed weights and gradients (the
    gradients of the last variable as IndexedSlices if ``sparse_last``), and the op types
    of the traced step."""
    rng = np.random.default_rng(0)
    weights = [keras.Variable(rng.standard_normal(s).astype("float32")) for s in _SHAPES]
    grads = [[rng.standard_normal(s).astype("float32") for s in _SHAPES] for _ in range(steps)]
    opt.build(weights)

    @tf.function
    def step(gs):
        if sparse_last:
            gs = [*gs[:-1], tf.IndexedSlices(gs[-1], tf.range(tf.shape(gs[-1])[0]),
                                             dense_shape=tf.shape(gs[-1], out_type=tf.int64))]
        opt.apply_gradients(zip(gs, weights))

    for gs in grads:
        step([tf.constant(g) for g in gs])
    graph = step.get_concrete_function([tf.TensorSpec(s) for s in _SHAPES]).graph
    ops = {op.type for op in graph.get_operations()}
    return [keras.ops.convert_to_numpy(w) for w in weights], ops, opt


@pytest.mark.parametrize("ours,keras_cls,kwargs", [
    (Adam, keras.optimizers.Adam, dict(learning_rate=3e-2, beta_1=0.8, beta_2=0.99,
                                       epsilon=1e-3)),
    (Adam, keras.optimizers.Adam, dict(learning_rate=1e-2, weight_decay=0.1, clipnorm=1.0)),
    (AdamW, keras.optimizers.AdamW, dict(learning_rate=1e-2, weight_decay=0.05)),
])
def test_fused_adam_is_one_op_per_variable_and_matches_keras_adam(ours, keras_cls, kwargs):
    fused, fused_ops, opt = _adam_run(ours(**kwargs))
    plain, plain_ops, ref = _adam_run(keras_cls(**kwargs))
    assert "ResourceApplyAdam" in fused_ops and "ResourceApplyAdam" not in plain_ops
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The moments too: a backup of one continues in the other.
    assert len(opt.variables) == len(ref.variables)
    for a, b in zip(opt.variables, ref.variables):
        assert a.name.rsplit("_", 1)[-1] == b.name.rsplit("_", 1)[-1]  # momentum, velocity...
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a),
                                   keras.ops.convert_to_numpy(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs,sparse", [(dict(fused=False), False), (dict(amsgrad=True), False),
                                           ({}, True)])
def test_keras_adam_update_runs_where_the_fused_one_does_not_and_sparse_is_fused(kwargs, sparse):
    fused, ops, _ = _adam_run(Adam(learning_rate=1e-2, **kwargs), steps=2, sparse_last=sparse)
    plain, _, _ = _adam_run(keras.optimizers.Adam(learning_rate=1e-2, **{
        k: v for k, v in kwargs.items() if k != "fused"}), steps=2, sparse_last=sparse)
    # A sparse gradient is made dense, as Keras' update does, and stays fused.
    assert ("ResourceApplyAdam" in ops) == sparse
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adam_serializes_with_its_switch():
    for opt in (Adam(2e-3, fused=False), AdamW(1e-3, weight_decay=0.02)):
        back = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        assert type(back) is type(opt)
        assert (back.fused, back.weight_decay) == (opt.fused, opt.weight_decay)
        assert float(back.learning_rate) == pytest.approx(float(opt.learning_rate))


def test_a_model_trained_with_keras_adam_resumes_with_the_fused_one(tmp_path):
    """Weight files hold the optimizer's state by position: Keras' Adam and the fused one
    hold the same variables, so a backup written before the switch continues after it."""
    def model():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(3)])
        return m

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 6)).astype("float32"), rng.integers(0, 3, 16)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    before = model()
    before.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
    before.fit(x, y, epochs=2, batch_size=8, verbose=0)
    before.save_weights(tmp_path / "backup.weights.h5")
    resumed = model()
    resumed.compile(optimizer=Adam(1e-2), loss=loss)
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(tmp_path / "backup.weights.h5")
    assert int(resumed.optimizer.iterations) == 4
    before.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    resumed.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(before.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"name": "adam", "momentum": 0.9}, "momentum"),  # an SGD key under Adam
        ({"name": "adamw", "weight_decy": 0.01}, "weight_decy"),  # a typo
        ({"name": "sgd", "amsgrad": True}, "amsgrad"),
    ],
)
def test_unknown_optimizer_key_is_an_error_naming_it(cfg, key):
    with pytest.raises(ValueError, match=rf"trainer\.optimizer\.{key} is not an option"):
        build_optimizer(cfg, 1e-3)


# Mixup. With one-hot targets of distinct classes (the identity matrix), each mixed target
# row shows the pairing and lam: row i is lam_i at i and 1 - lam_i at its partner.


def _pairing(my: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(partner of each example, its lam) from mixed identity targets."""
    lam = np.diag(my).copy()
    off = my - np.diag(lam)
    partner = np.where(lam < 1.0, off.argmax(1), np.arange(len(my)))
    return partner, lam


def _expected_mix(x, partner, lam, domain):
    lx = lam[:, None, None]
    x2 = x[partner]
    if domain == "power":
        return np.log(lx**2 * np.exp(x) + (1 - lx) ** 2 * np.exp(x2))
    return lx * x + (1 - lx) * x2


def test_mixup_mixes_features_and_targets_with_one_lam_in_both_domains():
    rng = np.random.default_rng(0)
    x = np.log(rng.uniform(0.1, 10.0, (4, 3, 2))).astype("float32")  # distinct log-mels
    seed = tf.constant([7, 0])  # pairs every example with another one (checked below)
    out = {}
    for domain in ("power", "logmel"):
        mx, my = mixup_batch(tf.constant(x), tf.eye(4), prob=1.0, alpha=10.0, domain=domain,
                             seed=seed)
        out[domain] = mx.numpy(), my.numpy()
    my = out["power"][1]
    np.testing.assert_array_equal(out["logmel"][1], my)  # the seed alone draws pairs and lam
    partner, lam = _pairing(my)
    assert (partner != np.arange(4)).all(), f"the seed must pair no example with itself: {my}"
    assert ((lam > 0.2) & (lam < 0.8) & (np.abs(lam - 0.5) > 0.05)).all(), lam
    np.testing.assert_allclose(my.sum(1), 1.0, atol=1e-6)
    for domain in ("power", "logmel"):
        np.testing.assert_allclose(out[domain][0], _expected_mix(x, partner, lam, domain),
                                   rtol=1e-5, atol=1e-5, err_msg=domain)
    # The two domains give different mixes (lam**2 of the powers vs lam of the logs).
    assert np.abs(out["power"][0] - out["logmel"][0]).max() > 0.05

    # Multi-hot targets: mixed with the same pairs and the same lam as the features.
    y = np.array([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 0, 1, 1], [1, 0, 0, 0, 1]],
                 "float32")
    mx, my_multi = mixup_batch(tf.constant(x), tf.constant(y), prob=1.0, alpha=10.0,
                               domain="power", seed=seed)
    np.testing.assert_array_equal(mx.numpy(), out["power"][0])
    np.testing.assert_allclose(
        my_multi.numpy(), lam[:, None] * y + (1 - lam[:, None]) * y[partner], atol=1e-6
    )


def test_mixup_leaves_an_example_paired_with_itself_unchanged():
    rng = np.random.default_rng(1)
    x = np.log(rng.uniform(0.1, 10.0, (4, 3, 2))).astype("float32")
    mx, my = mixup_batch(tf.constant(x), tf.eye(4), prob=1.0, alpha=10.0, domain="power",
                         seed=tf.constant([7, 4]))  # example 3 draws itself
    partner, lam = _pairing(my.numpy())
    assert partner[3] == 3 and (partner[:3] != np.arange(3)).all(), my.numpy()
    np.testing.assert_array_equal(mx.numpy()[3], x[3])
    np.testing.assert_array_equal(my.numpy()[3], np.eye(4)[3])
    np.testing.assert_allclose(mx.numpy(), _expected_mix(x, partner, lam, "power"), atol=1e-5)
    # prob = 0: nothing is mixed.
    mx0, my0 = mixup_batch(tf.constant(x), tf.eye(4), prob=0.0, alpha=10.0, domain="power",
                           seed=tf.constant([7, 0]))
    np.testing.assert_array_equal(mx0.numpy(), x)
    np.testing.assert_array_equal(my0.numpy(), np.eye(4))


def test_apply_mixup_probability_zero_and_one():
    x = tf.random.stateless_normal((64, 5, 4), seed=[1, 2])
    y = tf.one_hot(tf.range(64), 64)  # one class per example: the pairing shows in y
    ds = tf.data.Dataset.from_tensors((x, y))
    assert apply_mixup(ds, prob=0.0, alpha=10, domain="logmel") is ds

    def mixed(global_seed):
        keras.utils.set_random_seed(global_seed)
        ((mx, my),) = list(apply_mixup(ds, prob=1.0, alpha=10, domain="logmel"))
        return mx.numpy(), my.numpy()

    mx, my = mixed(0)
    partner, lam = _pairing(my)
    paired = partner != np.arange(64)
    assert paired.mean() > 0.9  # prob=1: all but the examples that drew themselves
    # Beta(10, 10) concentrates around 0.5: lam within [0.2, 0.8] nearly always.
    assert np.mean((lam[paired] > 0.2) & (lam[paired] < 0.8)) > 0.95
    np.testing.assert_allclose(my.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(mx, _expected_mix(x.numpy(), partner, lam, "logmel"),
                               rtol=1e-5, atol=1e-5)
    # Stateful random ops, seeded by keras.utils.set_random_seed: the same global seed
    # gives the same mix, another seed another one.
    again, _ = mixed(0)
    np.testing.assert_array_equal(mx, again)
    assert not np.array_equal(mx, mixed(1)[0])


def test_apply_mixup_with_a_seed_draws_anew_every_epoch():
    x = tf.random.stateless_normal((32, 5, 4), seed=[1, 2])
    y = tf.one_hot(tf.range(32), 32)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat(2)  # two batches an epoch
    keras.utils.set_random_seed(0)  # as training sets it: stateful ops would repeat
    # (one batch: a parallel map may run two batches' stateful draws in either order)
    stateful = apply_mixup(ds.take(1), prob=1.0, alpha=10, domain="logmel")
    first, second = ([my.numpy() for _, my in stateful] for _ in range(2))
    np.testing.assert_array_equal(first[0], second[0])  # why the seed exists

    def epochs(seed, n=3):
        mixed = apply_mixup(ds, prob=1.0, alpha=10, domain="logmel", seed=seed)
        return [[my.numpy() for _, my in mixed] for _ in range(n)]

    runs = epochs(7)
    for epoch in runs:  # a real mix in every batch
        for my in epoch:
            partner, lam = _pairing(my)
            assert (partner != np.arange(32)).mean() > 0.9
    # every epoch and every batch draws anew ...
    batches = [my for epoch in runs for my in epoch]
    for i in range(len(batches)):
        for j in range(i):
            assert not np.allclose(batches[i], batches[j])
    # ... and the same seed gives the same epochs
    for a, b in zip(runs, epochs(7)):
        for my_a, my_b in zip(a, b):
            np.testing.assert_array_equal(my_a, my_b)


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
    backup = AtomicBackupAndRestore(str(backup_dir))
    return model.fit(x, y, epochs=epochs, verbose=0, callbacks=[*callbacks, backup])


def test_backup_survives_a_write_cut_short(tmp_path):
    """A kill while the backup is written leaves the previous backup whole."""
    from src.training.callbacks import backup_epoch, backup_finished

    backup = tmp_path / "backup"
    _tiny_fit(backup, epochs=2)
    assert backup_epoch(backup) == 2 and backup_finished(backup)  # kept after fit returned
    assert sorted(p.name for p in backup.iterdir()) == ["epoch_2.weights.h5", "finished",
                                                        "training_metadata.json"]
    assert len(_tiny_fit(backup, epochs=2).history.get("loss", [])) == 0  # nothing left


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
    assert not backup_finished(backup)  # an epoch after the marker: training went on
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


def test_the_history_from_the_csv_log_skips_keras_na_cells(tmp_path):
    """Keras' CSVLogger writes val_* columns of `NA` when a fit has no validation data."""
    from src.train import _full_history

    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,loss,val_loss,val_learning_rate\n0,2.0,NA,NA\n1,1.5,NA,NA\n"
                        "1,1.4,NA,NA\n")  # epoch 1 again: a resumed run appended it
    assert _full_history(csv_path, {}) == {"loss": [2.0, 1.4]}
    assert _full_history(csv_path, {"val_loss": []}) == {"loss": [2.0, 1.4], "val_loss": []}
    csv_path.write_text("epoch,loss,val_loss\n0,2.0,1.0\n1,1.5,\n")
    assert _full_history(csv_path, {}) == {"loss": [2.0, 1.5], "val_loss": [1.0]}


def test_the_best_checkpoint_holds_the_best_epoch_the_backup_committed(tmp_path):
    """A kill between a new best's write and the epoch's backup: the resumed run trains
    that epoch again, so the file keeps the best of the committed epochs. A kill after
    the backup, before the next epoch began: the pending best is that epoch's, kept."""
    from src.training.validation import BestWeights, EpochWeights

    class Scores(keras.callbacks.Callback):
        def __init__(self, values):
            super().__init__()
            self.values = values

        def on_epoch_end(self, epoch, logs=None):
            logs["val_x"] = self.values[epoch]

    class Kill(keras.callbacks.Callback):
        def __init__(self, at, when):
            super().__init__()
            self.at, self.when = at, when

        def on_epoch_end(self, epoch, logs=None):
            if self.when == "end" and epoch == self.at:
                raise KeyboardInterrupt

        def on_epoch_begin(self, epoch, logs=None):
            if self.when == "begin" and epoch == self.at:
                raise KeyboardInterrupt

    def weights(path):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.load_weights(path)
        return model.get_weights()

    for when, values, expect_best_epoch in (("end", [0.5, 0.7, 0.9, 0.6], 2),
                                            ("begin", [0.5, 0.9, 0.4, 0.6], 2)):
        root = tmp_path / when
        best, every = root / "best.weights.h5", EpochWeights(root / "epochs", [1, 2, 3, 4])
        kill = Kill(2, when)
        first = [Scores(values), BestWeights(best, "val_x"), every, kill]
        if when == "begin":  # dies before the best callback's epoch begins
            first = [kill, Scores(values), BestWeights(best, "val_x"), every]
        with pytest.raises(KeyboardInterrupt):
            _tiny_fit(root / "backup", epochs=4, callbacks=first)
        assert (root / "best.pending.weights.h5").exists()
        from src.training.callbacks import backup_epoch

        resumed = backup_epoch(root / "backup")
        assert resumed == 2
        done = max(values[:resumed])
        resume = BestWeights(best, "val_x", resumed, done)
        assert not (root / "best.pending.weights.h5").exists()
        assert not (root / "best.pending.json").exists()
        assert all(np.array_equal(a, b) for a, b in zip(
            weights(best), weights(every.path(expect_best_epoch))))
        _tiny_fit(root / "backup", epochs=4, callbacks=[Scores(values), resume, every])
        # epochs 3 and 4 trained after the resume; only a value above `done` replaces it
        best_epoch = 1 + int(np.argmax(values)) if max(values[2:]) > done else expect_best_epoch
        assert all(np.array_equal(a, b) for a, b in zip(
            weights(best), weights(every.path(best_epoch))))
        assert not (root / "best.pending.weights.h5").exists()


def test_a_resumed_csv_log_keeps_its_columns_when_the_logged_keys_change(tmp_path):
    """Keras' CSVLogger appends a fit's values in that fit's sorted keys under the
    file's old header; CSVLog adopts the header and adds new keys as columns."""
    from src.training.callbacks import CSVLog, EpochTime, csv_log_rows

    class Extra(keras.callbacks.Callback):
        def __init__(self, **values):
            super().__init__()
            self.values = values

        def on_epoch_end(self, epoch, logs=None):
            logs.update(self.values)

    path = tmp_path / "metrics.csv"
    x = np.random.default_rng(0).standard_normal((8, 4)).astype("float32")
    y = np.zeros((8, 2), "float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, verbose=0, validation_data=(x, y),
              callbacks=[Extra(old_only=7.0), CSVLog(path)])
    # the resumed attempt logs a new key (epoch_time_s) and no longer the old one
    model.fit(x, y, epochs=3, initial_epoch=1, verbose=0, validation_data=(x, y),
              callbacks=[Extra(zeta=5.0), EpochTime(), CSVLog(path)])
    header = path.read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "loss", "old_only", "val_loss", "epoch_time_s"]
    rows = csv_log_rows(path)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0]["old_only"] == 7.0 and rows[0]["epoch_time_s"] is None
    assert rows[0]["zeta"] is None
    for r in rows[1:]:
        assert r["old_only"] is None and r["zeta"] == 5.0 and r["epoch_time_s"] > 0
        assert 0 < r["loss"] < 10 and 0 < r["val_loss"] < 10
    # plain Keras would have shifted them: the values of attempt 2 under attempt 1's names
    plain = tmp_path / "plain.csv"
    model.fit(x, y, epochs=1, verbose=0, callbacks=[
        Extra(old_only=7.0), keras.callbacks.CSVLogger(str(plain), append=True)])
    model.fit(x, y, epochs=2, initial_epoch=1, verbose=0, callbacks=[
        Extra(zeta=5.0), EpochTime(), keras.callbacks.CSVLogger(str(plain), append=True)])
    assert csv_log_rows(plain)[1]["old_only"] is not None  # a value of another key


def _h5_arrays(path):
    import h5py

    out = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.append(np.array(obj))
                     if isinstance(obj, h5py.Dataset) else None)
    return out


def test_a_kill_between_the_backups_two_writes_resumes_from_the_earlier_epoch(
        tmp_path, monkeypatch):
    """The weights of epoch 3 complete, the metadata still at epoch 2: the backup is epoch
    2's, weights included (before, epoch 3's weights were loaded and epoch 3 trained again
    on top of them)."""
    import os

    from src.training.callbacks import backup_epoch, backup_weights

    backup = tmp_path / "backup"
    _tiny_fit(backup, epochs=2)
    epoch2 = _h5_arrays(backup / "epoch_2.weights.h5")
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".weights.h5"):
            raise KeyboardInterrupt  # the weights are in place, the metadata not yet

    class KilledBeforeTheMetadata(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            monkeypatch.setattr(os, "replace", replace)

    with pytest.raises(KeyboardInterrupt):
        _tiny_fit(backup, epochs=3, callbacks=[KilledBeforeTheMetadata()])
    monkeypatch.undo()
    assert (backup / "epoch_3.weights.h5").exists()
    assert backup_epoch(backup) == 2 and backup_weights(backup).name == "epoch_2.weights.h5"
    for a, b in zip(_h5_arrays(backup_weights(backup)), epoch2):
        np.testing.assert_array_equal(a, b)
    history = _tiny_fit(backup, epochs=3)
    assert len(history.history["loss"]) == 1  # epoch 3 trained once, from epoch 2's weights
    assert sorted(p.name for p in backup.iterdir()) == ["epoch_3.weights.h5", "finished",
                                                        "training_metadata.json"]


def test_the_backup_restores_the_models_random_generators(tmp_path):
    """Dropout draws after a resume are the ones an uninterrupted run makes."""
    from src.training.callbacks import AtomicBackupAndRestore

    x = np.random.default_rng(0).standard_normal((16, 4)).astype("float32")
    y = np.zeros((16, 2), "float32")

    def fit(backup_dir, epochs, crash_at=None):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5),
                                  keras.layers.Dense(2)])
        model.compile(optimizer="adam", loss="mse")

        class Crash(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if epoch == crash_at:
                    raise KeyboardInterrupt

        callbacks = [AtomicBackupAndRestore(str(backup_dir))]
        if crash_at is not None:
            callbacks.insert(0, Crash())
        model.fit(x, y, epochs=epochs, batch_size=4, shuffle=False, verbose=0,
                  callbacks=callbacks)
        return [np.array(w) for w in model.weights]

    whole = fit(tmp_path / "a", 4)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "b", 4, crash_at=2)
    resumed = fit(tmp_path / "b", 4)
    for a, b in zip(whole, resumed):
        np.testing.assert_array_equal(a, b)


def test_when_a_resume_replays_the_trained_epochs_input(caplog):
    import logging

    from src.data.pipeline import replay_on_resume

    with caplog.at_level(logging.INFO, logger="src.data.pipeline"):
        assert replay_on_resume("auto", cached=True, resumed_epochs=3)
        assert "replaying the input of the 3 trained epoch(s)" in caplog.text
        assert not replay_on_resume("auto", cached=False, resumed_epochs=3)
        assert "the training split is streamed" in caplog.text
        assert replay_on_resume(True, cached=False, resumed_epochs=3)  # Hydra's true
        assert not replay_on_resume("false", cached=True, resumed_epochs=3)
        assert not replay_on_resume("auto", cached=True, resumed_epochs=0)
        assert not replay_on_resume("true", cached=True, resumed_epochs=2, strategy="mirrored")
        assert "trainer.strategy=mirrored" in caplog.text
        assert not replay_on_resume("true", cached=True, resumed_epochs=2, backup_format=False)
        assert "drew each epoch per iterator" in caplog.text
    with pytest.raises(ValueError, match="trainer.exact_resume='often'"):
        replay_on_resume("often", cached=True, resumed_epochs=1)


def test_a_backup_of_the_earlier_format_resumes_without_replay(tmp_path):
    """latest.weights.h5 and a metadata file without the weights' name: still resumed."""
    import json

    from src.training.callbacks import backup_epoch, backup_replayable, backup_weights

    backup = tmp_path / "backup"
    _tiny_fit(backup, epochs=2)
    assert backup_replayable(backup)
    (backup / "epoch_2.weights.h5").rename(backup / "latest.weights.h5")
    (backup / "training_metadata.json").write_text(json.dumps({"epoch": 2, "batch": 0}))
    assert not backup_replayable(backup)
    assert backup_epoch(backup) == 2 and backup_weights(backup).name == "latest.weights.h5"
    assert len(_tiny_fit(backup, epochs=3).history["loss"]) == 1
