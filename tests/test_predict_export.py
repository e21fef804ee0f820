"""Prediction on audio files and model export, with a tiny real saved model."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
CLIP = 8000  # 0.5 s clips at 16 kHz
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir as training writes it: config.yaml, results.json, fold_1/model.keras."""
    import keras

    from src.models.build import build_model

    keras.utils.set_random_seed(0)
    model = build_model(
        {"embed_dim": 16, "num_heads": 2, "ff_dim": 32, "num_layers": 1},
        {"n_mels": 32},
        num_classes=3,
        clip_samples=CLIP,
        class_names=CLASSES,
    )
    # Two optimiser steps on random features so the weights are not just the initialisation.
    frames = model.frontend.num_frames(CLIP)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, frames, 32)).astype("float32")
    y = keras.ops.one_hot(rng.integers(0, 3, 8), 3)
    model.backbone.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    model.backbone.fit(x, y, batch_size=4, epochs=1, verbose=0)

    root = tmp_path_factory.mktemp("runs") / "toy" / "model.num_heads=2"
    (root / "fold_1").mkdir(parents=True)
    model.save(root / "fold_1" / "model.keras")
    (root / "results.json").write_text(json.dumps({"per_fold": [{"fold": 1, "accuracy": 0.9}]}))
    (root / "config.yaml").write_text("data:\n  remove_mean: true\n")
    return root


@pytest.fixture(scope="module")
def model(run_dir):
    from src.models import load_model

    return load_model(run_dir / "fold_1" / "model.keras")


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(1)

    def tone(rate, seconds, freq):
        t = np.arange(int(round(rate * seconds))) / rate
        return (0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size) + 0.1)

    files = {
        "wav": d / "long.wav",  # 1.3 s, 16-bit PCM at the model's rate: several windows
        "flac": d / "short.flac",  # 0.2 s at 44.1 kHz: resampled, shorter than one window
        "ogg": d / "mid.ogg",  # 0.7 s Vorbis at 22.05 kHz: resampled, two windows
        "bad": d / "notes.wav",  # text named .wav
    }
    sf.write(files["wav"], tone(RATE, 1.3, 440.0), RATE, subtype="PCM_16")
    sf.write(files["flac"], tone(44100, 0.2, 1000.0), 44100, subtype="PCM_16")
    sf.write(files["ogg"], tone(22050, 0.7, 300.0), 22050, format="OGG", subtype="VORBIS")
    files["bad"].write_text("these are notes, not audio\n")
    return files


