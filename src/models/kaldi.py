"""Kaldi-compatible log-mel filterbank ("fbank") as a Keras layer (TensorFlow ops).

Computes what ``torchaudio.compliance.kaldi.fbank`` (and Kaldi's
``compute-fbank-feats``) compute, so models can take the features AST was
trained on. Everything runs in TensorFlow inside the model (CPU or GPU); the
window and the mel matrix are built once in NumPy (float64, stored as float32).

Per frame, as Kaldi:

1. frames of ``frame_length_ms`` every ``frame_shift_ms``; with ``snip_edges``
   only frames that fit (``1 + (N - L) // S``), otherwise ``(N + S // 2) // S``
   frames centred on ``i * S + S // 2`` with the waveform mirrored at both ends;
2. remove the DC offset (subtract the frame mean);
3. pre-emphasis ``x[i] -= c * x[i - 1]`` with ``x[-1] := x[0]``;
4. window: "hanning" ``0.5 - 0.5 cos(2 pi n / (L - 1))``, "povey" (hanning to the
   power 0.85), "hamming", "blackman" (coefficient 0.42) or "rectangular";
5. zero-pad to the next power of two (512 for 400 samples) and take the power
   (or magnitude) spectrum;
6. Kaldi's mel banks: triangles on ``mel = 1127 ln(1 + f / 700)`` between
   ``low_freq`` and ``high_freq``, evaluated at the bin frequencies
   ``k * sample_rate / n_fft`` for ``k < n_fft / 2`` (the Nyquist bin gets weight
   0), with no area normalisation;
7. ``log(max(energy, eps))`` with eps = float32 machine epsilon.

Scale: Kaldi reads int16 samples; AST passes a float waveform in [-1, 1] to
torchaudio's fbank, which does not rescale it, so AST's features correspond to
``waveform_scale=1.0`` (the default). Use ``waveform_scale=32768.0`` for the
features Kaldi computes from the same audio as 16-bit PCM. (AST also subtracts
the clip mean from the waveform first; with ``remove_dc_offset`` every frame's
mean is removed anyway, so that step changes nothing here.)

Too many bins: with a 512-point FFT and 128 bins the lowest triangles are
narrower than an FFT bin and some contain no bin centre. Kaldi refuses such
settings; torchaudio (and this layer) keep those filters as all-zero rows, so
their outputs are the log floor ``log(1.1920929e-07)`` in every frame. AST uses
exactly this setting (128 bins, 25 ms at 16 kHz).

Output: ``(batch, frames, n_mels)``, or ``n_mels + 1`` features with
``use_energy`` (the log frame energy first, as Kaldi).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from src.models.attention import PACKAGE

# float32 machine epsilon: the floor Kaldi and torchaudio apply before the log.
EPSILON = float(np.finfo(np.float32).eps)
WINDOW_TYPES = ("hanning", "povey", "hamming", "blackman", "rectangular")
_BLACKMAN_COEFF = 0.42  # Kaldi's default --blackman-coeff


def mel_scale(freq):
    """Kaldi's mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


def kaldi_window(window_type: str, length: int) -> np.ndarray:
    """Kaldi's analysis window of ``length`` samples (float64)."""
    if window_type not in WINDOW_TYPES:
        raise ValueError(
            f"frontend.window_type must be one of {list(WINDOW_TYPES)}, got {window_type!r}."
        )
    n = np.arange(length, dtype=np.float64)
    a = 2.0 * math.pi / (length - 1) if length > 1 else 0.0
    if window_type == "rectangular":
        return np.ones(length)
    if window_type == "hamming":
        return 0.54 - 0.46 * np.cos(a * n)
    if window_type == "blackman":
        c = _BLACKMAN_COEFF
        return c - 0.5 * np.cos(a * n) + (0.5 - c) * np.cos(2.0 * a * n)
    hann = 0.5 - 0.5 * np.cos(a * n)
    return hann**0.85 if window_type == "povey" else hann


