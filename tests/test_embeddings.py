"""Embeddings: ``python -m scripts.embed`` and the HEAR 2021 API (``src.hear``), with tiny
real saved models. The HEAR checks are those of hearvalidator (types, shapes, dtypes,
timestamp spacing, sample rate, embedding sizes) plus lengths, batching and determinism."""

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import tensorflow as tf

RATE = 16000
CLIP = 8000  # 0.5 s clips at 16 kHz: windows of 0.5 s every 0.25 s
SMALL = {"embed_dim": 16, "num_heads": 2, "ff_dim": 32, "num_layers": 1}
HEAR_RATES = (16000, 22050, 32000, 44100, 48000)

# name -> (model config, frontend config, target_frames)
VARIANTS = {
    # post-norm blocks, [CLS] pooling, a fixed position grid (short sounds are zero-padded)
    "grid": (SMALL, {"n_mels": 32}, None),
    # pre-norm (final LayerNorm), PaSST-style position embedding: takes any length
    "disentangled": ({**SMALL, "norm_first": True, "pos_embedding": "disentangled",
                      "pooling": "mean"}, {"n_mels": 32}, None),
    # AST-style: Kaldi fbank, features zero-padded to 64 frames, overlapping patches, [DIST]
    "ast": ({**SMALL, "pooling": "cls_dist", "f_stride": 8, "t_stride": 8},
            {"name": "kaldi_fbank", "n_mels": 32}, 64),
}


def _build(name, seed=0, fit=False):
    import keras

    from src.models.build import build_model

    model_cfg, frontend_cfg, target_frames = VARIANTS[name]
    keras.utils.set_random_seed(seed)
    model = build_model(model_cfg, frontend_cfg, num_classes=3, clip_samples=CLIP,
                        class_names=["a", "b", "c"], target_frames=target_frames)
    if fit:  # two optimiser steps, so the weights are not just the initialisation
        frames = target_frames or model.frontend.num_frames(CLIP)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((8, frames, 32)).astype("float32")
        y = keras.ops.one_hot(rng.integers(0, 3, 8), 3)
        model.backbone.compile(optimizer=keras.optimizers.Adam(1e-2),
                               loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        model.backbone.fit(x, y, batch_size=4, epochs=1, verbose=0)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> path of a saved .keras waveform model."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name in VARIANTS:
        path = root / name / "model.keras"
        path.parent.mkdir()
        _build(name, fit=(name == "grid")).save(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def hear_models(saved):
    from src import hear

    return {name: hear.load_model(str(path)) for name, path in saved.items()}


def _noise(n_sounds, samples, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (n_sounds, samples)).astype(np.float32)


def _tone(seconds, rate=RATE, freq=440.0, seed=1):
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(rate * seconds))) / rate
    return 0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size) + 0.1


def _check_timestamps(emb, ts, n_sounds, samples, size, hop_ms=50.0):
    assert isinstance(emb, tf.Tensor) and isinstance(ts, tf.Tensor)
    assert emb.dtype == tf.float32 and ts.dtype == tf.float32
    steps = math.floor(samples * 1000.0 / RATE / hop_ms + 1e-9) + 1
    assert tuple(emb.shape) == (n_sounds, steps, size)
    assert tuple(ts.shape) == (n_sounds, steps)
    ts = ts.numpy()
    np.testing.assert_allclose(ts, np.broadcast_to(np.arange(steps) * hop_ms, ts.shape))
    if steps > 1:  # the validator: even spacing within 1e-3 ms, at most 50 ms
        diff = np.diff(ts, axis=1)
        assert np.all(np.abs(diff - diff.mean()) < 1e-3) and diff.mean() <= 50.0
    assert np.isfinite(emb.numpy()).all()


