"""Prediction on audio files and model export, with tiny real saved models.

Every number checked here is also computed a second way in the test: windows cut by hand
from the decoded file, the model called on them directly, softmax / sigmoid in numpy.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
CLIP = 8000  # 0.5 s clips at 16 kHz
HOP = CLIP // 2  # predict's default hop: half a window
CLASSES = ["a", "b", "c"]
TINY = {"embed_dim": 16, "num_heads": 2, "ff_dim": 32, "num_layers": 1}
FRONTEND = {"n_mels": 32}
MiB = 2**20


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def _fit_a_little(model, seed=0):
    """Two real optimiser steps of the backbone on the features of random waveforms, so
    the weights are not just the initialisation."""
    import keras

    rng = np.random.default_rng(seed)
    waves = rng.uniform(-0.5, 0.5, (8, model.clip_samples)).astype("float32")
    x = np.asarray(model.features(waves))
    k = model.backbone.hparams["num_classes"]
    y = np.eye(k, dtype="float32")[rng.integers(0, k, 8)]
    model.backbone.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    before = model.backbone.classifier.kernel.numpy().copy()
    model.backbone.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert not np.allclose(before, model.backbone.classifier.kernel.numpy())


def _tone(seconds, rate=RATE, freq=440.0, offset=0.0, seed=1):
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(rate * seconds))) / rate
    return offset + 0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)


def _write(path, samples, rate=RATE, **kwargs):
    sf.write(path, np.clip(samples, -0.999, 0.999), rate, subtype="PCM_16", **kwargs)
    return path


def _probs_of(entry, names):
    """A predict entry's probabilities in class order (its top list must hold them all)."""
    probs = {t["label"]: t["prob"] for t in entry["top"]}
    assert sorted(probs) == sorted(names), entry
    return np.array([probs[c] for c in names])


