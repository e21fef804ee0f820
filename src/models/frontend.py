"""Waveform -> log-mel frontend as a Keras layer (tf.signal, runs in the model).

The mel filterbank is computed once in NumPy with librosa's formula (so it is
the same matrix librosa uses, Slaney or HTK scale) and applied with a matmul;
the STFT uses tf.signal so the frontend runs on CPU or GPU inside the saved
model. Output: ``(batch, frames, n_mels)``.
"""

from __future__ import annotations

import keras
import librosa
import numpy as np
import tensorflow as tf

from src.models.attention import PACKAGE


def _to_samples(value, unit, sample_rate, key):
    if value is None:
        return None
    if unit == "ms":
        return int(round(float(value) * sample_rate / 1000.0))
    if unit == "samples":
        return int(value)
    raise ValueError(f"frontend.{key}_unit must be 'ms' or 'samples', got {unit!r}.")


def num_frames(num_samples, win_length, hop_length, center):
    """Frames produced for a clip of ``num_samples`` samples."""
    if center:
        return 1 + num_samples // hop_length
    if num_samples < win_length:
        return 0
    return 1 + (num_samples - win_length) // hop_length


@keras.saving.register_keras_serializable(package=PACKAGE)
class LogMel(keras.layers.Layer):
    """Log-mel spectrogram.

    Args:
        sample_rate: rate of the input waveform (Hz).
        win_length / hop_length: analysis window and hop, in ``unit``.
        unit: "ms" or "samples" for win_length / hop_length.
        n_fft: FFT size (>= window length in samples); default: next power of 2.
        n_mels, f_min, f_max: mel filterbank (f_max None -> Nyquist).
        mel_scale: "slaney" (librosa's default) or "htk".
        mel_norm: "slaney" (area normalised, librosa's default) or None.
        power: 2.0 for power, 1.0 for magnitude.
        log_offset: log(mel + log_offset).
        center: pad the waveform by n_fft // 2 on both sides (as librosa), with
            ``pad_mode`` "constant" (zeros) or "reflect".
    """

    # Part of the feature store's key: bump it whenever this layer's output changes for
    # the same config, so that features computed by the old code are never reused.
    feature_version = 1


    def __init__(
        self,
        sample_rate=16000,
        win_length=25.0,
        hop_length=10.0,
        unit="ms",
        n_fft=None,
        n_mels=128,
        f_min=20.0,
        f_max=None,
        mel_scale="slaney",
        mel_norm="slaney",
        power=2.0,
        log_offset=1e-6,
        center=False,
        pad_mode="constant",
        **kwargs,
    ):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.sample_rate = int(sample_rate)
        self.win_length = win_length
        self.hop_length = hop_length
        self.unit = unit
        self.win_samples = _to_samples(win_length, unit, self.sample_rate, "win_length")
        self.hop_samples = _to_samples(hop_length, unit, self.sample_rate, "hop_length")
        if self.win_samples <= 0 or self.hop_samples <= 0:
            raise ValueError(
                f"frontend window and hop must be positive, got {self.win_samples} and "
                f"{self.hop_samples} samples."
            )
        if n_fft is None:
            n_fft = 1 << (self.win_samples - 1).bit_length()
        self.n_fft = int(n_fft)
        if self.n_fft < self.win_samples:
            raise ValueError(
                f"frontend.n_fft={self.n_fft} is smaller than the window "
                f"({self.win_samples} samples); raise n_fft or shorten win_length."
            )
        nyquist = self.sample_rate / 2.0
        self.n_mels = int(n_mels)
        self.f_min = float(f_min)
        self.f_max = None if f_max is None else float(f_max)
        top = nyquist if self.f_max is None else self.f_max
        if not 0.0 <= self.f_min < top <= nyquist:
            raise ValueError(
                f"frontend needs 0 <= f_min < f_max <= sample_rate / 2 = {nyquist}, got "
                f"f_min={self.f_min}, f_max={top}."
            )
        if mel_scale not in ("slaney", "htk"):
            raise ValueError(f"frontend.mel_scale must be 'slaney' or 'htk', got {mel_scale!r}.")
        if mel_norm not in ("slaney", None):
            raise ValueError(f"frontend.mel_norm must be 'slaney' or null, got {mel_norm!r}.")
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"frontend.pad_mode must be 'constant' or 'reflect', got {pad_mode!r}.")
        self.mel_scale = mel_scale
        self.mel_norm = mel_norm
        self.power = float(power)
        self.log_offset = float(log_offset)
        self.center = bool(center)
        self.pad_mode = pad_mode

        mel = librosa.filters.mel(
            sr=self.sample_rate,
            n_fft=self.n_fft,
            n_mels=self.n_mels,
            fmin=self.f_min,
            fmax=top,
            htk=self.mel_scale == "htk",
            norm=self.mel_norm,
        )  # (n_mels, n_fft // 2 + 1)
        self._mel_matrix = np.ascontiguousarray(mel.T.astype(np.float32))  # (bins, n_mels)
        # Periodic Hann window of win_samples, zero-padded to n_fft by tf.signal.stft.
        self._window = np.hanning(self.win_samples + 1)[:-1].astype(np.float32)

    def num_frames(self, num_samples):
        return num_frames(num_samples, self.win_samples, self.hop_samples, self.center)

    def call(self, waveform):
        # waveform: (batch, samples)
        x = tf.convert_to_tensor(waveform)
        x = tf.cast(x, tf.float32)
        num_samples = tf.shape(x)[-1]
        win = self.win_samples
        if self.center:
            pad = self.n_fft // 2
            x = tf.pad(x, [[0, 0], [pad, pad]], mode=self.pad_mode.upper())
            # librosa centres a window shorter than n_fft inside the n_fft
            # frame; tf.signal puts it at the frame start. Shift to match.
            x = x[:, (self.n_fft - win) // 2 :]
        window = tf.constant(self._window)
        stft = tf.signal.stft(
            x,
            frame_length=win,
            frame_step=self.hop_samples,
            fft_length=self.n_fft,
            window_fn=lambda length, dtype: tf.cast(window, dtype),
            pad_end=False,
        )  # (batch, frames, n_fft // 2 + 1), complex64
        if self.center:
            stft = stft[:, : 1 + num_samples // self.hop_samples]
        spec = tf.abs(stft)
        if self.power != 1.0:
            spec = tf.pow(spec, self.power)
        mel = tf.matmul(spec, tf.constant(self._mel_matrix))  # (batch, frames, n_mels)
        return tf.math.log(mel + self.log_offset)

    def compute_output_shape(self, input_shape):
        samples = input_shape[-1]
        frames = None if samples is None else self.num_frames(samples)
        return (input_shape[0], frames, self.n_mels)

    def get_config(self):
        config = super().get_config()
        config.update(
            sample_rate=self.sample_rate,
            win_length=self.win_length,
            hop_length=self.hop_length,
            unit=self.unit,
            n_fft=self.n_fft,
            n_mels=self.n_mels,
            f_min=self.f_min,
            f_max=self.f_max,
            mel_scale=self.mel_scale,
            mel_norm=self.mel_norm,
            power=self.power,
            log_offset=self.log_offset,
            center=self.center,
            pad_mode=self.pad_mode,
        )
        return config