# --------------------------------------------------------------------------- HEAR API


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hear_api_as_the_validator_checks_it(hear_models, name):
    from src import hear

    model = hear_models[name]
    assert isinstance(model, tf.Module)
    for attr in ("sample_rate", "scene_embedding_size", "timestamp_embedding_size"):
        assert type(getattr(model, attr)) is int, attr
    assert model.sample_rate == RATE and model.sample_rate in HEAR_RATES
    assert model.scene_embedding_size == model.timestamp_embedding_size == SMALL["embed_dim"]

    # The validator's batches: 16 sounds of 2 s (timestamps), 8 of 3.74 s (scene); uniform
    # noise in [-1, 1] given as a tf.Tensor.
    audio = tf.constant(_noise(16, 2 * RATE))
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    _check_timestamps(emb, ts, 16, 2 * RATE, model.timestamp_embedding_size)

    samples = int(3.74 * RATE)
    scene = hear.get_scene_embeddings(tf.constant(_noise(8, samples, seed=1)), model)
    assert isinstance(scene, tf.Tensor) and scene.dtype == tf.float32
    assert tuple(scene.shape) == (8, model.scene_embedding_size)
    assert np.isfinite(scene.numpy()).all()
    # Different sounds, different embeddings.
    assert np.abs(scene.numpy()[0] - scene.numpy()[1]).max() > 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hear_any_length_batching_and_determinism(hear_models, name):
    from src import hear

    model = hear_models[name]
    # Shorter than one STFT frame, shorter than a window, one window, many windows.
    for samples in (100, 3000, CLIP, 12 * RATE + 123):
        audio = _noise(3, samples, seed=samples)
        emb, ts = hear.get_timestamp_embeddings(audio, model)  # numpy in
        _check_timestamps(emb, ts, 3, samples, model.timestamp_embedding_size)
        scene = hear.get_scene_embeddings(audio, model)
        assert tuple(scene.shape) == (3, model.scene_embedding_size)
        # Each sound of a batch gets what it gets alone, and twice the same.
        alone_emb, _ = hear.get_timestamp_embeddings(tf.constant(audio[1:2]), model)
        alone_scene = hear.get_scene_embeddings(tf.constant(audio[1:2]), model)
        np.testing.assert_allclose(alone_emb.numpy()[0], emb.numpy()[1], atol=1e-5)
        np.testing.assert_allclose(alone_scene.numpy()[0], scene.numpy()[1], atol=1e-5)
        again = hear.get_scene_embeddings(audio, model)
        np.testing.assert_array_equal(again.numpy(), scene.numpy())
    empty = hear.get_scene_embeddings(np.zeros((0, RATE), np.float32), model)
    assert tuple(empty.shape) == (0, model.scene_embedding_size)
    emb, ts = hear.get_timestamp_embeddings(np.zeros((0, RATE), np.float32), model)
    assert tuple(emb.shape) == (0, 21, model.timestamp_embedding_size)
    assert tuple(ts.shape) == (0, 21) and emb.dtype == ts.dtype == tf.float32


def test_hear_load_model_errors_and_other_rates(tmp_path):
    from src import hear
    from src.models.build import build_model

    with pytest.raises(ValueError, match="no default model"):
        hear.load_model()
    with pytest.raises(FileNotFoundError):
        hear.load_model(str(tmp_path / "missing.keras"))
    # A model trained at 8 kHz declares 16 kHz (a rate HEAR has) and resamples its input.
    model = build_model(SMALL, {"n_mels": 32, "sample_rate": 8000}, num_classes=3,
                        clip_samples=4000)
    model.save(tmp_path / "m8k.keras")
    wrapped = hear.load_model(str(tmp_path / "m8k.keras"))
    assert wrapped.sample_rate == 16000 and wrapped.model_sample_rate == 8000
    audio = _noise(2, 2 * RATE)
    emb, ts = hear.get_timestamp_embeddings(audio, wrapped)
    _check_timestamps(emb, ts, 2, 2 * RATE, 16)
    from src.data.audio import resample

    direct = wrapped.embedder.embed_arrays([resample(audio[0], 16000, 8000)])[0].scene
    scene = hear.get_scene_embeddings(audio, wrapped).numpy()
    np.testing.assert_allclose(scene[0], direct, atol=1e-5)


