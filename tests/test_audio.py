"""In-graph audio decoding. The resampling cases call tensorflow-io's compiled kernel, so
they also fail if that kernel does not load with the pinned TensorFlow."""

import numpy as np
import pytest
import soundfile as sf
import tensorflow as tf

from src.data.audio import decode_audio, read_wav_info

SR = 16000


def _pipeline(paths, sample_rate=SR, clip_samples=SR, remove_mean=False):
    ds = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
    ds = ds.map(lambda p: decode_audio(p, sample_rate, clip_samples, remove_mean=remove_mean))
    return [x.numpy() for x in ds]


def _write(path, data, sr):
    sf.write(path, data, sr, subtype="PCM_16")
    return path


def _pcm16(x):
    """What a PCM_16 round trip does to ``x``."""
    return np.round(np.clip(x, -1, 1 - 1 / 32768) * 32768) / 32768


@pytest.fixture
def noise(tmp_path):
    x = np.random.default_rng(0).uniform(-0.8, 0.8, SR).astype(np.float32)
    return x, _write(tmp_path / "noise.wav", x, SR)


def test_same_rate_roundtrip(noise):
    x, path = noise
    (y,) = _pipeline([path])
    assert y.dtype == np.float32 and y.shape == (SR,)
    np.testing.assert_allclose(y, x, atol=1 / 32768)


def test_static_shape_in_dataset(noise):
    _, path = noise
    ds = tf.data.Dataset.from_tensor_slices([str(path)]).map(lambda p: decode_audio(p, SR, 4000))
    assert ds.element_spec.shape.as_list() == [4000]
    ds = tf.data.Dataset.from_tensor_slices([str(path)]).map(lambda p: decode_audio(p, SR, None))
    assert ds.element_spec.shape.as_list() == [None]


def test_resample_44k_sine(tmp_path):
    sr_in, f = 44100, 440.0
    t = np.arange(sr_in) / sr_in
    path = _write(tmp_path / "sine44k.wav", 0.5 * np.sin(2 * np.pi * f * t), sr_in)
    assert read_wav_info(path) == (sr_in, 1, sr_in)

    (full,) = _pipeline([path], clip_samples=None)
    assert abs(len(full) - SR) <= 2  # 1 s of audio at 16 kHz
    (y,) = _pipeline([path], clip_samples=SR)
    assert y.shape == (SR,)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak_hz = np.argmax(spectrum) * SR / len(y)
    assert abs(peak_hz - f) <= 5.0
    # amplitude preserved away from the edges
    assert 0.45 < np.max(np.abs(y[1000:-1000])) < 0.55


def test_mixed_rates_in_one_pipeline(tmp_path):
    t16, t44 = np.arange(8000) / 16000, np.arange(22050) / 44100
    p16 = _write(tmp_path / "a.wav", 0.3 * np.sin(2 * np.pi * 1000 * t16), 16000)
    p44 = _write(tmp_path / "b.wav", 0.3 * np.sin(2 * np.pi * 1000 * t44), 44100)
    a, b = _pipeline([p16, p44], clip_samples=8000)
    np.testing.assert_allclose(a[500:-500], b[500:-500], atol=0.02)


def test_stereo_mixed_to_mono(tmp_path):
    x = np.random.default_rng(1).uniform(-0.5, 0.5, 4000)
    same = _write(tmp_path / "same.wav", np.stack([x, x], axis=1), SR)
    opposite = _write(tmp_path / "opposite.wav", np.stack([x, -x], axis=1), SR)
    left_only = _write(tmp_path / "left.wav", np.stack([x, np.zeros_like(x)], axis=1), SR)
    assert read_wav_info(same) == (SR, 2, 4000)
    y_same, y_opp, y_left = _pipeline([same, opposite, left_only], clip_samples=None)
    np.testing.assert_allclose(y_same, _pcm16(x), atol=1 / 32768)
    np.testing.assert_allclose(y_opp, 0.0, atol=1 / 32768)
    np.testing.assert_allclose(y_left, _pcm16(x) / 2, atol=1 / 32768)


def test_pad_and_crop(tmp_path):
    x = np.random.default_rng(2).uniform(-0.5, 0.5, 3000)
    path = _write(tmp_path / "short.wav", x, SR)
    padded, cropped, kept = (_pipeline([path], clip_samples=n)[0] for n in (5000, 1000, None))
    assert padded.shape == (5000,) and cropped.shape == (1000,) and kept.shape == (3000,)
    np.testing.assert_allclose(padded[:3000], _pcm16(x), atol=1 / 32768)
    assert not padded[3000:].any()
    np.testing.assert_allclose(cropped, _pcm16(x[:1000]), atol=1 / 32768)
    np.testing.assert_allclose(kept, padded[:3000])


def test_remove_mean(tmp_path):
    x = 0.3 + 0.2 * np.sin(2 * np.pi * 50 * np.arange(SR) / SR)
    path = _write(tmp_path / "dc.wav", x, SR)
    (raw,) = _pipeline([path])
    (centred,) = _pipeline([path], remove_mean=True)
    assert abs(raw.mean() - 0.3) < 1e-3
    assert abs(centred.mean()) < 1e-5
    np.testing.assert_allclose(centred, raw - raw.mean(), atol=1e-6)

    # the mean is taken over the signal, before zero padding
    (padded,) = _pipeline([path], clip_samples=2 * SR, remove_mean=True)
    np.testing.assert_allclose(padded[:SR], centred, atol=1e-6)
    assert not padded[SR:].any()


def test_eager_call(noise):
    x, path = noise
    y = decode_audio(tf.constant(str(path)), SR, 100)
    np.testing.assert_allclose(y.numpy(), x[:100], atol=1 / 32768)


@pytest.mark.parametrize(
    "name,fmt,subtype,rate",
    [
        ("pcm24.wav", "WAV", "PCM_24", 16000),
        ("float.wav", "WAV", "FLOAT", 16000),
        ("ext.wav", "WAVEX", "PCM_16", 16000),
        ("clip.flac", "FLAC", "PCM_16", 44100),
        ("clip.ogg", "OGG", "VORBIS", 22050),
    ],
)
def test_other_formats_decode_in_a_tf_data_pipeline(tmp_path, name, fmt, subtype, rate):
    # Decoded through soundfile inside the graph (tf.numpy_function), then resampled.
    t = np.arange(rate) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / name
    sf.write(path, x, rate, format=fmt, subtype=subtype)
    ds = tf.data.Dataset.from_tensor_slices([str(path)]).map(
        lambda p: decode_audio(p, 16000, 16000)
    )
    (y,) = [a.numpy() for a in ds]
    assert y.shape == (16000,) and np.isfinite(y).all()
    if rate == 16000 and subtype != "VORBIS":
        ref, _ = sf.read(path, dtype="float32")
        np.testing.assert_allclose(y, ref, atol=1e-4)
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * 16000 / len(y) - 440) <= 5
