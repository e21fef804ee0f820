"""Audio loading inside the TensorFlow graph, for use in ``tf.data`` pipelines."""

from __future__ import annotations

import os

import numpy as np
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


def _is_plain_pcm16_wav(contents: tf.Tensor) -> tf.Tensor:
    """True for a canonical 16-bit PCM WAV header (what tf.audio.decode_wav reads)."""
    size_ok = tf.strings.length(contents) >= 44

    def check():
        head = tf.strings.substr(contents, 0, 36)
        tags = tf.strings.substr(head, 0, 4) + tf.strings.substr(head, 8, 8)
        fmt = tf.io.decode_raw(tf.strings.substr(head, 20, 2), tf.uint16)[0]
        bits = tf.io.decode_raw(tf.strings.substr(head, 34, 2), tf.uint16)[0]
        return tf.logical_and(
            tf.equal(tags, b"RIFFWAVEfmt "),
            tf.logical_and(tf.equal(fmt, 1), tf.equal(bits, 16)),
        )

    return tf.cond(size_ok, check, lambda: tf.constant(False))


def _decode_pcm16_wav(contents: tf.Tensor):
    audio, rate = tf.audio.decode_wav(contents, desired_channels=-1)
    return tf.reduce_mean(audio, axis=-1), tf.cast(rate, tf.int64)  # mono


def _soundfile_read(path) -> tuple[np.ndarray, np.int64]:
    if isinstance(path, np.ndarray):
        path = path.item()
    if isinstance(path, bytes):
        path = path.decode()
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return data.mean(axis=1).astype(np.float32), np.int64(rate)


def _decode_with_soundfile(path: tf.Tensor):
    # Everything libsndfile reads (24/32-bit and float WAV, WAV with extra chunks before
    # "fmt ", FLAC, OGG/Vorbis, AIFF, ...). Runs as a Python op in the tf.data graph;
    # features are cached, so this costs once per clip.
    audio, rate = tf.numpy_function(_soundfile_read, [path], [tf.float32, tf.int64])
    audio.set_shape([None])
    rate.set_shape([])
    return audio, rate


def decode_audio(
    path: tf.Tensor,
    sample_rate: int,
    clip_samples: int | None,
    remove_mean: bool = False,
) -> tf.Tensor:
    """Read an audio file and return mono float32 samples at ``sample_rate``.

    Canonical 16-bit PCM WAV (ESC-50, Speech Commands) is decoded by
    ``tf.audio.decode_wav`` in the graph; anything else libsndfile reads (24/32-bit or
    float WAV, FLAC, OGG, ...) through soundfile in a ``tf.numpy_function``. Channels are averaged to mono; a file at another rate is resampled with
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
    audio, file_rate = tf.cond(
        _is_plain_pcm16_wav(contents),
        lambda: _decode_pcm16_wav(contents),
        lambda: _decode_with_soundfile(path),
    )
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
