"""The waveform store (data.store.content=waveform): the decoded samples in the same
sharded, versioned, incremental, checked store; training and evaluation streams in
samples; waveform mixup; the config check; and a model trained on it equals the one
trained on the feature store when nothing random tells them apart."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import soundfile as sf
import tensorflow as tf
from helpers import ROOT, TINY_DATA, TINY_MODEL, train_env

from src.data.audio import read_audio
from src.data.index import DatasetIndex, Record
from src.data.pipeline import LabelTable, eval_dataset, feature_stats, training_dataset
from src.data.store import build_store
from src.data.windows import window_starts
from src.models.frontend import LogMel
from src.training.mixup import apply_mixup, mixup_batch

RATE = 16000
CLIP = RATE // 2


@pytest.fixture(autouse=True)
def _quiet():
    tf.get_logger().setLevel("ERROR")


def _write_clips(folder, seconds, seed=0, folds=2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i, secs in enumerate(seconds):
        x = 0.3 * rng.standard_normal(int(RATE * secs)) + 0.05
        path = folder / f"clip{i:04d}.wav"
        sf.write(path, x, RATE, subtype="PCM_16")
        records.append(Record(path=str(path), label=i % 3, fold=1 + i % folds))
    return records


def _index(records, root):
    return DatasetIndex(records=tuple(records), class_names=("a", "b", "c"), root=str(root))


def _build(index, tmp_path, content="waveform", n_mels=16, **kw):
    kw.setdefault("clip_samples", CLIP)
    return build_store(
        index, LogMel(sample_rate=RATE, n_mels=n_mels), sample_rate=RATE,
        cache_dir=tmp_path / content, name="t", shard_clips=4, progress=False,
        content=content, **kw,
    )


@pytest.fixture
def clips(tmp_path):
    records = _write_clips(tmp_path / "audio", [0.5] * 16)
    # One file that the decoder resamples and mixes down: 22.05 kHz stereo, 0.7 s.
    rng = np.random.default_rng(5)
    odd = tmp_path / "audio" / "odd.wav"
    sf.write(odd, 0.2 * rng.standard_normal((15435, 2)), 22050, subtype="PCM_16")
    records.append(Record(path=str(odd), label=1, fold=1))
    return _index(records, tmp_path / "audio"), tmp_path


def _stored(store):
    return {k.numpy().decode(): w.numpy() for k, w in store.records(store.shards)}


def test_records_are_the_decoded_waveforms_and_the_key_is_not_a_feature_stores(clips):
    index, tmp = clips
    store = _build(index, tmp)
    assert store.waveform and store.built == len(store.shards) and store.reused == 0
    got = _stored(store)
    assert sorted(got) == sorted(r.path for r in index.records)
    for r in index.records:  # float32 samples, bit for bit the decoder's
        want = read_audio(r.path, RATE, clip_samples=CLIP)
        assert got[r.path].dtype == np.float32 and got[r.path].shape == (CLIP,)
        np.testing.assert_array_equal(got[r.path], want)
    meta = json.loads((store.directory / "store.json").read_text())["material"]
    assert meta["content"] == "waveform" and meta["dtype"] == "float32"
    assert "frontend_config" not in meta and meta["clip_samples"] == CLIP
    features = _build(index, tmp, content="features")
    assert features.directory.name != store.directory.name  # same name and settings
    assert not features.waveform and "content" not in json.loads(
        (features.directory / "store.json").read_text())["material"]
    # The frontend is not part of a waveform store: another one reuses every shard.
    other = _build(index, tmp, n_mels=24)
    assert other.directory == store.directory and other.built == 0
    assert other.n_mels == 24 and other.clip_frames == store.clip_frames


def test_waveform_store_is_incremental_versioned_and_checked(clips):
    index, tmp = clips
    first = _build(index, tmp)
    again = _build(index, tmp)
    assert again.built == 0 and again.reused == len(first.shards)
    path = index.records[6].path
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = _build(index, tmp)
    assert touched.built == 1 and touched.reused == len(first.shards) - 1
    (rebuilt,) = [s for s in touched.shards if path in s.keys]
    assert rebuilt.path not in {s.path for s in first.shards}
    assert len(list((first.directory / "shards").glob("*.tfrecord"))) == len(first.shards)
    # Another clip length is another store; the old one is left as it is.
    longer = _build(index, tmp, clip_samples=RATE)
    assert longer.directory != first.directory and longer.built == len(longer.shards)
    assert {len(w) for w in _stored(longer).values()} == {RATE}
    # A shard cut in half is rebuilt, never read.
    victim = touched.shards[0].path
    data = open(victim, "rb").read()
    with open(victim, "wb") as fh:
        fh.write(data[: len(data) // 2])
    assert _build(index, tmp).built == 1


def test_variable_length_waveforms_are_cropped_and_windowed_in_samples(tmp_path):
    lengths = [0.3, 0.5, 1.2, 2.05]
    records = _write_clips(tmp_path / "audio", lengths)
    index = _index(records, tmp_path / "audio")
    store = _build(index, tmp_path, variable_length=True)
    waves = _stored(store)
    for r, secs in zip(records, lengths):  # stored at their own length
        assert store.frames_of()[r.path] == int(RATE * secs) == len(waves[r.path])
        np.testing.assert_array_equal(waves[r.path], read_audio(r.path, RATE))

    # Training: a random clip-long stretch of each longer clip, a shorter one zero-padded,
    # a new one every epoch also with the global seed that training sets (stateful random
    # ops in tf.data would repeat their draws in every epoch's iterator).
    keras.utils.set_random_seed(0)
    ds = training_dataset(store, index, range(4), LabelTable(index), batch_size=4, seed=0)
    starts = {i: set() for i in range(4)}
    for _epoch in range(3):
        (x, y), = list(ds)
        assert x.shape == (4, CLIP)
        for crop, label in zip(x.numpy(), y.numpy().argmax(1)):
            (i,) = [i for i in range(4) if records[i].label == label
                    and _find(waves[records[i].path], crop) is not None]
            starts[i].add(_find(waves[records[i].path], crop))
    assert starts[0] == {0} and starts[1] == {0}
    assert len(starts[2]) == len(starts[3]) == 3  # the crops move from epoch to epoch

    # Evaluation: windows of clip_samples every half window; the last ends at the end.
    rows, weights, crops = [], [], []
    for xb, rb, wb in eval_dataset(store, index, range(4), batch_size=3):
        assert xb.shape[1:] == (CLIP,)
        rows += rb.numpy().tolist()
        weights += wb.numpy().tolist()
        crops += list(xb.numpy())
    for i, r in enumerate(records):
        wave = waves[r.path]
        begins = window_starts(len(wave), CLIP, CLIP // 2)
        mine = [c for row, c in zip(rows, crops) if row == i]
        assert len(mine) == len(begins)
        for s, c in zip(begins, mine):
            np.testing.assert_array_equal(c, _padded(wave[s : s + CLIP]))
    assert weights[rows.index(0)] == pytest.approx(int(0.3 * RATE) / CLIP)
    assert all(w == 1.0 for row, w in zip(rows, weights) if row in (1, 2, 3))
    # 2.05 s: windows start at 0, 0.25, ..., 1.5 s and at 1.55 s (the end)
    assert [s / RATE for s in window_starts(len(waves[records[3].path]), CLIP, CLIP // 2)][
        -2:] == [1.5, 1.55]


def _padded(x):
    return np.pad(x, (0, CLIP - len(x)))


def _find(wave, crop):
    """Where ``crop`` (zero-padded to a clip) starts in ``wave``, or None."""
    if len(wave) <= CLIP:
        return 0 if np.array_equal(_padded(wave), crop) else None
    for s in range(len(wave) - CLIP + 1):
        if wave[s] == crop[0] and np.array_equal(wave[s : s + CLIP], crop):
            return s
    return None


def test_statistics_come_from_the_frontend_over_the_training_waveforms(clips):
    """Fixed-length clips: the waveform store's statistics (frontend run per batch) are
    those of the feature store's stored features."""
    index, tmp = clips
    rows = np.arange(0, 16, 2)
    waves = _build(index, tmp)
    feats = _build(index, tmp, content="features")
    mean, std = feature_stats(waves, index, rows)
    want = feature_stats(feats, index, rows)
    assert mean == pytest.approx(want[0], rel=1e-6) and std == pytest.approx(want[1], rel=1e-6)
    assert feature_stats(waves, index, rows + 1)[0] != pytest.approx(mean, rel=1e-4)
    # target_frames pads the features with zeros as the model does.
    padded = feature_stats(waves, index, rows, target_frames=2 * waves.clip_frames)
    assert padded[0] == pytest.approx(mean / 2, rel=1e-5)


