"""Audio decoding and resampling: ``read_audio`` / ``decode_audio`` / ``read_audio_blocks`` on
generated files, and the resampler's accuracy against float64 sinusoids computed at the
target rate (not against another resampler)."""

import math

import numpy as np
import pytest
import soundfile as sf
import tensorflow as tf
from scipy.signal import resample_poly

from src.data.audio import (
    AudioDecodeError,
    decode_audio,
    read_audio,
    read_audio_blocks,
    read_wav_info,
    resample,
)

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
        ("u8.wav", "WAV", "PCM_U8", 16000),
        ("ulaw.wav", "WAV", "ULAW", 16000),
        ("clip.aiff", "AIFF", "PCM_16", 16000),
        ("clip.mp3", "MP3", "MPEG_LAYER_III", 44100),
    ],
)
def test_other_formats_decode_in_a_tf_data_pipeline(tmp_path, name, fmt, subtype, rate):
    # Decoded through soundfile inside the graph (tf.numpy_function), then resampled.
    if fmt == "MP3" and "MP3" not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} has no MP3 support")
    t = np.arange(rate) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / name
    sf.write(path, x, rate, format=fmt, subtype=subtype)
    ds = tf.data.Dataset.from_tensor_slices([str(path)]).map(
        lambda p: decode_audio(p, 16000, 16000)
    )
    (y,) = [a.numpy() for a in ds]
    assert y.shape == (16000,) and np.isfinite(y).all()
    if rate == 16000:  # same numbers as libsndfile's own float conversion
        ref, _ = sf.read(path, dtype="float32")
        np.testing.assert_allclose(y, ref, atol=1e-7)
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * 16000 / len(y) - 440) <= 5


# ------------------------------------------------------------------ resampler accuracy

PAIRS = [(44100, 16000), (48000, 16000), (22050, 16000), (8000, 16000), (32000, 16000)]
# Skipped at both ends: the filters' responses to the signal's start and end.
EDGE_S = 0.25


def _tones(rate, seconds, freqs, amps, phases):
    """Sum of sinusoids sampled at ``rate``, computed in float64."""
    t = np.arange(round(rate * seconds)) / rate
    return (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0)


def _inband_error_db(rate_in, rate_out, resampler, seed=0, seconds=2.0, count=12,
                     freqs=None):
    """Error / signal (dB) of ``resampler`` on a sum of sinusoids below 0.9 x the lower
    Nyquist frequency (``count`` random ones, the first at exactly that edge, or
    ``freqs``), against the same sum computed at ``rate_out``, on the middle part of the
    signal."""
    rng = np.random.default_rng(seed)
    top = 0.9 * min(rate_in, rate_out) / 2
    if freqs is None:
        freqs = rng.uniform(20.0, top, count)
        freqs[0] = top
    freqs = np.asarray(freqs, np.float64)
    assert freqs.max() <= top
    amps = rng.uniform(0.2, 1.0, len(freqs))
    amps *= 0.9 / amps.sum()  # peak below 0.9: nothing is clipped
    phases = rng.uniform(0, 2 * np.pi, len(freqs))
    x = _tones(rate_in, seconds, freqs, amps, phases)
    ref = _tones(rate_out, seconds, freqs, amps, phases)
    y = np.asarray(resampler(x, rate_in, rate_out), np.float64)
    assert abs(len(y) - len(ref)) <= 1
    n, edge = min(len(y), len(ref)), int(EDGE_S * rate_out)
    err, ref = y[edge:n - edge] - ref[edge:n - edge], ref[edge:n - edge]
    return 10 * np.log10(np.sum(err**2) / np.sum(ref**2))


def _alias_db(rate_in, rate_out, resampler, freq, seconds=1.0):
    """Output power relative to the input's for a tone at ``freq`` (above rate_out / 2)."""
    x = 0.5 * np.sin(2 * np.pi * freq * np.arange(round(rate_in * seconds)) / rate_in + 0.1)
    y = np.asarray(resampler(x, rate_in, rate_out), np.float64)
    edge = int(EDGE_S * rate_out)
    return 10 * np.log10(np.mean(y[edge:-edge] ** 2) / np.mean(x**2))


def _project_resample(x, rate_in, rate_out):
    return resample(x.astype(np.float32), rate_in, rate_out)


def _linear(x, rate_in, rate_out):
    n = round(len(x) * rate_out / rate_in)
    return np.interp(np.arange(n) * rate_in / rate_out, np.arange(len(x)), x)