def _reference_columns(model, audio):
    """Patch columns ``(t, D)`` and their centre times (ms) of one window, computed here
    from the model's encode and the frontend's frame geometry (frames start at
    ``k * hop`` and span ``win`` samples; a column spans ``patch_size`` frames every
    ``t_stride``)."""
    backbone, pe = model.backbone, model.backbone.patch_embed
    tokens, _ = backbone.encode(model.features(audio[None].astype(np.float32)), training=False)
    tokens = np.asarray(tokens)[0, pe.num_prefix_tokens:]  # (f * t, D), frequency-major
    grid = tokens.reshape(pe.f_dim, -1, tokens.shape[-1])
    fe = model.frontend
    frames = np.arange(grid.shape[1]) * pe.t_stride + (pe.patch_size - 1) / 2.0
    centres_ms = (frames * fe.hop_samples + fe.win_samples / 2.0) * 1000.0 / fe.sample_rate
    return grid.mean(axis=0), centres_ms, grid


def test_one_window_embeddings_equal_the_models_encode(tmp_path, saved):
    """A file exactly one window long: its scene embedding is the mean of the patch tokens
    of the model's encode, and its timestamp embeddings interpolate the columns."""
    from scripts.embed import main
    from src.data.audio import read_audio
    from src.models import load_model

    folder = tmp_path / "audio"
    folder.mkdir()
    sf.write(folder / "one.wav", _tone(CLIP / RATE), RATE, subtype="PCM_16")
    out = tmp_path / "emb.npz"
    assert main([str(saved["grid"]), str(folder), "--out", str(out), "--timestamps",
                 "--hop-ms", "20", "--no-progress"]) == 0
    data = np.load(out)
    assert data["files"].tolist() == ["one.wav"]

    model = load_model(saved["grid"])
    audio = read_audio(folder / "one.wav", RATE)
    assert len(audio) == CLIP
    columns, centres, grid = _reference_columns(model, audio)
    tokens_mean = grid.reshape(-1, grid.shape[-1]).mean(axis=0)
    np.testing.assert_allclose(data["scene"][0], tokens_mean, atol=1e-5)
    # Not the [CLS] token the classifier reads; that one with --scene-pooling model.
    cls = np.asarray(model.backbone.encode(model.features(audio[None]), training=False)[0])[0, 0]
    assert np.abs(cls - tokens_mean).max() > 1e-3
    pooled = tmp_path / "pooled.npz"
    assert main([str(saved["grid"]), str(folder), "--out", str(pooled), "--scene-pooling",
                 "model", "--no-progress"]) == 0
    np.testing.assert_allclose(np.load(pooled)["scene"][0], cls, atol=1e-5)
    assert json.loads(str(np.load(pooled)["metadata"]))["scene_pooling"] == "model"

    times = data["timestamps_ms"]
    steps = math.floor(CLIP * 1000 / RATE / 20) + 1
    np.testing.assert_array_equal(data["timestamp_offsets"], [0, steps])
    np.testing.assert_allclose(times, np.arange(steps) * 20.0)
    expected = np.stack([np.interp(times, centres, columns[:, d])
                         for d in range(columns.shape[1])], axis=1)
    np.testing.assert_allclose(data["timestamp_embeddings"], expected, atol=1e-5)


def test_padding_columns_are_left_out(hear_models, saved):
    """AST pads its features (48 frames of audio to 64): the columns centred in the padding
    are not part of the embeddings; neither is the padding of a sound shorter than a
    window."""
    from src import hear
    from src.models import load_model

    model = load_model(saved["ast"])
    audio = _noise(1, CLIP, seed=5)
    columns, _, _ = _reference_columns(model, audio[0])
    frames = model.frontend.num_frames(CLIP)
    assert frames == 48 and columns.shape[0] == 7
    kept = (np.arange(7) * 8 + 7.5) < frames  # centre frame inside the audio: 6 columns
    assert kept.sum() == 6
    scene = hear.get_scene_embeddings(audio, hear_models["ast"]).numpy()[0]
    np.testing.assert_allclose(scene, columns[kept].mean(axis=0), atol=1e-5)

    # A 0.2 s sound in the grid model: zero-padded to the window, only its columns count.
    grid_model = load_model(saved["grid"])
    short = np.zeros(CLIP, np.float32)
    short[:3200] = _noise(1, 3200, seed=6)[0]
    columns, _, _ = _reference_columns(grid_model, short)
    # 3200 samples -> 18 frames; column centres at frames 7.5, 23.5, 39.5 -> 1 column
    scene = hear.get_scene_embeddings(short[None, :3200], hear_models["grid"]).numpy()[0]
    np.testing.assert_allclose(scene, columns[0], atol=1e-5)