def kaldi_mel_banks(
    n_mels: int, n_fft: int, sample_rate: float, low_freq: float, high_freq: float
) -> np.ndarray:
    """Kaldi's triangular mel filters, ``(n_fft // 2 + 1, n_mels)`` float64.

    Rows are FFT bins (the last one, Nyquist, is all zero as in Kaldi, which
    uses only the first ``n_fft // 2`` bins); ``high_freq <= 0`` means Nyquist +
    ``high_freq``. Filters narrower than an FFT bin may be all zero.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(
            f"frontend needs 0 <= low_freq < high_freq <= sample_rate / 2 = {nyquist} "
            f"(high_freq <= 0 counts down from the Nyquist frequency), got "
            f"low_freq={low_freq}, high_freq={high_freq}."
        )
    num_fft_bins = n_fft // 2
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high_freq)
    delta = (mel_high - mel_low) / (n_mels + 1)
    idx = np.arange(n_mels, dtype=np.float64)[None, :]
    left = mel_low + idx * delta
    center = mel_low + (idx + 1.0) * delta
    right = mel_low + (idx + 2.0) * delta
    mel = mel_scale(np.arange(num_fft_bins, dtype=np.float64) * (sample_rate / n_fft))[:, None]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))  # (num_fft_bins, n_mels)
    return np.concatenate([banks, np.zeros((n_fft // 2 + 1 - num_fft_bins, n_mels))], axis=0)


@keras.saving.register_keras_serializable(package=PACKAGE)
class KaldiFbank(keras.layers.Layer):
    """Kaldi / torchaudio ``fbank`` features; defaults are AST's settings.

    Args:
        sample_rate: rate of the input waveform (Hz).
        frame_length_ms / frame_shift_ms: window and hop (truncated to whole
            samples, as Kaldi).
        n_mels: number of mel filters.
        low_freq / high_freq: filterbank edges in Hz; ``high_freq <= 0`` means
            Nyquist + ``high_freq``.
        window_type: "hanning", "povey", "hamming", "blackman" or "rectangular".
        preemphasis: pre-emphasis coefficient (0 disables it).
        remove_dc_offset: subtract each frame's mean.
        dither: must be 0.0 (AST's value): Kaldi's dither adds random noise, which
            would make the features of a clip differ from call to call.
        round_to_power_of_two: zero-pad each frame to the next power of two.
        snip_edges: only frames that fit in the clip (True), or Kaldi's centred
            frames with mirrored edges (False).
        use_energy: add the log energy of each frame as a feature: first, or last
            with ``htk_compat``.
        raw_energy: the energy of the frame after DC removal and before pre-emphasis
            and the window (True, Kaldi's default), or after them (False).
        energy_floor: the log energy is at least ``log(energy_floor)`` (0: no floor,
            Kaldi's default; torchaudio's default is 1.0).
        htk_compat: with ``use_energy``, the energy goes last (as HTK), not first.
        use_log_fbank: ``log(max(mel, eps))`` (True) or the mel energies.
        use_power: power spectrum (True) or magnitude.
        waveform_scale: the input is multiplied by this first; 1.0 (AST's
            features from a [-1, 1] waveform) or 32768.0 (int16 scale, as Kaldi).

    ``n_mels`` (attribute) is the number of features per frame that the layer
    outputs (the filters, plus one with ``use_energy``); ``num_bins`` is the
    number of filters.
    """

    # Part of the feature store's key: bump it whenever this layer's output changes for
    # the same config, so that features computed by the old code are never reused.
    feature_version = 1


    def __init__(
        self,
        sample_rate=16000,
        frame_length_ms=25.0,
        frame_shift_ms=10.0,
        n_mels=128,
        low_freq=20.0,
        high_freq=0.0,
        window_type="hanning",
        preemphasis=0.97,
        remove_dc_offset=True,
        dither=0.0,
        round_to_power_of_two=True,
        snip_edges=True,
        use_energy=False,
        use_log_fbank=True,
        use_power=True,
        waveform_scale=1.0,
        raw_energy=True,
        energy_floor=0.0,
        htk_compat=False,
        **kwargs,
    ):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if float(dither) != 0.0:
            raise ValueError(
                f"frontend.dither={dither} is not supported: dithering adds random noise to "
                "every frame, so the same clip would give different features on every call "
                "(training, evaluation and the saved model would not be deterministic). "
                "AST uses dither=0.0; set frontend.dither=0.0."
            )
        if window_type not in WINDOW_TYPES:
            raise ValueError(
                f"frontend.window_type must be one of {list(WINDOW_TYPES)}, got {window_type!r}."
            )
        self.sample_rate = int(sample_rate)
        self.frame_length_ms = float(frame_length_ms)
        self.frame_shift_ms = float(frame_shift_ms)
        # Kaldi: static_cast<int32>(samp_freq * 0.001 * frame_length_ms).
        self.win_samples = int(self.sample_rate * 0.001 * self.frame_length_ms)
        self.hop_samples = int(self.sample_rate * 0.001 * self.frame_shift_ms)
        if self.win_samples < 2 or self.hop_samples < 1:
            raise ValueError(
                f"frontend frame length and shift must be at least 2 and 1 samples, got "
                f"{self.win_samples} and {self.hop_samples} samples."
            )
        self.round_to_power_of_two = bool(round_to_power_of_two)
        if self.round_to_power_of_two:
            self.n_fft = 1 << (self.win_samples - 1).bit_length()
        else:
            self.n_fft = self.win_samples
        self.num_bins = int(n_mels)
        if self.num_bins < 1:
            raise ValueError(f"frontend.n_mels must be positive, got {n_mels}.")
        self.low_freq = float(low_freq)
        self.high_freq = float(high_freq)
        self.window_type = window_type
        self.preemphasis = float(preemphasis)
        self.remove_dc_offset = bool(remove_dc_offset)
        self.dither = 0.0
        self.snip_edges = bool(snip_edges)
        self.use_energy = bool(use_energy)
        self.use_log_fbank = bool(use_log_fbank)
        self.use_power = bool(use_power)
        self.waveform_scale = float(waveform_scale)
        self.raw_energy = bool(raw_energy)
        self.energy_floor = float(energy_floor)
        if self.energy_floor < 0.0:
            raise ValueError(f"frontend.energy_floor must be >= 0, got {energy_floor}.")
        self.htk_compat = bool(htk_compat)
        self.n_mels = self.num_bins + int(self.use_energy)

        banks = kaldi_mel_banks(
            self.num_bins, self.n_fft, self.sample_rate, self.low_freq, self.high_freq
        )
        self._mel_matrix = np.ascontiguousarray(banks.astype(np.float32))  # (bins, n_mels)
        self._window = kaldi_window(window_type, self.win_samples).astype(np.float32)

    def num_frames(self, num_samples):
        """Frames produced for a clip of ``num_samples`` samples (Kaldi's NumFrames)."""
        win, hop = self.win_samples, self.hop_samples
        if self.snip_edges:
            return 0 if num_samples < win else 1 + (num_samples - win) // hop
        return (num_samples + hop // 2) // hop

    def _frames(self, x):
        """(batch, samples) -> (batch, frames, win_samples)."""
        win, hop = self.win_samples, self.hop_samples
        if self.snip_edges:
            return tf.signal.frame(x, win, hop, pad_end=False, axis=-1)
        # Kaldi's ExtractWindow without snip_edges: frame i covers samples
        # i * hop + hop // 2 - win // 2 + [0, win), mirrored at both ends
        # (s < 0 -> -s - 1, s >= N -> 2N - 1 - s, repeated while out of range,
        # i.e. a symmetric extension of period 2N).
        n = tf.shape(x)[-1]
        count = (n + hop // 2) // hop
        starts = tf.range(count) * hop + (hop // 2 - win // 2)
        idx = tf.math.floormod(starts[:, None] + tf.range(win)[None, :], tf.maximum(2 * n, 1))
        idx = tf.where(idx >= n, 2 * n - 1 - idx, idx)
        return tf.gather(x, idx, axis=1)

    def call(self, waveform):
        # waveform: (batch, samples)
        x = tf.cast(tf.convert_to_tensor(waveform), tf.float32)
        if self.waveform_scale != 1.0:
            x = x * self.waveform_scale
        frames = self._frames(x)  # (batch, frames, win)
        if self.remove_dc_offset:
            frames = frames - tf.reduce_mean(frames, axis=-1, keepdims=True)
        if self.use_energy and self.raw_energy:
            energy = self._log_energy(frames)
        if self.preemphasis != 0.0:
            previous = tf.concat([frames[..., :1], frames[..., :-1]], axis=-1)
            frames = frames - self.preemphasis * previous
        frames = frames * tf.constant(self._window)
        if self.use_energy and not self.raw_energy:
            energy = self._log_energy(frames)
        if self.n_fft > self.win_samples:
            frames = tf.pad(frames, [[0, 0], [0, 0], [0, self.n_fft - self.win_samples]])
        spectrum = tf.signal.rfft(frames, fft_length=[self.n_fft])
        power = tf.square(tf.math.real(spectrum)) + tf.square(tf.math.imag(spectrum))
        spec = power if self.use_power else tf.sqrt(power)
        mel = tf.matmul(spec, tf.constant(self._mel_matrix))  # (batch, frames, num_bins)
        if self.use_log_fbank:
            mel = tf.math.log(tf.maximum(mel, EPSILON))
        if self.use_energy:
            mel = tf.concat([mel, energy] if self.htk_compat else [energy, mel], axis=-1)
        return mel

    def _log_energy(self, frames):
        """``(batch, frames, 1)``: log of the frame energy, floored as Kaldi."""
        energy = tf.math.log(
            tf.maximum(tf.reduce_sum(tf.square(frames), axis=-1, keepdims=True), EPSILON)
        )
        if self.energy_floor > 0.0:
            energy = tf.maximum(energy, math.log(self.energy_floor))
        return energy

    def compute_output_shape(self, input_shape):
        samples = input_shape[-1]
        frames = None if samples is None else self.num_frames(samples)
        return (input_shape[0], frames, self.n_mels)

    def get_config(self):
        config = super().get_config()
        config.update(
            sample_rate=self.sample_rate,
            frame_length_ms=self.frame_length_ms,
            frame_shift_ms=self.frame_shift_ms,
            n_mels=self.num_bins,
            low_freq=self.low_freq,
            high_freq=self.high_freq,
            window_type=self.window_type,
            preemphasis=self.preemphasis,
            remove_dc_offset=self.remove_dc_offset,
            dither=self.dither,
            round_to_power_of_two=self.round_to_power_of_two,
            snip_edges=self.snip_edges,
            use_energy=self.use_energy,
            use_log_fbank=self.use_log_fbank,
            use_power=self.use_power,
            waveform_scale=self.waveform_scale,
            raw_energy=self.raw_energy,
            energy_floor=self.energy_floor,
            htk_compat=self.htk_compat,
        )
        return config