def _expected_windows(samples, window=CLIP, hop=CLIP // 2):
    return 1 if samples <= window else 1 + math.ceil((samples - window) / hop)


def _reference_probs(model, path):
    """Mean softmax over windows cut here with numpy (0.5 s windows, 0.25 s hop)."""
    import tensorflow as tf

    from src.data.audio import decode_audio

    audio = np.asarray(decode_audio(tf.constant(str(path)), RATE, None, remove_mean=True))
    hop = CLIP // 2
    starts = range(0, max(len(audio) - CLIP, 0) + hop, hop) if len(audio) > CLIP else [0]
    windows = np.zeros((len(starts), CLIP), np.float32)
    for i, s in enumerate(starts):
        piece = audio[s : s + CLIP]
        windows[i, : len(piece)] = piece
    logits = np.asarray(model(windows, training=False), np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).mean(axis=0), len(audio), len(starts)


def test_predict_files_matches_independent_window_average(model, audio_files):
    from src.predict import predict_files

    paths = [audio_files[k] for k in ("wav", "flac", "ogg", "bad")]
    results = predict_files(model, paths, top_k=3, per_window=True, remove_mean=True)
    assert [r["path"] for r in results] == [str(p) for p in paths]

    # 1.3 s = 20800 samples, 0.5 s windows every 0.25 s: starts 0, .25, .5, .75, 1.0 -> 5
    # (the last one zero-padded); 0.2 s -> 1 (padded); 0.7 s = 11200 samples -> 2.
    expected = {"wav": (1.3, 5), "flac": (0.2, 1), "ogg": (0.7, 2)}
    for key, result in zip(("wav", "flac", "ogg"), results[:3]):
        seconds, windows = expected[key]
        assert result["error"] is None, result
        assert result["duration_s"] == pytest.approx(seconds, abs=2e-3)
        assert result["windows"] == windows == _expected_windows(round(seconds * RATE))
        assert len(result["per_window"]) == windows
        assert [w["start_s"] for w in result["per_window"]] == pytest.approx(
            [0.25 * i for i in range(windows)]
        )
        probs = {t["label"]: t["prob"] for t in result["top"]}
        assert sorted(probs) == CLASSES
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert [t["prob"] for t in result["top"]] == sorted(probs.values(), reverse=True)

        ref, samples, ref_windows = _reference_probs(model, paths[list(expected).index(key)])
        assert ref_windows == windows and samples == round(seconds * RATE)
        np.testing.assert_allclose([probs[c] for c in CLASSES], ref, atol=1e-5)

    bad = results[3]
    assert bad["error"] is not None and str(audio_files["bad"]) in bad["error"]
    assert bad["top"] == [] and bad["windows"] == 0

    top1 = predict_files(model, paths[:1], top_k=1)[0]
    assert len(top1["top"]) == 1 and top1["per_window"] is None
    assert top1["top"][0] == results[0]["top"][0]


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
    assert doc["model"] == str(run_dir / "fold_1" / "model.keras")
    files = {Path(f["path"]).name: f for f in doc["files"]}
    assert list(files) == ["long.wav", "short.flac", "notes.wav", "mid.ogg"]
    for name, windows in (("long.wav", 5), ("short.flac", 1), ("mid.ogg", 2)):
        assert files[name]["error"] is None
        assert files[name]["windows"] == windows == len(files[name]["per_window"])
        assert len(files[name]["top"]) == 2
    assert "notes.wav" in files["notes.wav"]["error"]
    assert "notes.wav" in out.stderr


def test_resolve_model_picks_best_fold_and_names_what_it_looked_for(run_dir, tmp_path):
    from src.predict import ModelNotFoundError, resolve_model, run_remove_mean

    resolved = resolve_model(run_dir)
    assert resolved.path == run_dir / "fold_1" / "model.keras" and resolved.fold == 1
    assert run_remove_mean(resolved) is True
    assert resolve_model(run_dir / "fold_1").run_dir == run_dir

    run = tmp_path / "run"
    for fold in (1, 2, 3):
        (run / f"fold_{fold}").mkdir(parents=True)
        shutil.copyfile(run_dir / "fold_1" / "model.keras", run / f"fold_{fold}" / "model.keras")
    with pytest.raises(ModelNotFoundError, match="results.json"):
        resolve_model(run)  # several folds, no accuracies
    per_fold = [{"fold": 1, "accuracy": 0.7}, {"fold": 2, "accuracy": 0.8},
                {"fold": 3, "accuracy": 0.75}]
    (run / "results.json").write_text(json.dumps({"per_fold": per_fold}))
    (run / "config.yaml").write_text("data:\n  remove_mean: false\n")
    best = resolve_model(run)
    assert best.fold == 2 and best.path == run / "fold_2" / "model.keras"
    assert run_remove_mean(best) is False

    with pytest.raises(ModelNotFoundError, match=r"fold_\*/model\.keras"):
        resolve_model(tmp_path)  # the models are one level deeper, under run/
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing")


@pytest.fixture(scope="module")
def waveforms():
    rng = np.random.default_rng(2)
    return rng.uniform(-0.5, 0.5, (3, CLIP)).astype(np.float32)


def test_export_keras_and_savedmodel_match_the_model(run_dir, model, waveforms, tmp_path, capsys):
    import tensorflow as tf

    from scripts.export import main as export_main
    from src.models import load_model

    ref = np.asarray(model(waveforms, training=False))

    assert export_main([str(run_dir), "--format", "keras", "--out", str(tmp_path / "m.keras")]) == 0
    reloaded = load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(reloaded(waveforms)), ref, atol=1e-5)

    assert export_main([str(run_dir / "fold_1"), "--format", "savedmodel",
                        "--out", str(tmp_path / "sm")]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "sm") in printed and f"(batch, {CLIP})" in printed
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    np.testing.assert_allclose(np.asarray(loaded.serve(tf.constant(waveforms))), ref, atol=1e-5)
    sig = loaded.signatures["serving_default"]
    out = sig(waveform=tf.constant(waveforms))["output_0"]
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    labels = (tmp_path / "sm" / "assets.extra" / "labels.txt").read_text().split()
    assert labels == CLASSES


def test_export_tflite_cli_matches_the_model(run_dir, model, waveforms, tmp_path):
    import tensorflow as tf

    out_path = tmp_path / "model.tflite"
    out = subprocess.run(
        [sys.executable, "-m", "scripts.export", str(run_dir), "--format", "tflite",
         "--out", str(out_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    size = out_path.stat().st_size
    assert str(out_path) in out.stdout and f"{size} bytes" in out.stdout
    assert "builtins only" in out.stdout  # the STFT converts to TFLite's RFFT2D: no Flex ops
    assert (tmp_path / "model.labels.txt").read_text().split() == CLASSES

    interpreter = tf.lite.Interpreter(model_path=str(out_path))
    assert not [op["op_name"] for op in interpreter._get_ops_details()
                if op["op_name"].startswith("Flex")]
    inp = interpreter.get_input_details()[0]
    assert list(inp["shape_signature"]) == [-1, CLIP]
    interpreter.resize_tensor_input(inp["index"], list(waveforms.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], waveforms)
    interpreter.invoke()
    logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    ref = np.asarray(model(waveforms, training=False))
    # TFLite computes the STFT with its own RFFT2D kernel and fuses ops differently:
    # measured max |error| 9.5e-7 on this model (logits of order 1); tolerance 1e-4.
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_export_tflite_refuses_a_model_tflite_cannot_run(tmp_path, capsys):
    from scripts.export import main as export_main
    from src.models.build import build_model

    model = build_model(
        {"embed_dim": 16, "num_heads": 2, "ff_dim": 32, "num_layers": 1},
        {"n_mels": 32, "n_fft": 400},  # TFLite's RFFT2D only takes power-of-two lengths
        num_classes=3,
        clip_samples=CLIP,
    )
    model.save(tmp_path / "model.keras")
    out = tmp_path / "model.tflite"
    assert export_main([str(tmp_path / "model.keras"), "--format", "tflite", "--out", str(out)]) == 2
    assert "n_fft=400" in capsys.readouterr().err
    assert not out.exists()