def _pairing(y):
    """Partner and lam of each example from its mixed one-hot target."""
    lam = np.diag(y).copy()
    rest = y - np.diag(lam)
    return rest.argmax(1), lam


def test_waveform_mixup_is_the_linear_mix_of_the_samples():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, 50)).astype("float32")
    mx, my = mixup_batch(tf.constant(x), tf.eye(4), prob=1.0, alpha=10.0, domain="waveform",
                         seed=tf.constant([7, 0]))
    mx, my = mx.numpy(), my.numpy()
    partner, lam = _pairing(my)
    assert (partner != np.arange(4)).all() and ((lam > 0.2) & (lam < 0.8)).all(), my
    for i in range(4):  # by hand: w = lam * w1 + (1 - lam) * w2
        want = [lam[i] * a + (1 - lam[i]) * b for a, b in zip(x[i], x[partner[i]])]
        np.testing.assert_allclose(mx[i], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(my[i, [i, partner[i]]], [lam[i], 1 - lam[i]], atol=1e-6)
    # The same draw as the feature domains (the seed alone draws the pairs and lam).
    feats = np.log(rng.uniform(0.1, 10.0, (4, 3, 2))).astype("float32")
    _, my_logmel = mixup_batch(tf.constant(feats), tf.eye(4), prob=1.0, alpha=10.0,
                               domain="logmel", seed=tf.constant([7, 0]))
    np.testing.assert_array_equal(my_logmel.numpy(), my)
    # Each domain only mixes its own kind of batch.
    with pytest.raises(ValueError, match="data.store.content=waveform"):
        mixup_batch(tf.constant(feats), tf.eye(4), prob=1.0, alpha=10.0, domain="waveform")
    with pytest.raises(ValueError, match="data.store.content=features"):
        mixup_batch(tf.constant(x), tf.eye(4), prob=1.0, alpha=10.0, domain="power")
    # In the pipeline (stateful draws): every mixed row is a convex mix of two inputs.
    ds = apply_mixup(tf.data.Dataset.from_tensors((tf.constant(x), tf.eye(4))), prob=1.0,
                     alpha=10.0, domain="waveform")
    (bx, by), = [(a.numpy(), b.numpy()) for a, b in ds]
    partner, lam = _pairing(by)
    mixed = lam[:, None] * x + (1 - lam[:, None]) * x[partner]
    np.testing.assert_allclose(bx, np.where((partner == np.arange(4))[:, None], x, mixed),
                               rtol=1e-6, atol=1e-7)


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_mixup_domain_and_store_content_must_agree(tmp_path):
    from src.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"augment.mixup_domain=waveform.*data.store.content"):
        validate_config(_compose("augment.mixup_domain=waveform"))
    with pytest.raises(ConfigError, match=r"augment.mixup_domain=power.*data.store.content"):
        validate_config(_compose("data.store.content=waveform", "augment.mixup=0.5"))
    with pytest.raises(ConfigError, match="data.store.content='audio' is unknown"):
        validate_config(_compose("data.store.content=audio"))
    validate_config(_compose("data.store.content=waveform", "augment.mixup=0.5",
                             "augment.mixup_domain=waveform"))
    validate_config(_compose("data.store.content=waveform"))  # mixup off: any domain
    # The command line reports it before any work.
    out = subprocess.run(
        [sys.executable, "-m", "src.train", "augment.mixup_domain=waveform", "augment.mixup=0.5"],
        cwd=ROOT, env=train_env(tmp_path), capture_output=True, text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "augment.mixup_domain=waveform" in out.stderr and "data.store.content" in out.stderr


def _train(tmp, name, *overrides):
    out = subprocess.run(
        [sys.executable, "-m", "src.train", *overrides, f"name={name}"], cwd=ROOT,
        env=train_env(tmp), capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    (path,) = [p for p in (tmp / "runs" / name).rglob("results.json")
               if not p.parent.name.startswith("fold_") and "previous" not in p.parts]
    return path.parent, json.loads(path.read_text())


def _h5_names(path):
    import h5py

    names = []
    with h5py.File(path) as f:
        f.visititems(lambda n, o: names.append(n) if hasattr(o, "shape") else None)
    return sorted(names)


@pytest.mark.slow
def test_waveform_training_equals_feature_training_without_augmentation(tmp_path):
    """Same seed, deterministic ops, no SpecAugment, no mixup: training on stored
    waveforms (frontend in the training step) and on stored features gives the same
    losses, validation and test metrics, up to float32 rounding. Measured on 2 CPU cores:
    bit for bit the same (losses, probabilities, weights; dropout draws the same masks);
    the tolerance leaves room for kernels that fuse the frontend with the backbone (XLA
    on a GPU)."""
    args = [*TINY_DATA, *TINY_MODEL, "trainer.epochs=3", "trainer.deterministic=true",
            "trainer.batch_size=8",  # 5 steps per epoch
            "trainer.attention_maps=1", "trainer.average_epochs=[2,3]",
            "augment.freq_mask_param=0", "augment.time_mask_param=0", "augment.mixup=0"]
    runs = {}
    for content in ("features", "waveform"):
        runs[content] = _train(tmp_path, content, *args, f"data.store.content={content}")
    (dir_f, f), (dir_w, w) = runs["features"], runs["waveform"]
    assert "/waveforms/" in w["feature_store"] and "/features/" in f["feature_store"]
    ff, fw = f["per_fold"][0], w["per_fold"][0]
    assert ff["norm_mean"] == pytest.approx(fw["norm_mean"], rel=1e-6)
    assert ff["norm_std"] == pytest.approx(fw["norm_std"], rel=1e-6)
    hf, hw = f["history"]["5"], w["history"]["5"]
    assert len(hf["loss"]) == len(hw["loss"]) == 3
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        np.testing.assert_allclose(hw[key], hf[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert len(set(hf["loss"])) == 3  # it did train
    for key in ("test_accuracy", "val_accuracy"):
        assert fw[key] == pytest.approx(ff[key], rel=1e-4), key
    assert fw["test_averaged"]["accuracy"] == pytest.approx(ff["test_averaged"]["accuracy"])
    for name in ("test_last", "test_best_val", "test_averaged"):
        pf = np.load(dir_f / "fold_5/predictions" / f"{name}.npz")
        pw = np.load(dir_w / "fold_5/predictions" / f"{name}.npz")
        np.testing.assert_array_equal(pf["rows"], pw["rows"])
        np.testing.assert_allclose(pw["probs"], pf["probs"], rtol=1e-4, atol=1e-5, err_msg=name)
    # The weight files are the backbone's in both (checkpoints, averaging, resume).
    for name in ("last.weights.h5", "best.weights.h5", "averaged.weights.h5",
                 "epochs/epoch_002.weights.h5"):
        assert _h5_names(dir_w / "fold_5/checkpoints" / name) == _h5_names(
            dir_f / "fold_5/checkpoints" / name)
    assert any(n.startswith("optimizer/") for n in _h5_names(
        dir_w / "fold_5/checkpoints/last.weights.h5"))
    assert list((dir_w / "fold_5/attention").glob("*.png"))

    # The saved waveform model scores a test clip as the waveform evaluation did.
    from src.models import load_model

    model = load_model(dir_w / "fold_5/model.keras")
    pred = np.load(dir_w / "fold_5/predictions/test_last.npz")
    key = str(pred["keys"][0])
    wave = read_audio(key, RATE, clip_samples=model.clip_samples)
    logits = np.asarray(model(wave[None]), np.float64)[0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(probs, pred["probs"][0], rtol=1e-4, atol=1e-5)


def test_a_waveform_run_resumes_from_the_backbones_backup(tmp_path):
    """Training on waveforms writes its resume backup as the backbone's weight file
    (optimizer state included) and a fresh process restores from it."""
    import keras

    from src.models.build import build_model
    from src.train import _waveform_training
    from src.training.callbacks import AtomicBackupAndRestore

    def fresh(seed):
        keras.utils.set_random_seed(seed)
        model = build_model(
            {"embed_dim": 16, "num_heads": 2, "ff_dim": 32, "num_layers": 1},
            {"name": "logmel", "n_mels": 16, "sample_rate": RATE}, num_classes=3,
            clip_samples=CLIP,
        )
        loss = keras.losses.CategoricalCrossentropy(from_logits=True)
        model.backbone.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        trained = _waveform_training(model)
        trained.compile(optimizer=model.backbone.optimizer, loss=loss)
        return model, trained

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt  # killed after the first epoch's backup

    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, (8, CLIP)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 8)]
    backup = tmp_path / "backup"
    model, trained = fresh(0)
    with pytest.raises(KeyboardInterrupt):
        trained.fit(x, y, batch_size=4, epochs=3, verbose=0, shuffle=False,
                    callbacks=[AtomicBackupAndRestore(str(backup)), Crash()])
    at_crash = [w.numpy() for w in model.backbone.weights]
    model.backbone.save_weights(tmp_path / "backbone.weights.h5")
    assert _h5_names(backup / "epoch_1.weights.h5") == _h5_names(tmp_path / "backbone.weights.h5")
    assert any(n.startswith("optimizer/") for n in _h5_names(backup / "epoch_1.weights.h5"))

    model2, trained2 = fresh(1)  # other initial weights
    assert not np.array_equal(model2.backbone.weights[0].numpy(), at_crash[0])
    seen = {}

    class Look(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.setdefault("weights", [w.numpy() for w in model2.backbone.weights])
            seen.setdefault("steps", int(trained2.optimizer.iterations.numpy()))

    history = trained2.fit(x, y, batch_size=4, epochs=3, verbose=0, shuffle=False,
                           callbacks=[AtomicBackupAndRestore(str(backup)), Look()])
    assert history.epoch == [1, 2]  # the first epoch is not trained again
    assert seen["steps"] == 2  # the optimizer's state came back with the weights
    for a, b in zip(seen["weights"], at_crash):
        np.testing.assert_array_equal(a, b)
    assert int(trained2.optimizer.iterations.numpy()) == 6
