"""Audio decoding and resampling, in plain Python and inside the ``tf.data`` graph.

One reader decodes every file: :func:`read_audio` (soundfile, i.e. libsndfile: 8/16/24/32-bit
and float WAV, WAVE_FORMAT_EXTENSIBLE, FLAC, OGG/Vorbis, AIFF, MP3 with libsndfile >= 1.1)
mixes to mono and resamples with libsoxr (python-soxr, what librosa uses by default).
:func:`decode_audio` runs the same code inside a ``tf.data`` graph through
``tf.numpy_function``; :func:`read_audio_blocks` streams a file of any length in blocks with
the same numbers as :func:`read_audio`. tensorflow-io is no longer used here (see below).

Resampler: soxr with the recipe ``SOXR_16_BITQ | SOXR_STEEP_FILTER`` (linear phase), chosen
by measurement. The criterion: an error at least 90 dB below the signal for frequencies
below 0.9 x the lower Nyquist frequency of the two rates, against float64 sinusoids
computed at the target rate (``tests/test_audio.py``). soxr's named presets fail it for
44.1 kHz -> 16 kHz and 22.05 kHz -> 16 kHz: their filters roll off by design within the
passband (HQ: -0.008 dB at 7.2 kHz, an error of -61 dB); the steep filter moves the roll-off
above 0.9 x Nyquist, and is the fastest recipe that passes.
``python -m scripts.benchmark pipeline --soxr-recipes`` (worst of 90 single tones up to
0.9 x Nyquist, error / signal in dB; CPU ms to resample 5 s from 44.1 kHz to 16 kHz; this
2-core machine):

    recipe           44.1k->16k  48k->16k  22.05k->16k  8k->16k  32k->16k   ms/clip
    MQ                    -43.4    -106.2        -43.4   -106.1    -106.5      0.99
    HQ (the default)      -60.6    -129.0        -60.6   -129.3    -130.5      1.02
    VHQ                   -62.7    -152.4        -62.7   -148.7    -152.4      1.87
    16_BITQ|STEEP        -106.5    -125.9       -106.4   -123.5    -124.2      1.90  (used)
    HQ|STEEP              -89.2    -132.0        -89.2   -130.5    -129.3      1.82
    VHQ|STEEP             -82.3    -152.4        -82.3   -148.7    -152.4      4.04

Tones between the target Nyquist frequency and 0.98 x the source's come out 116 dB or more
below the input (the tests check 110 dB). python-soxr's API takes only the named presets, so
the recipe goes to its extension module ``soxr.soxr_ext`` (python-soxr >= 0.5; measured with
1.1.0); the accuracy tests fail if that interface changes.

Throughput, ``python -m scripts.benchmark pipeline`` (240 generated 5 s 44.1 kHz 16-bit
mono WAV files -> 16 kHz, mean removed, clips/s, best of 3; two runs on this 2-core machine
while no other process used the CPUs):

    tf.audio.decode_wav + tfio.audio.resample, tf.data AUTOTUNE (before)      17.5
    read_audio, 1 thread                                                 320 / 422
    read_audio, pool of 2 threads (1.9 cores busy)                       790 / 764
    decode_audio in tf.data, num_parallel_calls=AUTOTUNE (1.8 cores)     463 / 554
    decode_audio in tf.data, sequential map                              314 / 277

soundfile (cffi) and soxr release the GIL while they decode and filter, so Python threads
scale: a pool of 2 keeps both cores busy at about 2x the single thread's rate; that is the
way to decode many files (:mod:`src.data.store` does). ``tf.data`` with
``num_parallel_calls`` over the ``tf.numpy_function`` does not serialise either (1.8 cores
busy), but TensorFlow's per-element work costs 1.0-1.6 ms of CPU per clip on top of
:func:`read_audio`'s 2.4-2.5 ms. Decoding alone, the same reader at the file's rate ran at
1083 / 898 clips/s (1.4 cores), ``tf.audio.decode_wav`` at 750 / 737 (1.9 cores): keeping
TensorFlow's WAV decoder in the graph would not help, so one decoder serves every format.
16-bit (and narrower) integer PCM is read from libsndfile as int16 and scaled in numpy,
which halves the read time (``sf.read`` of a 5 s clip: 0.7 ms of CPU as int16 and scaled,
1.6 ms as float32).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator

import numpy as np
import soundfile as sf
import tensorflow as tf

try:
    from soxr import soxr_ext
except ImportError as err:  # python-soxr < 0.5 has no soxr_ext
    raise ImportError(f"src.data.audio needs python-soxr >= 0.5 ({err}); "
                      "pip install 'soxr>=0.5'") from err

__all__ = [
    "DECODER_VERSION",
    "SOXR_RECIPE",
    "AudioDecodeError",
    "decode_audio",
    "read_audio",
    "read_audio_blocks",
    "read_wav_info",
    "resample",
]

# Bump whenever the decoded samples change (the feature store keys its contents on it).
# 1: soxr replaced tensorflow-io's resampler.
DECODER_VERSION = 1
# libsoxr's quality recipe (soxr.h): SOXR_16_BITQ (3) | SOXR_STEEP_FILTER (0x40), linear phase.
SOXR_RECIPE = 0x03 | 0x40
# Samples at the lower of the two rates read beyond both ends of a segment: the resampling
# filter's impulse response falls below 1e-7 of its peak within about 420 of them.
_SEGMENT_MARGIN = 1024
# Subtypes read as int16 and scaled in numpy (exactly libsndfile's float values, faster).
_INT16_SUBTYPES = frozenset({"PCM_16", "PCM_S8", "PCM_U8", "ULAW", "ALAW"})
_FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})  # the subtypes that can hold NaN / inf
_INPUT_BLOCK_FRAMES = 1 << 16


class AudioDecodeError(RuntimeError):
    """An audio file cannot be decoded; the message names the file and the reason."""


# ------------------------------------------------------------------------------ resampling


def resample(audio: np.ndarray, rate_in: int, rate_out: int, *,
             recipe: int = SOXR_RECIPE) -> np.ndarray:
    """Resample ``audio`` (``(frames,)`` or ``(frames, channels)``, float32 or float64)
    from ``rate_in`` to ``rate_out`` with soxr (``recipe``: a libsoxr quality recipe, for
    measurements; the pipeline uses :data:`SOXR_RECIPE`).

    The output has ``round(frames * rate_out / rate_in)`` frames, aligned with the input
    (the filter delay is compensated), and the input's dtype. Equal rates return the input.
    """
    rate_in, rate_out = int(rate_in), int(rate_out)
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
    audio = np.asarray(audio)
    if audio.dtype not in (np.float32, np.float64):
        raise TypeError(f"resample takes float32 or float64 samples, got {audio.dtype}")
    if rate_in == rate_out:
        return audio
    if audio.ndim not in (1, 2):
        raise ValueError(f"resample takes (frames,) or (frames, channels), got {audio.shape}")
    x = np.ascontiguousarray(audio if audio.ndim == 2 else audio[:, None])
    run = getattr(soxr_ext, f"csoxr_divide_proc_{audio.dtype}")
    y = run(rate_in, rate_out, x, recipe)
    return y if audio.ndim == 2 else y[:, 0]


def _stream(rate_in: int, rate_out: int):
    """A libsoxr stream (one float32 channel) with :data:`SOXR_RECIPE`."""
    args = (rate_in, rate_out, 1, soxr_ext.SOXR_FLOAT32_I, SOXR_RECIPE)
    try:
        return soxr_ext.CSoxr(*args, False)  # python-soxr >= 1.1: variable-rate flag
    except TypeError:
        return soxr_ext.CSoxr(*args)


# -------------------------------------------------------------------------------- reading


def _unreadable(path: str, err: BaseException) -> AudioDecodeError:
    if not os.path.exists(path):
        why = "no such file"
    elif os.path.isdir(path):
        why = "is a directory, not an audio file"
    elif os.path.getsize(path) == 0:
        why = "the file is empty (0 bytes)"
    else:
        reason = getattr(err, "error_string", None) or str(err)
        why = f"not a readable audio file (libsndfile: {reason.strip().rstrip('.')})"
    return AudioDecodeError(f"{path}: {why}")


def _check_wav_complete(path: str) -> None:
    """Raise if a RIFF/WAVE file's data chunk is shorter than its header declares.

    libsndfile reads such a cut-off file without complaint (the frames that are there); a
    partly copied or downloaded file is refused instead. A declared size of 0 or 0xFFFFFFFF
    (written by streaming recorders that do not know the length) is accepted.
    """
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        size = fh.seek(0, os.SEEK_END)
        pos = 12
        while pos + 8 <= size:
            fh.seek(pos)
            cid, length = struct.unpack("<4sI", fh.read(8))
            pos += 8
            if cid == b"data":
                if length not in (0, 0xFFFFFFFF) and pos + length > size:
                    raise AudioDecodeError(
                        f"{path}: truncated: the header declares {length} data bytes but "
                        f"the file holds only {size - pos}; re-copy or re-download it"
                    )
                return
            pos += length + (length & 1)


def _read_frames(f: sf.SoundFile, frames: int) -> np.ndarray:
    """Up to ``frames`` frames from the current position, as mono float32."""
    if f.subtype in _INT16_SUBTYPES:
        data, scale = f.read(frames, dtype="int16", always_2d=True), 1.0 / 32768.0
    else:
        data, scale = f.read(frames, dtype="float32", always_2d=True), 1.0
    channels = data.shape[1]
    mono = data[:, 0].astype(np.float32)
    for c in range(1, channels):  # faster than a reduction over the short axis
        mono += data[:, c]
    if scale != 1.0 or channels > 1:
        mono *= np.float32(scale / channels)
    # Only float files hold them; clipping to [-1, 1] later would hide an infinity.
    if f.subtype in _FLOAT_SUBTYPES and not np.isfinite(mono).all():
        raise AudioDecodeError(
            f"{f.name}: the file holds NaN or infinite samples (a corrupt float file); "
            "replace it")
    return mono


def _finish(audio: np.ndarray, clip_samples: int | None, remove_mean: bool) -> np.ndarray:
    """Mean removal, then crop/pad to ``clip_samples``, then clip to [-1, 1]."""
    if remove_mean and audio.size:
        audio = audio - audio.mean(dtype=np.float32)  # numpy sums pairwise: accurate
    if clip_samples is not None:
        if audio.shape[0] > clip_samples:  # a copy: a view would keep the whole file alive
            audio = audio[:clip_samples].copy()
        elif audio.shape[0] < clip_samples:
            audio = np.pad(audio, (0, clip_samples - audio.shape[0]))
    if audio.size and (audio.max() > 1.0 or audio.min() < -1.0):  # cheaper than clipping
        audio = np.clip(audio, -1.0, 1.0)
    return audio


def _read_segment(f: sf.SoundFile, sample_rate: int, offset_s: float,
                  duration_s: float | None) -> np.ndarray:
    """Samples ``[round(offset_s * sr), round((offset_s + duration_s) * sr))`` of the file
    resampled to ``sr``, equal (to the filter's precision) to that slice of the whole file
    resampled: the part read starts on a common sample of both rates' grids and reaches
    :data:`_SEGMENT_MARGIN` samples beyond the segment, so the filter sees the real signal."""
    rate_in, frames = f.samplerate, f.frames
    total = round(frames * sample_rate / rate_in)  # output length of the whole file
    start = min(round(offset_s * sample_rate), total)
    stop = total if duration_s is None else min(round((offset_s + duration_s) * sample_rate),
                                                total)
    if rate_in == sample_rate:
        f.seek(start)
        return _read_frames(f, stop - start)
    g = math.gcd(rate_in, sample_rate)
    period_in, period_out = rate_in // g, sample_rate // g  # a common grid point every period
    margin = math.ceil(_SEGMENT_MARGIN * sample_rate / min(rate_in, sample_rate))
    first = max(0, start - margin) // period_out
    last = -(-(stop + margin) // period_out)
    in_start, in_stop = first * period_in, min(frames, last * period_in)
    f.seek(in_start)
    audio = resample(_read_frames(f, in_stop - in_start), rate_in, sample_rate)
    base = first * period_out
    return audio[start - base:stop - base]


def _open(path: str) -> sf.SoundFile:
    try:
        f = sf.SoundFile(path)
    except Exception as err:  # soundfile raises LibsndfileError, TypeError, ... on bad input
        raise _unreadable(path, err) from err
    try:
        _check_wav_complete(path)
    except BaseException:
        f.close()
        raise
    return f


def read_audio(
    path: str | os.PathLike | bytes,
    sample_rate: int,
    *,
    clip_samples: int | None = None,
    remove_mean: bool = False,
    offset_s: float = 0.0,
    duration_s: float | None = None,
) -> np.ndarray:
    """Mono float32 samples in [-1, 1] of an audio file at ``sample_rate``.

    Channels are averaged; a file at another rate is resampled with soxr. With
    ``remove_mean`` the DC offset of the (resampled) signal is subtracted. The result is then
    cropped to its first ``clip_samples`` samples or zero-padded at the end to that length
    (``None`` keeps the length) and clipped to [-1, 1].

    ``offset_s`` / ``duration_s`` select a segment (output samples
    ``round(offset_s * sample_rate)`` up to ``round((offset_s + duration_s) * sample_rate)``,
    cut at the end of the file) and read only that part of the file plus a few
    milliseconds around it; the mean removed is then the segment's.

    Raises :class:`AudioDecodeError` naming the file and the reason (missing, not audio,
    truncated WAV, corrupt data).
    """
    path = os.fsdecode(path)
    sample_rate = int(sample_rate)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if clip_samples is not None and int(clip_samples) <= 0:
        raise ValueError(f"clip_samples must be positive or None, got {clip_samples}")
    if offset_s < 0 or (duration_s is not None and duration_s < 0):
        raise ValueError(f"offset_s and duration_s must be >= 0, got {offset_s}, {duration_s}")
    with _open(path) as f:
        try:
            if offset_s == 0 and duration_s is None:
                audio = resample(_read_frames(f, -1), f.samplerate, sample_rate)
            else:
                audio = _read_segment(f, sample_rate, offset_s, duration_s)
        except AudioDecodeError:
            raise
        except Exception as err:  # corrupt data past the header
            reason = getattr(err, "error_string", None) or str(err)
            raise AudioDecodeError(f"{path}: cannot decode the audio data ({reason})") from err
    return _finish(audio, None if clip_samples is None else int(clip_samples), remove_mean)


def read_audio_blocks(
    path: str | os.PathLike | bytes,
    sample_rate: int,
    block_s: float,
    remove_mean: bool = False,
) -> Iterator[np.ndarray]:
    """Consecutive mono float32 blocks of ``round(block_s * sample_rate)`` samples (the last
    one shorter) of a file of any length, at ``sample_rate``, in bounded memory.

    The file is read in blocks and resampled with one soxr stream, so block boundaries
    introduce no discontinuity: the concatenated blocks equal :func:`read_audio` of the whole
    file (measured: identical, and within 6e-8 with ``remove_mean``). With ``remove_mean``
    the whole file's mean is needed before the first block, so the file is read and
    resampled twice (a first pass only sums).
    """
    path = os.fsdecode(path)
    sample_rate = int(sample_rate)
    block = round(block_s * sample_rate)
    if sample_rate <= 0 or block <= 0:
        raise ValueError(f"sample_rate and block_s must give at least one sample per block, "
                         f"got sample_rate={sample_rate}, block_s={block_s}")
    mean = np.float32(0.0)
    if remove_mean:
        total, count = 0.0, 0
        for chunk in _resampled_chunks(path, sample_rate):
            total += float(chunk.sum(dtype=np.float64))
            count += chunk.size
        mean = np.float32(total / count) if count else mean
    pending: list[np.ndarray] = []
    held = 0
    for chunk in _resampled_chunks(path, sample_rate):
        pending.append(chunk)
        held += chunk.size
        if held < block:
            continue
        buf = np.concatenate(pending)
        cut = held - held % block
        for i in range(0, cut, block):
            yield _finish(buf[i:i + block] - mean, None, False)
        pending, held = [buf[cut:]], held - cut
    if held:
        yield _finish(np.concatenate(pending) - mean, None, False)


def _resampled_chunks(path: str, sample_rate: int) -> Iterator[np.ndarray]:
    """The file at ``sample_rate`` as consecutive mono float32 chunks of varying length."""
    with _open(path) as f:
        stream = None if f.samplerate == sample_rate else _stream(f.samplerate, sample_rate)
        try:
            while True:
                x = _read_frames(f, _INPUT_BLOCK_FRAMES)
                last = x.size < _INPUT_BLOCK_FRAMES
                if stream is not None:
                    x = stream.process_float32(x[:, None], last)[:, 0]
                if x.size:
                    yield x
                if last:
                    return
        except AudioDecodeError:
            raise
        except Exception as err:  # corrupt data past the header
            reason = getattr(err, "error_string", None) or str(err)
            raise AudioDecodeError(f"{path}: cannot decode the audio data ({reason})") from err


# ---------------------------------------------------------------------------- tf.data graph


def decode_audio(
    path: tf.Tensor,
    sample_rate: int,
    clip_samples: int | None,
    remove_mean: bool = False,
) -> tf.Tensor:
    """Read an audio file and return mono float32 samples at ``sample_rate``.

    :func:`read_audio` with the same arguments, as a tensor: channels averaged to mono,
    resampled with soxr where the file's rate differs, DC offset removed with
    ``remove_mean``, cropped to its first ``clip_samples`` samples or zero-padded at the end
    to that length (``None`` keeps the length), values in [-1, 1]. Works eagerly and inside
    ``tf.data.Dataset.map`` (a ``tf.numpy_function``: soundfile and soxr release the GIL,
    so ``num_parallel_calls`` uses several cores). A file that cannot be decoded raises
    :class:`AudioDecodeError` eagerly and a ``tf.errors.OpError`` carrying the same message
    (it names the file) in a graph.
    """
    sample_rate = int(sample_rate)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if clip_samples is not None:
        clip_samples = int(clip_samples)
        if clip_samples <= 0:
            raise ValueError(f"clip_samples must be positive or None, got {clip_samples}")

    def read(p):
        if isinstance(p, np.ndarray):
            p = p.item()
        return read_audio(p, sample_rate, clip_samples=clip_samples, remove_mean=remove_mean)

    if tf.executing_eagerly():
        p = path.numpy() if isinstance(path, tf.Tensor) else path
        return tf.convert_to_tensor(read(p))
    # Stateful (the default): the result depends on the file, so TensorFlow must neither
    # fold a call on a constant path nor merge two calls.
    audio = tf.numpy_function(read, [path], tf.float32, name="read_audio")
    audio.set_shape([clip_samples])
    return audio


def read_wav_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """Return ``(sample_rate, channels, frames)`` of an audio file, read from its header."""
    info = sf.info(os.fspath(path))
    return int(info.samplerate), int(info.channels), int(info.frames)