def _tflite_logits(path, x):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], np.asarray(x, np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir as training writes it: config.yaml, results.json, fold_1/model.keras
    and fold_1/results.json (with the fold's validation metric)."""
    import keras

    from src.models.build import build_model

    keras.utils.set_random_seed(0)
    model = build_model(TINY, FRONTEND, num_classes=3, clip_samples=CLIP, class_names=CLASSES)
    _fit_a_little(model)
    root = tmp_path_factory.mktemp("runs") / "toy" / "model.num_heads=2"
    (root / "fold_1").mkdir(parents=True)
    model.save(root / "fold_1" / "model.keras")
    fold = {"fold": 1, "primary_metric": "accuracy", "val_accuracy": 0.8, "test_accuracy": 0.7}
    (root / "fold_1" / "results.json").write_text(json.dumps(fold))
    (root / "results.json").write_text(json.dumps({"per_fold": [fold]}))
    (root / "config.yaml").write_text("data:\n  name: toy\n")
    return root


@pytest.fixture(scope="module")
def model(run_dir):
    from src.models import load_model

    return load_model(run_dir / "fold_1" / "model.keras")


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    """The run's model exported once as a SavedModel and as TFLite, through the command's
    ``main`` (TFLite conversion is slow: every test shares these)."""
    from scripts.export import main as export_main

    d = tmp_path_factory.mktemp("export")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        codes = (
            export_main([str(run_dir), "--format", "savedmodel", "--out", str(d / "sm")]),
            export_main([str(run_dir / "fold_1"), "--format", "tflite",
                         "--out", str(d / "model.tflite")]),
        )
    assert codes == (0, 0), err.getvalue()
    return {"dir": d, "stdout": out.getvalue()}


@pytest.fixture(scope="module")
def saved_model(exports):
    import tensorflow as tf

    return tf.saved_model.load(str(exports["dir"] / "sm"))


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    files = {
        "wav": d / "long.wav",  # 1.3 s, 16-bit PCM at the model's rate: several windows
        "flac": d / "short.flac",  # 0.2 s at 44.1 kHz: resampled, shorter than one window
        "ogg": d / "mid.ogg",  # 0.7 s Vorbis at 22.05 kHz: resampled, two windows
        "bad": d / "notes.wav",  # text named .wav
    }
    _write(files["wav"], _tone(1.3, RATE, 440.0, 0.1))
    _write(files["flac"], _tone(0.2, 44100, 1000.0, 0.1), 44100)
    sf.write(files["ogg"], _tone(0.7, 22050, 300.0, 0.1), 22050, format="OGG", subtype="VORBIS")
    files["bad"].write_text("these are notes, not audio\n")
    return files


# --------------------------------------------------------------------------- windows


# Window starts written out by hand (samples): every hop while the window ends inside the
# file, then one window ending at the end of the file; a file shorter than a window is one
# window (zero-padded to the clip for this fixed-grid model).
HAND_STARTS = {
    "wav": (20800, [0, 4000, 8000, 12000, 12800]),  # 1.3 s
    "flac": (3200, [0]),  # 0.2 s
    "ogg": (11200, [0, 3200]),  # 0.7 s
}


def test_predict_files_matches_windows_cut_by_hand(model, audio_files):
    from src.data.audio import read_audio
    from src.predict import predict_files

    paths = [audio_files[k] for k in ("wav", "flac", "ogg", "bad")]
    results = predict_files(model, paths, top_k=3, per_window=True)
    assert [r["path"] for r in results] == [str(p) for p in paths]

    for key, result in zip(("wav", "flac", "ogg"), results[:3]):
        samples, starts = HAND_STARTS[key]
        assert result["error"] is None, result
        assert result["duration_s"] == pytest.approx(samples / RATE)
        assert result["windows"] == len(starts) == len(result["per_window"])
        assert [w["start_s"] for w in result["per_window"]] == pytest.approx(
            [s / RATE for s in starts])
        # Every window is a full one, the last ending at the end of the file.
        assert [w["end_s"] for w in result["per_window"]] == pytest.approx(
            [min(s + CLIP, samples) / RATE for s in starts])
        probs = _probs_of(result, CLASSES)
        assert probs.sum() == pytest.approx(1.0, abs=1e-6)
        assert [t["prob"] for t in result["top"]] == sorted(probs, reverse=True)

        audio = read_audio(audio_files[key], RATE)  # the whole file, decoded at once
        assert len(audio) == samples
        windows = np.stack([np.pad(audio[s:s + CLIP], (0, CLIP - len(audio[s:s + CLIP])))
                            for s in starts])
        window_probs = _softmax(model(windows, training=False))
        np.testing.assert_allclose(probs, window_probs.mean(axis=0), atol=1e-5)
        for w, p in zip(result["per_window"], window_probs):
            assert w["label"] == CLASSES[int(p.argmax())]
            assert w["prob"] == pytest.approx(p.max(), abs=1e-5)

    bad = results[3]
    assert bad["error"] is not None and str(audio_files["bad"]) in bad["error"]
    assert bad["top"] == [] and bad["windows"] == 0

    top1 = predict_files(model, paths[:1], top_k=1)[0]
    assert len(top1["top"]) == 1 and top1["per_window"] is None
    assert top1["top"][0]["label"] == results[0]["top"][0]["label"]
    assert top1["top"][0]["prob"] == pytest.approx(results[0]["top"][0]["prob"], abs=1e-6)


def test_a_file_of_1_1_windows_gives_two_full_windows_averaged_plainly(model, tmp_path):
    from src.predict import predict_files

    n = CLIP + CLIP // 10  # 1.1 windows
    path = _write(tmp_path / "one_and_a_bit.wav", _tone(n / RATE, freq=700.0, offset=0.2))
    (entry,) = predict_files(model, [path], top_k=3, per_window=True)
    assert entry["windows"] == 2
    assert [(w["start_s"], w["end_s"]) for w in entry["per_window"]] == [
        pytest.approx((0.0, CLIP / RATE)), pytest.approx(((n - CLIP) / RATE, n / RATE))]

    wave, _ = sf.read(path, dtype="float32")
    assert len(wave) == n
    p = _softmax(model(np.stack([wave[:CLIP], wave[n - CLIP:]]), training=False))
    np.testing.assert_allclose(_probs_of(entry, CLASSES), p.mean(axis=0), atol=1e-6)
    # The old rule (a second window at the hop, zero-padded, weighted by its coverage)
    # gives other numbers on this file: the check above tells the two apart.
    padded = np.pad(wave[HOP:], (0, CLIP - (n - HOP)))
    q = _softmax(model(np.stack([wave[:CLIP], padded]), training=False))
    old = (q[0] + q[1] * (n - HOP) / CLIP) / (1 + (n - HOP) / CLIP)
    assert np.abs(old - p.mean(axis=0)).max() > 1e-4


def test_stream_windows_over_blocks_equal_slices_of_the_whole_file(tmp_path):
    from src.data.audio import read_audio, read_audio_blocks
    from src.predict import stream_windows

    path = _write(tmp_path / "resampled.wav", _tone(3.3, 22050, 500.0, 0.1), 22050)
    whole = read_audio(path, RATE)
    n = len(whole)
    assert n == 52800
    window, hop = CLIP, 3000
    starts = list(range(0, n - window, hop)) + [n - window]
    for block_s in (0.037, 0.5, 1.3, 10.0):  # blocks shorter and longer than a window
        got = list(stream_windows(read_audio_blocks(path, RATE, block_s), window, hop))
        assert [s for s, _ in got] == starts, block_s
        for s, w in got:
            assert len(w) == window
            # The blocks are resampled as one stream: equal to the whole file's resampling
            # to float32 rounding.
            np.testing.assert_allclose(w, whole[s:s + window], atol=1e-6, err_msg=str(s))

    ones = [np.ones(100, np.float32), np.ones(50, np.float32)]
    (short,) = stream_windows(iter(ones), window, hop)
    assert short[0] == 0 and len(short[1]) == 150  # shorter than a window: one, unpadded
    exact = list(stream_windows(iter([np.arange(window, dtype=np.float32)]), window, hop))
    assert [s for s, _ in exact] == [0] and len(exact[0][1]) == window
    assert list(stream_windows(iter([]), window, hop)) == []


def _write_long(path, seconds, chunk_s=60):
    """A 16-bit WAV of ``seconds`` written a minute at a time (never held whole)."""
    rng = np.random.default_rng(5)
    total = int(seconds * RATE)
    with sf.SoundFile(path, "w", RATE, 1, subtype="PCM_16") as f:
        done = 0
        while done < total:
            n = min(chunk_s * RATE, total - done)
            t = (done + np.arange(n)) / RATE
            freq = 150.0 + 40.0 * (done // (chunk_s * RATE))  # a new tone every minute
            x = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * t / 7.0))
            f.write((0.1 + 0.5 * x + 0.05 * rng.standard_normal(n)).astype(np.float32))
            done += n
    return total


def test_a_long_file_is_predicted_in_bounded_memory(model, tmp_path):
    """20 minutes of 16 kHz audio: 73 MiB once decoded to float32, 37 MiB as 16-bit WAV.

    ``predict_files`` reads blocks of ``max(window, 4 * batch_size * hop)`` samples: with
    ``batch_size=8`` 128000 samples, 0.5 MiB of float32. The reader holds a few of them
    (its pending chunks, their concatenation, the block handed out), the window cutter one
    block plus one window and the arrays the pending windows still point into, a batch
    is stacked once: about ten blocks. Bound: 16 blocks (8 MiB), a ninth of the decoded
    file, and about what a 2-minute file needs: the peak does not grow with the length.
    Measured: about 4 MiB for both files. (``tracemalloc`` sees numpy's buffers and every
    Python object; TensorFlow's own tensors are not Python allocations.)
    """
    from src.predict import load_audio, predict_files

    batch = 8
    block_bytes = 4 * max(CLIP, 4 * batch * HOP)
    long_path, short_path = tmp_path / "twenty_minutes.wav", tmp_path / "two_minutes.wav"
    n = _write_long(long_path, 20 * 60 + 1234 / RATE)  # the last window is off the hop grid
    _write_long(short_path, 2 * 60)
    decoded_bytes = 4 * n
    predict_files(model, [short_path], batch_size=batch)  # traces the predict function

    def peak_of(path):
        tracemalloc.start()
        try:
            (entry,) = predict_files(model, [path], top_k=3, batch_size=batch)
            return entry, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    _, short_peak = peak_of(short_path)
    entry, peak = peak_of(long_path)
    assert peak < 16 * block_bytes < decoded_bytes / 8, (peak / MiB, short_peak / MiB)
    assert peak < 1.5 * short_peak + MiB, (peak / MiB, short_peak / MiB)

    # The same windows and numbers as from the file read whole.
    audio = load_audio(long_path, RATE)
    assert len(audio) == n
    starts = list(range(0, n - CLIP, HOP)) + [n - CLIP]
    assert starts[-1] % HOP != 0
    assert entry["windows"] == len(starts) and entry["duration_s"] == pytest.approx(n / RATE)
    total = np.zeros(len(CLASSES))
    for i in range(0, len(starts), 256):
        x = np.stack([audio[s:s + CLIP] for s in starts[i:i + 256]])
        total += _softmax(model.predict_on_batch(x)).sum(axis=0)
    np.testing.assert_allclose(_probs_of(entry, CLASSES), total / len(starts), atol=1e-6)


# --------------------------------------------------------------------------- command line


def test_predict_cli_json_reports_bad_file_and_exits_1(run_dir, audio_files):
    good = [str(audio_files[k]) for k in ("wav", "flac")]
    out = subprocess.run(
        [sys.executable, "-m", "src.predict", str(run_dir), f"audio={good[0]}", good[1],
         f"audio={audio_files['bad']}", str(audio_files["ogg"]), "top_k=2", "per_window=true",
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert out.returncode == 1, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["model"] == str(run_dir / "fold_1" / "model.keras") and doc["fold"] == 1
    assert doc["multi_label"] is False and doc["remove_mean"] is True
    assert (doc["window_s"], doc["hop_s"]) == (CLIP / RATE, HOP / RATE)
    files = {Path(f["path"]).name: f for f in doc["files"]}
    assert list(files) == ["long.wav", "short.flac", "notes.wav", "mid.ogg"]
    for name, key in (("long.wav", "wav"), ("short.flac", "flac"), ("mid.ogg", "ogg")):
        starts = HAND_STARTS[key][1]
        assert files[name]["error"] is None
        assert files[name]["windows"] == len(starts) == len(files[name]["per_window"])
        assert [w["start_s"] for w in files[name]["per_window"]] == pytest.approx(
            [s / RATE for s in starts])
        assert len(files[name]["top"]) == 2
    assert "notes.wav" in files["notes.wav"]["error"]
    assert "notes.wav" in out.stderr


def test_audio_takes_a_comma_list_unless_a_file_has_that_name(tmp_path):
    from src.predict import parse_args

    a, b, comma = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "x,y.wav"
    for p in (a, b, comma):
        p.write_bytes(b"")
    for argv in ([f"audio={a},{b}"], [f"audio=[{a}, {b}]"], [f"audio={a}", str(b)]):
        assert parse_args(["run", *argv]).audio == [str(a), str(b)], argv
    assert parse_args(["run", f"audio={comma}"]).audio == [str(comma)]  # a real name
    assert parse_args(["run", f"audio={a},{tmp_path}/nope.wav"]).audio == [
        str(a), f"{tmp_path}/nope.wav"]  # each part is then reported on its own
    assert parse_args(["run", f"audio={tmp_path}/nope.wav"]).audio == [f"{tmp_path}/nope.wav"]
    with pytest.raises(SystemExit):
        parse_args(["run", "audio="])  # nothing to label


def _fold_run(tmp_path, source_model, scores):
    run = tmp_path / "run"
    for fold, result in scores.items():
        (run / f"fold_{fold}").mkdir(parents=True)
        shutil.copyfile(source_model, run / f"fold_{fold}" / "model.keras")
        if result is not None:
            (run / f"fold_{fold}" / "results.json").write_text(json.dumps({"fold": fold, **result}))
    (run / "config.yaml").write_text("data:\n  name: toy\n")
    return run


def test_resolve_model_picks_the_best_validation_fold_not_the_best_test_fold(run_dir, tmp_path):
    from src.predict import resolve_model

    source = run_dir / "fold_1" / "model.keras"
    run = _fold_run(tmp_path, source, {
        1: {"primary_metric": "accuracy", "val_accuracy": 0.9, "test_accuracy": 0.6},
        2: {"primary_metric": "accuracy", "val_accuracy": 0.7, "test_accuracy": 0.95},
    })
    # A run summary whose test numbers favour fold 2 too: nothing reads them.
    (run / "results.json").write_text(json.dumps({"per_fold": [
        {"fold": 1, "accuracy": 0.6, "test_accuracy": 0.6},
        {"fold": 2, "accuracy": 0.95, "test_accuracy": 0.95}]}))
    best = resolve_model(run)
    assert best.fold == 1 and best.path == run / "fold_1" / "model.keras" and best.run_dir == run

    # The other way round, and with mAP as the primary metric: the validation metric decides.
    for fold, val in ((1, 0.3), (2, 0.4)):
        (run / f"fold_{fold}" / "results.json").write_text(json.dumps(
            {"fold": fold, "primary_metric": "mAP", "val_mAP": val, "test_mAP": 1.0 - val}))
    assert resolve_model(run).fold == 2


def test_resolve_model_names_what_it_looked_for(run_dir, tmp_path):
    from src.predict import ModelNotFoundError, resolve_model

    resolved = resolve_model(run_dir)  # one fold: that one
    assert resolved.path == run_dir / "fold_1" / "model.keras" and resolved.fold == 1
    assert resolve_model(run_dir / "fold_1").run_dir == run_dir
    assert resolve_model(run_dir / "fold_1" / "model.keras").fold == 1

    run = _fold_run(tmp_path, run_dir / "fold_1" / "model.keras",
                    {1: {"test_accuracy": 0.9}, 2: None, 3: {"test_accuracy": 0.8}})
    with pytest.raises(ModelNotFoundError, match=r"no validation scores.*results\.json"):
        resolve_model(run)  # several folds, test accuracies only
    with pytest.raises(ModelNotFoundError, match=r"fold_\*/model\.keras"):
        resolve_model(tmp_path)  # the models are one level deeper, under run/
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a .keras model file"):
        resolve_model(tmp_path / "notes.txt")
    # a killed run: its fold has no model yet, and the message says so
    killed = tmp_path / "killed"
    (killed / "fold_2").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match=r"fold_2 of this run did not finish .*rerun"):
        resolve_model(killed)
    # a pretraining run: its backbone
    shutil.copyfile(run_dir / "fold_1" / "model.keras", killed / "backbone.keras")
    assert resolve_model(killed).path == killed / "backbone.keras"


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def offset_clip(tmp_path_factory):
    """Exactly one clip of 16-bit audio with a DC offset of about 0.5 and clicks at -0.99
    every 16 samples: once the offset is removed the clicks lie near -1.5, so the model's
    clipping matters as well as its mean removal."""
    rng = np.random.default_rng(3)
    t = np.arange(CLIP) / RATE
    wave = 0.6 + 0.2 * np.sin(2 * np.pi * 440.0 * t) + 0.03 * rng.standard_normal(CLIP)
    wave[::16] = -0.99
    return _write(tmp_path_factory.mktemp("clip") / "offset.wav", wave)


def test_keras_savedmodel_tflite_and_predict_agree_on_one_clip(
    model, exports, saved_model, offset_clip
):
    import tensorflow as tf

    from src.predict import load_audio, predict_files

    wave, rate = sf.read(offset_clip, dtype="float32")  # what the file holds
    assert rate == RATE and wave.shape == (CLIP,)
    np.testing.assert_array_equal(load_audio(offset_clip, RATE), wave)  # predict's reader
    centred = wave - wave.mean()
    assert wave.mean() > 0.45 and centred.min() < -1.4

    keras_probs = _softmax(model(wave[None], training=False))[0]
    # The model removes the mean and clips, in numpy here: frontend + backbone agree...
    by_hand = np.clip(centred, -1.0, 1.0)[None]
    np.testing.assert_allclose(
        _softmax(model.backbone(model.frontend(by_hand), training=False))[0], keras_probs,
        atol=1e-6)
    # ...and on the file as it is (offset kept, nothing clipped) they would not.
    raw = _softmax(model.backbone(model.frontend(wave[None]), training=False))[0]
    unclipped = _softmax(model.backbone(model.frontend(centred[None]), training=False))[0]
    # Measured: 2.1e-3 and 2.4e-3, far above the agreement tolerance below.
    assert np.abs(raw - keras_probs).max() > 5e-4 and np.abs(unclipped - keras_probs).max() > 5e-4

    serve = _softmax(saved_model.serve(tf.constant(wave[None])).numpy())[0]
    clip_fn = saved_model.clip_probabilities(tf.constant(wave)).numpy()
    tflite = _softmax(_tflite_logits(exports["dir"] / "model.tflite", wave[None]))[0]
    (entry,) = predict_files(model, [offset_clip], top_k=3)
    assert entry["windows"] == 1
    # Measured: at most 1e-7 apart (TFLite 2e-8).
    for name, probs in (("serve", serve), ("clip_probabilities", clip_fn), ("tflite", tflite),
                        ("src.predict", _probs_of(entry, CLASSES))):
        np.testing.assert_allclose(probs, keras_probs, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def waveforms():
    rng = np.random.default_rng(2)
    return rng.uniform(-0.5, 0.5, (3, CLIP)).astype(np.float32)


def test_export_keras_and_savedmodel_match_the_model(
    run_dir, model, exports, saved_model, waveforms, tmp_path, capsys
):
    import tensorflow as tf

    from scripts.export import main as export_main
    from src.models import load_model

    ref = np.asarray(model(waveforms, training=False))

    assert export_main([str(run_dir), "--format", "keras", "--out", str(tmp_path / "m.keras")]) == 0
    reloaded = load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(reloaded(waveforms)), ref, atol=1e-5)
    assert export_main([str(run_dir / "fold_1" / "model.keras"), "--format", "keras",
                        "--out", str(run_dir / "fold_1" / "model.keras")]) == 2
    assert "is the model itself" in capsys.readouterr().err

    printed = exports["stdout"]
    assert str(exports["dir"] / "sm") in printed and f"(batch, {CLIP})" in printed
    np.testing.assert_allclose(np.asarray(saved_model.serve(tf.constant(waveforms))), ref,
                               atol=1e-5)
    sig = saved_model.signatures["serving_default"]
    out = sig(waveform=tf.constant(waveforms))["output_0"]
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    extra = exports["dir"] / "sm" / "assets.extra"
    assert (extra / "labels.txt").read_text().split() == CLASSES
    meta = json.loads((extra / "model.json").read_text())
    assert meta["probabilities"] == "softmax" and meta["multi_label"] is False
    assert meta["remove_mean_in_model"] is True and meta["class_names"] == CLASSES
    assert (meta["sample_rate"], meta["clip_samples"], meta["window_hop_samples"]) == (
        RATE, CLIP, HOP)


def test_savedmodel_clip_probabilities_use_predicts_windows(
    model, saved_model, audio_files
):
    """Several windows (the last one ending at the end), and a clip shorter than one
    window (zero-padded to the clip for this fixed-grid model)."""
    import tensorflow as tf

    from src.data.audio import read_audio
    from src.predict import predict_files

    for key in ("wav", "flac"):
        audio = read_audio(audio_files[key], RATE)
        samples, starts = HAND_STARTS[key]
        windows = np.stack([np.pad(audio[s:s + CLIP], (0, CLIP - len(audio[s:s + CLIP])))
                            for s in starts])
        expected = _softmax(model(windows, training=False)).mean(axis=0)
        got = saved_model.clip_probabilities(tf.constant(audio)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=key)
        (entry,) = predict_files(model, [audio_files[key]], top_k=3)
        np.testing.assert_allclose(_probs_of(entry, CLASSES), got, atol=1e-5, err_msg=key)


def test_export_tflite_matches_the_model(model, exports, waveforms):
    import tensorflow as tf

    out_path = exports["dir"] / "model.tflite"
    size = out_path.stat().st_size
    assert str(out_path) in exports["stdout"] and f"{size} bytes" in exports["stdout"]
    assert "builtins only" in exports["stdout"]  # the STFT converts to RFFT2D: no Flex ops
    assert (exports["dir"] / "model.labels.txt").read_text().split() == CLASSES
    meta = json.loads((exports["dir"] / "model.json").read_text())
    assert meta["probabilities"] == "softmax" and meta["clip_samples"] == CLIP

    interpreter = tf.lite.Interpreter(model_path=str(out_path))
    assert not [op["op_name"] for op in interpreter._get_ops_details()
                if op["op_name"].startswith("Flex")]
    assert list(interpreter.get_input_details()[0]["shape_signature"]) == [-1, CLIP]
    logits = _tflite_logits(out_path, waveforms)
    ref = np.asarray(model(waveforms, training=False))
    # TFLite computes the STFT with its own RFFT2D kernel and fuses ops differently:
    # measured max |error| 2.4e-7 on this model (logits of order 1); tolerance 1e-4.
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_export_tflite_refuses_a_model_tflite_cannot_run(tmp_path, capsys):
    from scripts.export import main as export_main
    from src.models.build import build_model

    model = build_model(
        TINY,
        {"n_mels": 32, "n_fft": 400},  # TFLite's RFFT2D only takes power-of-two lengths
        num_classes=3,
        clip_samples=CLIP,
    )
    model.save(tmp_path / "model.keras")
    out = tmp_path / "model.tflite"
    assert export_main([str(tmp_path / "model.keras"), "--format", "tflite", "--out", str(out)]) == 2
    assert "n_fft=400" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------- input length


@pytest.fixture(scope="module")
def variable_model(tmp_path_factory):
    """A model with a disentangled position embedding and patchout, fitted a little on 2 s
    clips, saved, loaded back and exported as a SavedModel."""
    import keras
    import tensorflow as tf

    from scripts.export import main as export_main
    from src.models import load_model
    from src.models.build import build_model

    keras.utils.set_random_seed(1)
    built = build_model(
        dict(TINY, pos_embedding="disentangled", patchout={"time": 2}), FRONTEND,
        num_classes=3, clip_samples=2 * RATE, class_names=CLASSES,
    )
    _fit_a_little(built, seed=1)
    d = tmp_path_factory.mktemp("variable")
    built.save(d / "model.keras")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = export_main([str(d / "model.keras"), "--format", "savedmodel",
                            "--out", str(d / "sm")])
    assert code == 0, err.getvalue()
    return {"model": load_model(d / "model.keras"), "sm": tf.saved_model.load(str(d / "sm")),
            "dir": d}


def test_a_disentangled_model_predicts_on_shorter_and_longer_files(variable_model, tmp_path):
    import tensorflow as tf

    from scripts.export import main as export_main
    from src.predict import min_input_samples, predict_files

    model, sm = variable_model["model"], variable_model["sm"]
    clip = model.clip_samples
    assert clip == 2 * RATE and model.backbone.hparams["pos_embedding"] == "disentangled"
    one = _write(tmp_path / "one.wav", _tone(1.0, freq=330.0, offset=0.2, seed=7))
    seven = _write(tmp_path / "seven.wav", _tone(7.0, freq=880.0, offset=-0.1, seed=8))
    short, long_ = predict_files(model, [one, seven], top_k=3, per_window=True)

    # 1 s: one window, given to the model as it is (not padded to the 2 s clip).
    wave, _ = sf.read(one, dtype="float32")
    unpadded = _softmax(model(wave[None], training=False))[0]
    padded = _softmax(model(np.pad(wave, (0, clip - len(wave)))[None], training=False))[0]
    assert np.abs(unpadded - padded).max() > 1e-4  # the check below tells them apart
    assert short["windows"] == 1 and short["duration_s"] == pytest.approx(1.0)
    np.testing.assert_allclose(_probs_of(short, CLASSES), unpadded, atol=1e-5)
    assert short["notes"] == ["1 s, shorter than the model's input of 2 s: the model takes it "
                              "as it is (the first time positions, no padding)"]
    np.testing.assert_allclose(sm.clip_probabilities(tf.constant(wave)).numpy(), unpadded,
                               atol=1e-5)
    # serve, and so TFLite, take it as it is too (any length from the least to the clip)
    np.testing.assert_allclose(_softmax(sm.serve(tf.constant(wave[None])).numpy())[0], unpadded,
                               atol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="longer than the clip the model"):
        sm.serve(tf.zeros((1, clip + 1)))
    meta = json.loads((variable_model["dir"] / "sm" / "assets.extra" / "model.json").read_text())
    assert meta["short_input"] == "as_is"
    assert meta["input_samples"] == [min_input_samples(model), clip]
    code = export_main([str(variable_model["dir"] / "model.keras"), "--format", "tflite",
                        "--out", str(tmp_path / "m.tflite")])
    assert code == 0
    np.testing.assert_allclose(
        _softmax(_tflite_logits(tmp_path / "m.tflite", wave[None]))[0], unpadded, atol=1e-5)

    # 7 s: windows of 2 s every second; 0..4 s end inside the file, then 5 s ends at its end.
    wave, _ = sf.read(seven, dtype="float32")
    starts = [0, 1, 2, 3, 4, 5]
    assert [w["start_s"] for w in long_["per_window"]] == pytest.approx(starts)
    windows = np.stack([wave[s * RATE:s * RATE + clip] for s in starts])
    expected = _softmax(model(windows, training=False)).mean(axis=0)
    np.testing.assert_allclose(_probs_of(long_, CLASSES), expected, atol=1e-5)
    np.testing.assert_allclose(sm.clip_probabilities(tf.constant(wave)).numpy(), expected,
                               atol=1e-5)

    # Shorter than one patch of frames (16 frames: 400 + 15 * 160 samples): zero-padded to
    # that, the least the model takes, by both predict and the SavedModel.
    assert min_input_samples(model) == 400 + 15 * 160
    tiny = _write(tmp_path / "tiny.wav", _tone(0.1, freq=500.0, offset=0.1, seed=9))
    wave, _ = sf.read(tiny, dtype="float32")
    expected = _softmax(model(np.pad(wave, (0, 2800 - len(wave)))[None], training=False))[0]
    (entry,) = predict_files(model, [tiny], top_k=3)
    assert entry["error"] is None and entry["duration_s"] == pytest.approx(0.1)
    np.testing.assert_allclose(_probs_of(entry, CLASSES), expected, atol=1e-5)
    assert entry["notes"][0].startswith("0.1 s, shorter than the model's input of 2 s: "
                                        "zero-padded to 0.175 s, the least the model takes")
    np.testing.assert_allclose(sm.clip_probabilities(tf.constant(wave)).numpy(), expected,
                               atol=1e-5)
    # serve and TFLite pad it in the graph (TFLite drops assertions, so no check there)
    np.testing.assert_allclose(_softmax(sm.serve(tf.constant(wave[None])).numpy())[0],
                               expected, atol=1e-5)
    np.testing.assert_allclose(
        _softmax(_tflite_logits(tmp_path / "m.tflite", wave[None]))[0], expected, atol=1e-5)


def test_a_grid_model_zero_pads_a_short_file(tmp_path):
    import keras

    from src.models.build import build_model
    from src.predict import min_input_samples, predict_files

    keras.utils.set_random_seed(2)
    model = build_model(TINY, FRONTEND, num_classes=3, clip_samples=2 * RATE,
                        class_names=CLASSES)
    assert min_input_samples(model) == 2 * RATE
    path = _write(tmp_path / "one.wav", _tone(1.0, freq=250.0, offset=0.3, seed=4))
    (entry,) = predict_files(model, [path], top_k=3)
    assert entry["windows"] == 1 and entry["duration_s"] == pytest.approx(1.0)

    # By hand: 1 s of zeros appended, then the model's mean removal (of the padded window)
    # and clipping, then the frontend and the backbone.
    wave, _ = sf.read(path, dtype="float32")
    x = np.concatenate([wave, np.zeros(RATE, np.float32)])
    x = np.clip(x - x.mean(), -1.0, 1.0)
    expected = _softmax(model.backbone(model.frontend(x[None]), training=False))[0]
    np.testing.assert_allclose(_probs_of(entry, CLASSES), expected, atol=1e-5)


def test_a_model_that_pads_its_features_sees_a_short_file_as_training_padded_it(tmp_path):
    """data.target_frames (AST): training zero-pads a short clip to the clip length (the
    store: frames of silence), then the model zero-pads the frames; predict, the
    SavedModel and the store's padding agree. An imported AST checkpoint
    (short_input="features") gets the file's own features zero-padded, as AST's code."""
    import keras
    import tensorflow as tf

    from scripts.export import main as export_main
    from src.data.pipeline import fit_frames_np
    from src.models import load_model
    from src.models.audio_transformer import AudioTransformer
    from src.models.build import build_model
    from src.predict import min_input_samples, predict_files

    keras.utils.set_random_seed(5)
    clip = RATE  # 1 s clips, features padded to twice their frames
    built = build_model(TINY, FRONTEND, num_classes=3, clip_samples=clip, class_names=CLASSES,
                        target_frames=2 * 98)
    _fit_a_little(built, seed=2)
    built.save(tmp_path / "model.keras")
    model = load_model(tmp_path / "model.keras")
    assert model.short_input == "clip" and min_input_samples(model) == clip
    path = _write(tmp_path / "short.wav", _tone(0.3, freq=700.0, offset=0.1, seed=3))
    wave, _ = sf.read(path, dtype="float32")
    (entry,) = predict_files(model, [path], top_k=3)
    padded = np.pad(wave, (0, clip - len(wave)))
    expected = _softmax(model(padded[None], training=False))[0]
    np.testing.assert_allclose(_probs_of(entry, CLASSES), expected, atol=1e-5)
    assert any("zero-padded" in note for note in entry["notes"])
    # The feature store's way: the clip's own frames, then frames of silence to the clip
    frames = model.frontend(np.clip(wave - wave.mean(), -1, 1)[None])[0].numpy()
    silence = float(model.frontend(np.zeros((1, clip), "float32"))[0, -1, 0])
    stored = fit_frames_np(frames, model.frontend.num_frames(clip), silence)
    stored = np.pad(stored, ((0, 2 * 98 - len(stored)), (0, 0)))  # the model's zero frames
    from_store = _softmax(model.backbone(stored[None], training=False))[0]
    # close, not equal: the store removes the mean of the clip, predict that of the window
    np.testing.assert_allclose(from_store, expected, atol=0.05)
    code = export_main([str(tmp_path / "model.keras"), "--format", "savedmodel", "--out",
                        str(tmp_path / "sm")])
    assert code == 0
    sm = tf.saved_model.load(str(tmp_path / "sm"))
    np.testing.assert_allclose(sm.clip_probabilities(tf.constant(wave)).numpy(), expected,
                               atol=1e-5)

    # The same weights as an imported AST checkpoint: the short file's features as they are
    imported = AudioTransformer.from_config({**model.get_config(), "short_input": "features"})
    imported.build((None, clip))
    imported.set_weights(model.get_weights())
    (entry,) = predict_files(imported, [path], top_k=3)
    unpadded = _softmax(imported(wave[None], training=False))[0]
    assert np.abs(unpadded - expected).max() > 1e-4  # the two are told apart
    np.testing.assert_allclose(_probs_of(entry, CLASSES), unpadded, atol=1e-5)
    assert entry["notes"] == ["0.3 s, shorter than the model's input of 1 s: its features "
                              "zero-padded to the model's 196 frames, as AST does"]


# --------------------------------------------------------------------------- multi-label

TAGS = ["dog", "rain", "siren", "speech"]


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    """A saved multi-label model whose head biases spread its sigmoids over (0, 1) (its
    kernel scaled down so that the biases dominate: about 0.88, 0.18, 0.65, 0.40)."""
    import keras

    from src.models.build import build_model

    keras.utils.set_random_seed(3)
    model = build_model(TINY, FRONTEND, num_classes=4, clip_samples=CLIP, class_names=TAGS,
                        multi_label=True)
    kernel, _ = model.backbone.classifier.get_weights()
    model.backbone.classifier.set_weights(
        [0.1 * kernel, np.array([2.0, -1.5, 0.6, -0.4], "float32")])
    path = tmp_path_factory.mktemp("tagger") / "model.keras"
    model.save(path)
    return path


def _run_main(argv, capsys):
    from src.predict import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_multi_label_model_reports_sigmoids_and_the_labels_above_thresholds(
    tagger, tmp_path, capsys
):
    from src.models import load_model

    path = _write(tmp_path / "street.wav", _tone(0.9, freq=600.0, offset=0.1, seed=6))
    wave, _ = sf.read(path, dtype="float32")
    model = load_model(tagger)
    assert model.multi_label is True
    assert len(wave) == 14400  # 0.9 s: windows at 0 and 0.25 s, then one ending at the end
    windows = np.stack([wave[:CLIP], wave[HOP:HOP + CLIP], wave[len(wave) - CLIP:]])
    p = _sigmoid(model(windows, training=False)).mean(axis=0)
    order = list(np.argsort(-p))
    gaps = np.diff(np.sort(p))
    assert gaps.min() > 0.05 and abs(p.sum() - 1.0) > 0.2, p  # distinct, not a softmax

    code, out, err = _run_main([tagger, f"audio={path}", "top_k=4", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["multi_label"] is True
    (entry,) = doc["files"]
    assert entry["windows"] == 3
    np.testing.assert_allclose(_probs_of(entry, TAGS), p, atol=1e-5)
    assert [t["label"] for t in entry["top"]] == [TAGS[i] for i in order]
    assert [t["label"] for t in entry["labels"]] == [TAGS[i] for i in order if p[i] >= 0.5]

    code, out, _ = _run_main([tagger, path, "top_k=2", "--json"], capsys)
    assert code == 0 and [t["label"] for t in json.loads(out)["files"][0]["top"]] == [
        TAGS[i] for i in order[:2]]

    # A global threshold between the 3rd and the 4th probability: the first three.
    middle = (p[order[2]] + p[order[3]]) / 2
    code, out, _ = _run_main([tagger, path, f"threshold={middle}", "--json"], capsys)
    assert [t["label"] for t in json.loads(out)["files"][0]["labels"]] == [
        TAGS[i] for i in order[:3]]

    # Per class, from a csv file: only the two least likely classes pass theirs.
    chosen = set(order[2:])
    thresholds = {TAGS[i]: (p[i] - 0.01 if i in chosen else p[i] + 0.01) for i in range(4)}
    csv = tmp_path / "thresholds.csv"
    csv.write_text("# class,threshold\n" + "".join(f"{c},{t}\n" for c, t in thresholds.items()))
    code, out, _ = _run_main([tagger, path, f"threshold={csv}", "--json"], capsys)
    assert code == 0
    assert [t["label"] for t in json.loads(out)["files"][0]["labels"]] == [
        TAGS[i] for i in order[2:]]

    # Per class, from a JSON object: the most and the least likely class.
    chosen = {order[0], order[3]}
    thresholds = {TAGS[i]: (p[i] - 0.01 if i in chosen else p[i] + 0.01) for i in range(4)}
    js = tmp_path / "thresholds.json"
    js.write_text(json.dumps(thresholds))
    code, out, _ = _run_main([tagger, path, f"threshold={js}", "--json"], capsys)
    assert code == 0
    assert [t["label"] for t in json.loads(out)["files"][0]["labels"]] == [
        TAGS[order[0]], TAGS[order[3]]]

    # The text report lists them too.
    code, out, _ = _run_main([tagger, path, f"threshold={js}"], capsys)
    assert code == 0 and "multi-label (sigmoid)" in out
    assert f"labels above threshold: {TAGS[order[0]]} (" in out


def test_a_thresholds_file_missing_a_class_is_an_error(tagger, tmp_path, capsys):
    path = _write(tmp_path / "clip.wav", _tone(0.5, seed=10))
    csv = tmp_path / "thresholds.csv"
    csv.write_text("dog,0.5\nrain,0.5\nsiren,0.5\n")
    code, out, err = _run_main([tagger, path, f"threshold={csv}", "--json"], capsys)
    assert code == 2 and out == ""
    assert str(csv) in err and "missing 1 of the model's 4 classes: 'speech'" in err
    js = tmp_path / "thresholds.json"
    js.write_text(json.dumps({"dog": 0.5, "rain": 0.5, "siren": 0.5, "speech": 0.5,
                              "cat": 0.5}))
    code, _, err = _run_main([tagger, path, f"threshold={js}"], capsys)
    assert code == 2 and "1 name(s) the model does not have: 'cat'" in err
    assert "missing 0" not in err and "classes:" not in err
    code, _, err = _run_main([tagger, path, "threshold=1.5"], capsys)
    assert code == 2 and "threshold='1.5': a probability threshold is between 0 and 1" in err
    js.write_text(json.dumps({"dog": 0.5, "rain": 0.5, "siren": -0.2, "speech": 0.5}))
    code, _, err = _run_main([tagger, path, f"threshold={js}"], capsys)
    assert code == 2 and "between 0 and 1; got siren=-0.2" in err
    code, _, err = _run_main([tagger, path, "threshold=often"], capsys)
    assert code == 2 and "neither a number nor a file" in err
    csv.write_text("dog,0.5\nrain,0.5\nsiren,0.5\nspeech,0.5\ndog,0.99\n")
    code, _, err = _run_main([tagger, path, f"threshold={csv}"], capsys)
    assert code == 2 and "line 5: 'dog' has a threshold already (line 1)" in err


# --------------------------------------------------------------------------- saved config


def _without_keys(src, dst, *keys):
    """Copy a .keras file with ``keys`` removed from the model's config (as a file saved
    before they existed)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                for key in keys:
                    assert key in config["config"], key
                    del config["config"][key]
                data = json.dumps(config).encode()
            zout.writestr(item, data)
    return dst


def test_remove_mean_is_stored_in_the_keras_file(tmp_path):
    import keras

    from src.models import load_model
    from src.models.build import build_model

    keras.utils.set_random_seed(4)
    model = build_model(TINY, FRONTEND, num_classes=3, clip_samples=CLIP, remove_mean=False)
    model.save(tmp_path / "kept.keras")
    x = np.random.default_rng(0).uniform(-0.3, 0.3, (2, CLIP)).astype("float32")
    shifted = x + np.float32(0.4)

    kept = load_model(tmp_path / "kept.keras")
    assert kept.remove_mean is False and kept.get_config()["remove_mean"] is False
    # The offset reaches the frontend: other logits.
    assert np.abs(np.asarray(kept(x)) - np.asarray(kept(shifted))).max() > 1e-3

    # A file saved before the key existed loads with the default: the mean is removed.
    old = load_model(_without_keys(tmp_path / "kept.keras", tmp_path / "old.keras",
                                   "remove_mean", "multi_label"))
    assert old.remove_mean is True and old.multi_label is False
    np.testing.assert_allclose(np.asarray(old(shifted)), np.asarray(old(x)), atol=1e-4)
    old.save(tmp_path / "resaved.keras")
    assert load_model(tmp_path / "resaved.keras").remove_mean is True


def test_a_float_file_with_an_infinite_sample_is_an_error_not_a_clipped_clip(tmp_path):
    """Clipping to [-1, 1] would turn +inf into a loud sample; the file is refused."""
    from src.predict import AudioReadError, read_blocks

    path = tmp_path / "inf.wav"
    samples = 0.1 * np.sin(np.arange(RATE) / 7.0)
    samples[100] = np.inf
    sf.write(path, samples, RATE, subtype="FLOAT")
    with pytest.raises(AudioReadError, match=r"inf\.wav: the file holds NaN or infinite"):
        list(read_blocks(str(path), RATE, 0.5))


def test_predict_notes_what_makes_labels_mean_less(model, run_dir, tmp_path, capsys):
    """Silence, zero-padding, clipping and conversions are said per file (as
    scripts.check_data says them for a dataset); a plain clip gets no note."""
    from src.predict import main, predict_files

    rng = np.random.default_rng(3)
    files = {
        "plain.wav": (0.1 * rng.standard_normal(CLIP), RATE, "PCM_16"),
        "silent.wav": (np.zeros(CLIP), RATE, "PCM_16"),
        "short.wav": (0.1 * rng.standard_normal(CLIP // 10), RATE, "PCM_16"),
        "loud.wav": (12.0 * np.sin(np.arange(CLIP) / 5.0), RATE, "FLOAT"),
        "stereo48k.flac": (0.1 * rng.standard_normal((3 * CLIP, 2)), 48000, "PCM_16"),
    }
    paths = []
    for name, (data, rate, subtype) in files.items():
        sf.write(tmp_path / name, data, rate, subtype=subtype)
        paths.append(tmp_path / name)
    notes = {Path(r["path"]).name: r["notes"] for r in predict_files(model, paths)}
    assert notes["plain.wav"] == []
    assert notes["silent.wav"] == ["silent (all zeros)"]
    (short,) = notes["short.wav"]
    assert short.startswith("0.05 s, shorter than the model's input of 0.5 s: zero-padded "
                            "(90% of what the model saw is padding)")
    (loud,) = notes["loud.wav"]
    assert loud.endswith("at or beyond full scale (clipped to [-1, 1]): the recording may be "
                         "distorted") and int(loud.split()[0]) > CLIP // 2
    assert notes["stereo48k.flac"] == ["48000 Hz, resampled to 16000 Hz",
                                       "2 channels, averaged to mono"]
    capsys.readouterr()
    assert main([str(run_dir), f"audio={paths[1]}"]) == 0
    assert "  note: silent (all zeros)" in capsys.readouterr().out
