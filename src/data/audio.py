"""Audio loading inside the TensorFlow graph, for use in ``tf.data`` pipelines."""

from __future__ import annotations

import os

import soundfile as sf
import tensorflow as tf

__all__ = ["decode_audio", "read_wav_info"]


def _resample(audio: tf.Tensor, rate_in: tf.Tensor, rate_out: int) -> tf.Tensor:
    # Imported here so that modules that only need WAV decoding do not load tfio's kernels.
    import tensorflow_io as tfio

    out = tfio.audio.resample(
        audio[:, None], rate_in=rate_in, rate_out=tf.constant(rate_out, tf.int64)
    )
    return out[:, 0]


def decode_audio(
    path: tf.Tensor,
    sample_rate: int,
    clip_samples: int | None,
    remove_mean: bool = False,
) -> tf.Tensor:
    """Read a 16-bit PCM WAV file and return mono float32 samples at ``sample_rate``.

    Channels are averaged to mono; a file at another rate is resampled with
    ``tensorflow_io.audio.resample``. With ``remove_mean`` the DC offset of the (resampled)
    signal is removed. The result is cropped to its first ``clip_samples`` samples or
    zero-padded at the end to that length; with ``clip_samples=None`` the length is kept.
    Values lie in [-1, 1]. Works eagerly and inside ``tf.data.Dataset.map``.
    """
    sample_rate = int(sample_rate)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if clip_samples is not None and int(clip_samples) <= 0:
        raise ValueError(f"clip_samples must be positive or None, got {clip_samples}")

    contents = tf.io.read_file(path)
    audio, file_rate = tf.audio.decode_wav(contents, desired_channels=-1)
    audio = tf.reduce_mean(audio, axis=-1)  # [samples, channels] -> [samples]
    file_rate = tf.cast(file_rate, tf.int64)
    audio = tf.cond(
        tf.equal(file_rate, sample_rate),
        lambda: audio,
        lambda: _resample(audio, file_rate, sample_rate),
    )
    if remove_mean:
        audio = audio - tf.reduce_mean(audio)
    if clip_samples is not None:
        clip_samples = int(clip_samples)
        audio = audio[:clip_samples]
        audio = tf.pad(audio, [[0, clip_samples - tf.shape(audio)[0]]])
        audio.set_shape([clip_samples])
    else:
        audio.set_shape([None])
    return tf.clip_by_value(audio, -1.0, 1.0)


def read_wav_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """Return ``(sample_rate, channels, frames)`` of an audio file, read from its header."""
    info = sf.info(os.fspath(path))
    return int(info.samplerate), int(info.channels), int(info.frames)