def test_timestamps_stitch_windows_without_duplicates(hear_models):
    emb = hear_models["disentangled"].embedder
    seconds = 7.3
    result = emb.embed_arrays([_noise(1, int(seconds * RATE), seed=3)[0]], timestamps=True)[0]
    cols = result.column_times_ms
    window_ms, hop_ms = CLIP * 1000 / RATE, emb.hop * 1000 / RATE
    column_ms = emb.t_stride * emb.frontend.hop_samples * 1000 / RATE
    assert np.all(np.diff(cols) > 0)  # in order, no column twice
    # No gap wider than a window hop plus a column: every part of the file is covered.
    assert np.diff(cols).max() <= hop_ms + column_ms + 1e-6
    assert cols[0] < window_ms / 2 and cols[-1] > seconds * 1000 - window_ms / 2
    from src.data.windows import window_starts

    assert result.windows == len(window_starts(int(seconds * RATE), CLIP, CLIP // 2))
    assert result.duration_s == pytest.approx(seconds)


def test_hop_ms_is_at_most_50(hear_models, saved, folder, tmp_path, capsys):
    from scripts.embed import main
    from src.embeddings import Embedder

    model = hear_models["grid"].keras_model
    with pytest.raises(ValueError, match="at most 50"):
        Embedder(model, hop_ms=60)
    with pytest.raises(ValueError):
        Embedder(model, hop_ms=0)
    out = tmp_path / "x.npz"
    assert main([str(saved["grid"]), str(folder), "--out", str(out), "--hop-ms", "80",
                 "--no-progress"]) == 2
    assert "at most 50" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    (d / "sub").mkdir()
    sf.write(d / "long.wav", _tone(1.3), RATE, subtype="PCM_16")  # several windows
    sf.write(d / "sub" / "short.flac", _tone(0.2, 44100, 1000.0), 44100)  # resampled, short
    sf.write(d / "mid.ogg", _tone(0.7, 22050, 300.0), 22050, format="OGG", subtype="VORBIS")
    (d / "notes.wav").write_text("these are notes, not audio\n")  # unreadable
    sf.write(d / "silent.wav", np.zeros(0), RATE, subtype="PCM_16")  # a valid file, no samples
    (d / "readme.txt").write_text("not an audio extension: not listed\n")
    return d


def test_cli_embeds_a_folder_and_lists_the_bad_file(tmp_path, saved, folder, capsys):
    from scripts.embed import main

    out = tmp_path / "emb.npz"
    code = main([str(saved["grid"]), str(folder), "--out", str(out), "--timestamps",
                 "--batch-size", "3"])
    printed = capsys.readouterr()
    assert code == 1, printed.err  # two files could not be embedded
    assert "notes.wav" in printed.err and "silent.wav" in printed.err
    assert "embedded 3 of 5 file(s)" in printed.out
    data = np.load(out)  # no pickle needed
    assert data["files"].tolist() == ["long.wav", "mid.ogg", "sub/short.flac"]
    assert data["error_files"].tolist() == ["notes.wav", "silent.wav"]
    meta = json.loads(str(data["metadata"]))
    assert [e["file"] for e in meta["errors"]] == ["notes.wav", "silent.wav"]
    assert "cannot decode" in meta["errors"][0]["error"]
    assert "no audio samples" in meta["errors"][1]["error"]
    assert meta["sample_rate"] == RATE and meta["embedding_size"] == 16
    assert meta["hop_ms"] == 50.0 and meta["window_s"] == 0.5
    np.testing.assert_allclose(data["duration_s"], [1.3, 0.7, 0.2], atol=2e-3)
    scene = data["scene"]
    assert scene.shape == (3, 16) and scene.dtype == np.float32 and np.isfinite(scene).all()
    off = data["timestamp_offsets"]
    steps = [math.floor(s * 1000 / 50 + 1e-6) + 1 for s in data["duration_s"]]
    np.testing.assert_array_equal(np.diff(off), steps)
    assert data["timestamp_embeddings"].shape == (off[-1], 16)
    for i in range(3):
        np.testing.assert_allclose(data["timestamps_ms"][off[i]:off[i + 1]],
                                   np.arange(steps[i]) * 50.0)

    # The same numbers as the HEAR API on the decoded audio (one implementation).
    from src import hear
    from src.data.audio import read_audio

    model = hear.load_model(str(saved["grid"]))
    for i, name in enumerate(data["files"]):
        audio = read_audio(folder / name, RATE)[None]
        np.testing.assert_allclose(hear.get_scene_embeddings(audio, model).numpy()[0],
                                   scene[i], atol=1e-5)
        emb, _ = hear.get_timestamp_embeddings(audio, model)
        np.testing.assert_allclose(emb.numpy()[0],
                                   data["timestamp_embeddings"][off[i]:off[i + 1]], atol=1e-5)


def test_cli_npy_and_parquet_outputs(tmp_path, saved, folder):
    from scripts.embed import _pyarrow, main

    out = tmp_path / "emb.npy"
    assert main([str(saved["grid"]), str(folder), "--out", str(out), "--timestamps",
                 "--no-progress"]) == 1
    side = json.loads((tmp_path / "emb.json").read_text())
    assert side["files"] == ["long.wav", "mid.ogg", "sub/short.flac"]
    assert [e["file"] for e in side["metadata"]["errors"]] == ["notes.wav", "silent.wav"]
    assert np.load(out).shape == (3, 16)
    off = np.load(tmp_path / "emb.timestamp_offsets.npy")
    assert np.load(tmp_path / "emb.timestamp_embeddings.npy").shape == (off[-1], 16)

    parquet = tmp_path / "emb.parquet"
    code = main([str(saved["grid"]), str(folder), "--out", str(parquet), "--no-progress"])
    pa = _pyarrow()
    if pa is None:  # pyarrow is optional: a clear refusal, nothing written
        assert code == 2 and not parquet.exists()
    else:
        assert code == 1
        table = pa.parquet.read_table(parquet)
        assert table.column("file").to_pylist() == side["files"]
        assert "notes.wav" in table.schema.metadata[b"embeddings"].decode()


def test_cli_embeds_one_file_and_refuses_a_format_its_name_contradicts(tmp_path, saved,
                                                                       folder, capsys):
    from scripts.embed import main

    one = folder / "long.wav"
    out = tmp_path / "one.npz"
    assert main([str(saved["grid"]), str(one), "--out", str(out), "--no-progress"]) == 0
    data = np.load(out)
    assert list(data["files"]) == ["long.wav"] and data["scene"].shape == (1, 16)
    capsys.readouterr()
    bad = tmp_path / "x.npz"
    assert main([str(saved["grid"]), str(one), "--out", str(bad), "--format", "npy"]) == 2
    assert "--format npy but --out" in capsys.readouterr().err and not bad.exists()


def test_cli_long_file_in_bounded_memory(tmp_path, saved):
    """An 8-minute file: the embedder holds a few blocks of windows (about 2 MB here,
    whatever the length), not the 31 MB of decoded samples."""
    from src.embeddings import Embedder
    from src.models import load_model

    seconds = 480
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", RATE, 1, subtype="PCM_16") as f:
        for _ in range(seconds // 10):
            f.write(0.3 * rng.standard_normal(10 * RATE))
    sf.write(tmp_path / "warm.wav", _tone(3.0), RATE, subtype="PCM_16")
    decoded_bytes = seconds * RATE * 4  # float32
    embedder = Embedder(load_model(saved["grid"]), batch_size=8)
    # Import and trace outside the measurement.
    list(embedder.embed_files([("warm", tmp_path / "warm.wav")], timestamps=True))
    tracemalloc.start()
    try:
        (result,) = list(embedder.embed_files([("long.wav", path)], timestamps=True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.error is None and result.duration_s == pytest.approx(seconds)
    assert result.windows == 1 + math.ceil((seconds * RATE - CLIP) / (CLIP // 2))
    assert result.embeddings.shape == (seconds * 20 + 1, 16)
    assert peak < decoded_bytes / 8, (peak, decoded_bytes)


def test_bare_backbone_needs_its_run_config(tmp_path, saved):
    from src.embeddings import EmbeddingModelError, load_embedding_model
    from src.models import load_model

    full = load_model(saved["disentangled"])
    run = tmp_path / "pretrain_run"
    run.mkdir()
    full.backbone.save(run / "backbone.keras")
    with pytest.raises(EmbeddingModelError, match="frontend"):
        load_embedding_model(run / "backbone.keras")
    # The run's resolved config (what training writes as config.yaml) gives the frontend.
    (run / "config.yaml").write_text(
        "data:\n  sample_rate: 16000\n  clip_seconds: 0.5\n  remove_mean: true\n"
        "frontend:\n  name: logmel\n  sample_rate: 16000\n  n_mels: 32\n"
    )
    model, path = load_embedding_model(run / "backbone.keras")
    assert path == run / "backbone.keras"
    from src.embeddings import Embedder

    audio = _noise(1, 3 * RATE, seed=9)[0]
    got = Embedder(model).embed_arrays([audio], timestamps=True)[0]
    ref = Embedder(full).embed_arrays([audio], timestamps=True)[0]
    np.testing.assert_allclose(got.scene, ref.scene, atol=1e-5)
    np.testing.assert_allclose(got.embeddings, ref.embeddings, atol=1e-5)
    # A config whose frontend does not fit the backbone is refused, naming both shapes.
    bad = tmp_path / "other"
    bad.mkdir()
    (bad / "config.yaml").write_text(
        "data:\n  sample_rate: 16000\n  clip_seconds: 0.5\n"
        "frontend:\n  name: logmel\n  n_mels: 64\n"
    )
    with pytest.raises(EmbeddingModelError, match="mel bins"):
        load_embedding_model(run / "backbone.keras", config=bad)


def test_imported_ast_embeds_and_imported_deit_backbone_is_refused(tmp_path, capsys):
    """Models from ``scripts.import_weights`` (the small random checkpoints of
    tests/fixtures): an AST embeds as trained models do; a DeiT backbone has no frontend."""
    from scripts import import_weights
    from scripts.embed import main
    from src.data.audio import read_audio
    from src.models import load_model

    fixtures = Path(__file__).resolve().parent / "fixtures"
    ast, deit = tmp_path / "ast.keras", tmp_path / "deit.keras"
    assert import_weights.main(["--from", "hf-ast", str(fixtures / "hf_ast"), "--out",
                                str(ast)]) == 0
    assert import_weights.main(["--from", "hf-deit", str(fixtures / "hf_deit"), "--out",
                                str(deit)]) == 0
    folder = tmp_path / "audio"
    folder.mkdir()
    (folder / "clip.wav").write_bytes((fixtures / "hf_ast" / "clip.wav").read_bytes())
    capsys.readouterr()

    out = tmp_path / "ast.npz"
    assert main([str(ast), str(folder), "--out", str(out), "--timestamps",
                 "--no-progress"]) == 0
    data = np.load(out)
    model = load_model(ast)
    audio = read_audio(folder / "clip.wav", RATE)  # 5 s: one window, features padded
    tokens, _ = model.backbone.encode(model.features(audio[None]), training=False)
    prefix = model.backbone.patch_embed.num_prefix_tokens  # [CLS] and [DIST]
    np.testing.assert_allclose(data["scene"][0], np.asarray(tokens)[0, prefix:].mean(axis=0),
                               atol=1e-4)
    assert data["timestamp_embeddings"].shape == (101, 64)  # 0, 50, ..., 5000 ms

    assert main([str(deit), str(folder), "--out", str(tmp_path / "deit.npz"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bare SpectrogramTransformer" in err and "--config" in err
