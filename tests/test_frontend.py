"""The LogMel frontend against librosa, and its edge cases."""

import keras
import librosa
import numpy as np
import pytest

from src.models.frontend import LogMel

SR = 16000
# Stated tolerances on the log-mel output (natural log, offset 1e-6). Both sides
# run a float32 FFT; in bins far below the peak (spectral leakage of a pure tone,
# 60+ dB down) the rounding of different FFT implementations is a larger
# *relative* error, which the log scale shows as an absolute one.
ATOL_LOUD = 1e-4  # bins within 60 dB of the clip's loudest bin
ATOL_ALL = 5e-3  # every bin


def signals():
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    return {
        "noise": (0.1 * rng.standard_normal(SR)).astype("float32"),
        "tone": (0.5 * np.sin(2 * np.pi * 440 * t)).astype("float32"),
        "chirp": (0.5 * np.sin(2 * np.pi * (100 * t + 3000 * t**2))).astype("float32"),
    }


@pytest.mark.parametrize("name", ["noise", "tone", "chirp"])
@pytest.mark.parametrize("scale", ["slaney", "htk"])
@pytest.mark.parametrize("win,n_fft", [(400, 512), (512, 512), (256, 1024)])
def test_matches_librosa_melspectrogram(name, scale, win, n_fft):
    x = signals()[name]
    frontend = LogMel(
        sample_rate=SR, win_length=win, hop_length=160, unit="samples", n_fft=n_fft,
        n_mels=64, f_min=20.0, f_max=None, mel_scale=scale,
        mel_norm="slaney" if scale == "slaney" else None, center=True,
    )
    ours = keras.ops.convert_to_numpy(frontend(x[None]))[0]
    ref = librosa.feature.melspectrogram(
        y=x, sr=SR, n_fft=n_fft, hop_length=160, win_length=win, window="hann", center=True,
        pad_mode="constant", power=2.0, n_mels=64, fmin=20.0, htk=scale == "htk",
        norm="slaney" if scale == "slaney" else None,
    )
    ref = np.log(ref.T + 1e-6)
    assert ours.shape == ref.shape == (frontend.num_frames(SR), 64)
    loud = ref > ref.max() - np.log(1e6)  # within 60 dB (power) of the peak
    np.testing.assert_allclose(ours[loud], ref[loud], atol=ATOL_LOUD)
    np.testing.assert_allclose(ours, ref, atol=ATOL_ALL)


def test_frame_count_without_centering():
    frontend = LogMel(sample_rate=SR, win_length=25, hop_length=10, n_mels=32)
    assert frontend.win_samples == 400 and frontend.hop_samples == 160 and frontend.n_fft == 512
    out = frontend(np.zeros((2, 32000), "float32"))
    assert out.shape == (2, 1 + (32000 - 400) // 160, 32) == (2, 198, 32)


def test_silence_gives_the_log_floor_not_nan():
    out = keras.ops.convert_to_numpy(LogMel(n_mels=16)(np.zeros((1, 8000), "float32")))
    np.testing.assert_allclose(out, np.log(1e-6), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_fft=256), "n_fft=256 is smaller than the window"),
        (dict(f_min=9000.0), "f_min < f_max"),
        (dict(unit="seconds"), "unit"),
        (dict(mel_scale="bark"), "mel_scale"),
    ],
)
def test_bad_frontend_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogMel(**kwargs)