def _scipy_poly(x, rate_in, rate_out):  # scipy's default Kaiser-windowed polyphase filter
    g = math.gcd(rate_in, rate_out)
    return resample_poly(x, rate_out // g, rate_in // g)


@pytest.mark.parametrize("rate_in,rate_out", PAIRS)
def test_inband_error_against_analytic_signal(tmp_path, rate_in, rate_out):
    # Measured: -110 dB (44.1, 22.05 kHz), -130 dB (48, 32 kHz), -128 dB (8 kHz up).
    def through_a_file(x, r_in, r_out):  # the reader the pipeline runs, on a float WAV
        path = tmp_path / f"tones_{r_in}.wav"
        sf.write(path, x.astype(np.float32), r_in, subtype="FLOAT")
        return read_audio(path, r_out)

    for seed in (0, 1):
        assert _inband_error_db(rate_in, rate_out, _project_resample, seed) < -90
        assert _inband_error_db(rate_in, rate_out, through_a_file, seed) < -90
    # One tone at a time, up to the band edge, where a filter's roll-off shows first
    # (measured: -106 dB at worst, at 44.1 and 22.05 kHz).
    nyquist = min(rate_in, rate_out) / 2
    for frac in (0.05, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9):
        tone = [frac * nyquist]
        assert _inband_error_db(rate_in, rate_out, _project_resample, freqs=tone) < -90


@pytest.mark.parametrize("rate_in,rate_out", [p for p in PAIRS if p[0] > p[1]])
def test_tones_above_the_target_nyquist_are_rejected(rate_in, rate_out):
    # Measured over 25 tones from rate_out / 2 to 0.98 x rate_in / 2: -117 to -145 dB.
    freqs = np.linspace(rate_out / 2, 0.98 * rate_in / 2, 25)
    worst = max(_alias_db(rate_in, rate_out, _project_resample, f) for f in freqs)
    assert worst < -110


@pytest.mark.parametrize("rate_in,rate_out", PAIRS)
def test_accuracy_checks_fail_for_weaker_resamplers(rate_in, rate_out):
    # The same measurements on common resamplers: each check above can fail.
    assert _inband_error_db(rate_in, rate_out, _scipy_poly) > -40  # measured -30 dB
    if rate_in % rate_out and rate_out % rate_in:  # not an integer ratio
        assert _inband_error_db(rate_in, rate_out, _linear) > -40  # measured -8 to -25 dB
    if rate_in > rate_out:
        assert _alias_db(rate_in, rate_out, _linear, 0.6 * rate_in / 2) > -40


def test_resample_length_dtype_and_identity():
    x = np.random.default_rng(3).uniform(-0.5, 0.5, 1003).astype(np.float32)
    y = resample(x, 44100, 16000)
    assert y.dtype == np.float32 and len(y) == round(1003 * 16000 / 44100)
    assert resample(x.astype(np.float64), 44100, 16000).dtype == np.float64
    assert resample(x, 16000, 16000) is x
    stereo = resample(np.stack([x, -x], axis=1), 44100, 16000)
    np.testing.assert_allclose(stereo, np.stack([y, -y], axis=1), atol=1e-6)
    with pytest.raises(TypeError, match="float32 or float64"):
        resample(x.astype(np.int16), 44100, 16000)


# ------------------------------------------------------------------------ read_audio


def _wav44(tmp_path, seconds=3.0, channels=1, name="a44.wav", subtype="PCM_16"):
    rng = np.random.default_rng(4)
    x = 0.3 * rng.standard_normal((round(44100 * seconds), channels)) + 0.05
    path = tmp_path / name
    sf.write(path, x, 44100, subtype=subtype)
    return path


@pytest.mark.parametrize("rate", [16000, 44100])
def test_decode_audio_is_read_audio_in_the_graph(tmp_path, rate):
    path = _wav44(tmp_path, channels=2)
    for clip, mean in [(None, False), (20000, True), (200000, True)]:
        ref = read_audio(path, rate, clip_samples=clip, remove_mean=mean)
        (graph,) = _pipeline([path], sample_rate=rate, clip_samples=clip, remove_mean=mean)
        eager = decode_audio(tf.constant(str(path)), rate, clip, remove_mean=mean).numpy()
        np.testing.assert_array_equal(graph, ref)
        np.testing.assert_array_equal(eager, ref)
        assert ref.dtype == np.float32 and np.abs(ref).max() <= 1.0


def test_read_audio_semantics(tmp_path):
    path = _wav44(tmp_path, seconds=1.0)
    full = read_audio(path, 16000)
    assert full.shape == (16000,) and full.dtype == np.float32
    centred = read_audio(path, 16000, remove_mean=True)
    np.testing.assert_allclose(centred, full - full.mean(), atol=1e-6)
    padded = read_audio(path, 16000, clip_samples=20000, remove_mean=True)
    np.testing.assert_array_equal(padded[:16000], centred)  # mean taken before padding
    assert not padded[16000:].any()
    np.testing.assert_array_equal(read_audio(path, 16000, clip_samples=100), full[:100])
    loud = tmp_path / "loud.wav"
    sf.write(loud, np.full(1000, 0.999), 16000, subtype="FLOAT")
    with sf.SoundFile(loud, "r+") as f:  # float WAV may hold values beyond full scale
        f.write(np.full(1000, 1.5))
    assert read_audio(loud, 16000).max() == 1.0


@pytest.mark.parametrize("rate", [16000, 44100, 8000])
def test_segment_equals_slice_of_whole_file(tmp_path, rate):
    path = _wav44(tmp_path, seconds=4.0, channels=2)
    whole = read_audio(path, rate)
    for offset, duration in [(0.0, 1.0), (1.3, 0.7), (2.5, None), (3.9, 1.0), (0.0, None)]:
        seg = read_audio(path, rate, offset_s=offset, duration_s=duration)
        start = round(offset * rate)
        stop = len(whole) if duration is None else min(round((offset + duration) * rate),
                                                       len(whole))
        assert seg.shape == (stop - start,)
        # to the resampler's precision (measured: at most 1.7e-6 apart)
        np.testing.assert_allclose(seg, whole[start:stop], atol=1e-5)
    assert read_audio(path, rate, offset_s=10.0).shape == (0,)
    np.testing.assert_array_equal(
        read_audio(path, rate, offset_s=10.0, duration_s=1.0, clip_samples=50), np.zeros(50)
    )
    seg = read_audio(path, rate, offset_s=1.0, duration_s=1.0, remove_mean=True,
                     clip_samples=rate // 2)
    part = whole[rate:2 * rate]
    np.testing.assert_allclose(seg, (part - part.mean())[:rate // 2], atol=1e-5)


def test_segment_reads_only_part_of_the_file(tmp_path):
    # A FLAC file whose last part is corrupt: reading all of it fails, a segment at the
    # start does not (it never decodes the corrupt frames).
    x = 0.3 * np.random.default_rng(5).standard_normal(44100 * 20)
    path = tmp_path / "long.flac"
    sf.write(path, x, 44100, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    for i in range(int(len(data) * 0.8), len(data), 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AudioDecodeError, match="cannot decode the audio data") as err:
        read_audio(path, 16000)
    assert str(path) in str(err.value)
    seg = read_audio(path, 16000, offset_s=1.0, duration_s=2.0)
    assert seg.shape == (32000,) and np.isfinite(seg).all()


def test_errors_name_the_file_and_the_reason(tmp_path):
    text = tmp_path / "text.wav"
    text.write_text("filename,fold\nnot audio\n")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.wav"
    sf.write(cut, np.zeros(3200), 16000, subtype="PCM_16")
    cut.write_bytes(cut.read_bytes()[:3000])
    cases = {
        tmp_path / "missing.wav": "no such file",
        tmp_path: "is a directory",
        text: "not a readable audio file (libsndfile: Format not recognised)",
        empty: "empty",
        cut: "truncated: the header declares 6400 data bytes but the file holds only 2956",
    }
    for path, reason in cases.items():
        with pytest.raises(AudioDecodeError) as err:
            read_audio(path, SR)
        assert str(err.value).startswith(f"{path}: ") and reason in str(err.value)
        with pytest.raises(AudioDecodeError, match=reason.split(" (")[0]):
            decode_audio(tf.constant(str(path)), SR, SR)
        with pytest.raises(tf.errors.OpError) as err:  # in a tf.data graph
            _pipeline([path])
        assert str(path) in err.value.message and reason in err.value.message
    with pytest.raises(ValueError, match="offset_s"):
        read_audio(text, SR, offset_s=-1.0)


# ---------------------------------------------------------------------- read_audio_blocks


@pytest.mark.parametrize("rate", [16000, 22050, 8000])
def test_blocks_concatenate_to_read_audio(tmp_path, rate):
    path = _wav44(tmp_path, seconds=7.0, channels=2)  # several of the reader's input blocks
    whole = read_audio(path, rate)
    for block_s, mean in [(0.25, False), (1.0, True), (10.0, False)]:
        blocks = list(read_audio_blocks(path, rate, block_s, remove_mean=mean))
        size = round(block_s * rate)
        assert all(b.shape == (size,) and b.dtype == np.float32 for b in blocks[:-1])
        assert 0 < len(blocks[-1]) <= size
        ref = read_audio(path, rate, remove_mean=mean)
        np.testing.assert_allclose(np.concatenate(blocks), ref, atol=1e-4)
        assert len(np.concatenate(blocks)) == len(whole)


def test_blocks_of_a_file_at_the_target_rate_and_errors(tmp_path):
    x = np.random.default_rng(6).uniform(-0.5, 0.5, 10000)
    path = _write(tmp_path / "same.wav", x, SR)
    blocks = list(read_audio_blocks(path, SR, 0.25))
    assert [len(b) for b in blocks] == [4000, 4000, 2000]
    np.testing.assert_array_equal(np.concatenate(blocks), read_audio(path, SR))
    with pytest.raises(AudioDecodeError, match="no such file"):
        next(read_audio_blocks(tmp_path / "missing.wav", SR, 1.0))
    with pytest.raises(ValueError, match="block_s"):
        next(read_audio_blocks(path, SR, 0.0))
