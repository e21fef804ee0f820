"""Deterministic multi-label sound-event set in AudioSet's csv layout.

Each clip mixes 1 to ``max_events`` of the synthetic event classes of
``src.data.synthetic`` at random onsets and levels over white or pink background noise. The
tree reads with the AudioSet reader (``src.data.audioset``), so the quick multi-label recipe
exercises the same code as AudioSet itself::

    ROOT/metadata/class_labels_indices.csv         # index,mid,display_name (mids /m/syn0, ...)
    ROOT/metadata/balanced_train_segments.csv      # fold 1: training clips
    ROOT/metadata/eval_segments.csv                # fold 3: evaluation clips
    ROOT/audio/{split}/{ytid}.wav                  # 16-bit PCM mono, fake 11-character YTIDs
    ROOT/.complete                                 # JSON of the generation parameters

Label frequencies are skewed on purpose: class ``c`` is drawn with weight
``SKEW ** (-c / (K - 1))``, so the first class is about four times as frequent as the last and
balanced sampling has something to correct. A clip with ``k`` events is drawn with
probability proportional to ``1 / k``; its classes are distinct.

Everything is a pure function of ``seed``: each clip draws from its own generator seeded by
``(seed, stream, fold, index)``, so a clip does not depend on how many others are generated.
The tree is written next to ``ROOT`` and renamed into place with the marker written last,
as ``src.data.synthetic`` does, so an interrupted generation never looks complete.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import wave
from pathlib import Path

import numpy as np

from src.data import synthetic
from src.data.audioset import LABELS_CSV, SPLITS
from src.data.synthetic import (
    CLASSES,
    MARKER_NAME,
    _install,
    _is_empty_dir,
    _read_marker,
    coloured_noise,
    synthesize_event,
)

__all__ = [
    "CLASS_WEIGHTS",
    "CSV_DIR",
    "FILE_PATTERN",
    "GENERATOR_VERSION",
    "MIDS",
    "SPLIT_NAMES",
    "ensure_tagging_dataset",
    "generate_tagging_dataset",
    "synthesize_tagging_clip",
    "tagging_labels",
]

# Bump whenever the generated audio or layout changes, so cached trees are regenerated.
GENERATOR_VERSION = 1
CSV_DIR = "metadata"
FILE_PATTERN = "audio/{split}/{ytid}.wav"
SPLIT_NAMES = ("balanced_train", "eval")  # what is generated: training and evaluation clips
MIDS = tuple(f"/m/syn{i}" for i in range(len(CLASSES)))
SKEW = 4.0
CLASS_WEIGHTS = SKEW ** (-np.arange(len(CLASSES)) / (len(CLASSES) - 1))
CLASS_WEIGHTS = CLASS_WEIGHTS / CLASS_WEIGHTS.sum()
_STREAM = 0x7A6  # separates these clips' random streams from synthetic.py's (seed, target, i)
_GAIN_DB = (-6.0, 0.0)  # level of each event (unit RMS over its span)
_BACKGROUND_DB = (-20.0, -10.0)  # background level relative to a 0 dB event
_PEAK = (0.25, 0.9)  # final clip peak amplitude


def _clip_rng(seed: int, fold: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAM, fold, index]))


def _draw_classes(rng: np.random.Generator, max_events: int) -> list[int]:
    """The clip's classes, in the order their events are drawn (the first draws of its rng)."""
    ks = np.arange(1, max_events + 1)
    k = int(rng.choice(ks, p=(1.0 / ks) / np.sum(1.0 / ks)))
    return [int(t) for t in rng.choice(len(CLASSES), size=k, replace=False, p=CLASS_WEIGHTS)]


def tagging_labels(fold: int, index: int, *, seed: int, max_events: int) -> tuple[int, ...]:
    """The sorted labels of a clip, without synthesizing its audio."""
    return tuple(sorted(_draw_classes(_clip_rng(seed, fold, index), max_events)))


def synthesize_tagging_clip(
    fold: int, index: int, *, seed: int, sample_rate: int, duration: float, max_events: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Return ``(clip, labels)``: float64 mono audio (peak < 1) and its sorted class indices."""
    rng = _clip_rng(seed, fold, index)
    targets = _draw_classes(rng, max_events)
    n = int(round(duration * sample_rate))
    mix = np.zeros(n)
    for target in targets:
        event = synthesize_event(target, rng, sample_rate, duration)[:n]
        rms = np.sqrt(np.mean(event**2))
        gain = 10.0 ** (rng.uniform(*_GAIN_DB) / 20.0) / rms if rms > 0 else 0.0
        onset = int(rng.integers(0, n - len(event) + 1))
        mix[onset : onset + len(event)] += gain * event
    colour = rng.choice((0.0, 1.0))  # white or pink background
    background = coloured_noise(rng, n, sample_rate, exponent=colour)
    clip = mix + background * 10.0 ** (rng.uniform(*_BACKGROUND_DB) / 20.0)
    peak = np.max(np.abs(clip))
    clip = clip * (rng.uniform(*_PEAK) / peak) if peak > 0 else clip
    return clip, tuple(sorted(targets))


def _ytid(seed: int, split: str, index: int) -> str:
    """A fake YouTube id: 11 characters of [A-Za-z0-9_-], fixed by (seed, split, index)."""
    digest = hashlib.blake2b(f"{seed}:{split}:{index}".encode(), digest_size=8).digest()
    return base64.urlsafe_b64encode(digest).decode()[:11]


def _params(train_clips, eval_clips, duration, max_events, seed, sample_rate) -> dict:
    train_clips, eval_clips, max_events = int(train_clips), int(eval_clips), int(max_events)
    sample_rate, seed, duration = int(sample_rate), int(seed), float(duration)
    if train_clips < 1 or eval_clips < 1:
        raise ValueError("train_clips and eval_clips must be positive")
    if not 1 <= max_events <= len(CLASSES):
        raise ValueError(f"max_events={max_events} must be between 1 and {len(CLASSES)}")
    if sample_rate < 4000:
        raise ValueError(f"sample_rate={sample_rate} is too low (minimum 4000 Hz)")
    if duration < 0.5:
        raise ValueError(f"duration={duration} s is too short (minimum 0.5 s)")
    if seed < 0:
        raise ValueError("seed must be non-negative")
    return {
        "generator": "synthetic-tagging",
        "version": GENERATOR_VERSION,
        "event_version": synthetic.GENERATOR_VERSION,
        "classes": list(CLASSES),
        "train_clips": train_clips,
        "eval_clips": eval_clips,
        "duration": duration,
        "max_events": max_events,
        "seed": seed,
        "sample_rate": sample_rate,
    }


def _is_complete(root: Path, params: dict) -> bool:
    meta = root / CSV_DIR
    files = [LABELS_CSV] + [SPLITS[s][1] for s in SPLIT_NAMES]
    return all((meta / f).is_file() for f in files) and _read_marker(root) == params


def _write_wav(path: Path, clip: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM mono WAV. The standard library's writer: soundfile syncs every file to
    disk on close, which here costs more than synthesizing the clip."""
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(sample_rate)
        fh.writeframes(np.round(np.clip(clip, -1.0, 1.0) * 32767).astype("<i2").tobytes())


def _write_tree(dest: Path, params: dict) -> None:
    meta = dest / CSV_DIR
    meta.mkdir()
    with open(meta / LABELS_CSV, "w", newline="") as fh:
        fh.write("index,mid,display_name\n")
        fh.writelines(f'{i},{mid},"{name}"\n' for i, (mid, name) in enumerate(zip(MIDS, CLASSES)))
    sizes = {"balanced_train": params["train_clips"], "eval": params["eval_clips"]}
    seed, sr, duration = params["seed"], params["sample_rate"], params["duration"]
    ytids: set[str] = set()
    for split in SPLIT_NAMES:
        fold, csv_name = SPLITS[split]
        (dest / FILE_PATTERN.format(split=split, ytid="x")).parent.mkdir(parents=True)
        rows = []
        positives = 0
        for index in range(sizes[split]):
            ytid = _ytid(seed, split, index)
            if ytid in ytids:  # 64-bit hashes: never expected; checked so it cannot go unseen
                raise RuntimeError(f"fake YTID collision for {split} clip {index}; change seed")
            ytids.add(ytid)
            clip, labels = synthesize_tagging_clip(
                fold, index, seed=seed, sample_rate=sr, duration=duration,
                max_events=params["max_events"],
            )
            _write_wav(dest / FILE_PATTERN.format(split=split, ytid=ytid), clip, sr)
            start = 10.0 * (int(ytid.encode().hex(), 16) % 30)
            mids = ",".join(MIDS[t] for t in labels)
            rows.append(f'{ytid}, {start:.3f}, {start + duration:.3f}, "{mids}"\n')
            positives += len(labels)
        with open(meta / csv_name, "w", newline="") as fh:
            fh.write(f"# Segments csv generated by src.data.synthetic_tagging (seed {seed})\n")
            fh.write(f"# num_ytids={len(rows)}, num_segs={len(rows)}, "
                     f"num_unique_labels={len(CLASSES)}, num_positive_labels={positives}\n")
            fh.write("# YTID, start_seconds, end_seconds, positive_labels\n")
            fh.writelines(rows)
    # The marker goes last: a tree without it is never treated as complete.
    (dest / MARKER_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def generate_tagging_dataset(
    root: str | os.PathLike,
    *,
    train_clips: int = 600,
    eval_clips: int = 200,
    duration: float = 3.0,
    max_events: int = 3,
    seed: int = 0,
    sample_rate: int = 16000,
    overwrite: bool = False,
) -> Path:
    """Write the tagging set to ``root`` and return ``root``.

    Built in a temporary directory next to ``root`` and renamed into place once complete.
    An existing non-empty ``root`` raises FileExistsError unless ``overwrite`` is true.
    """
    params = _params(train_clips, eval_clips, duration, max_events, seed, sample_rate)
    root = Path(root).absolute()
    if not overwrite and root.exists() and not _is_empty_dir(root):
        raise FileExistsError(
            f"{root} already exists and is not empty; pass overwrite=True to replace it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_tree(tmp, params)
        _install(tmp, root, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_tagging_dataset(
    root: str | os.PathLike,
    *,
    train_clips: int = 600,
    eval_clips: int = 200,
    duration: float = 3.0,
    max_events: int = 3,
    seed: int = 0,
    sample_rate: int = 16000,
) -> Path:
    """Return ``root``, generating the set first unless an identical one is already there.

    A tree counts as present only with its csvs and a marker recording the same parameters.
    A tree this module wrote with other parameters is regenerated; a non-empty directory
    without a marker is somebody else's data and is left alone (FileExistsError).
    """
    kwargs = dict(train_clips=train_clips, eval_clips=eval_clips, duration=duration,
                  max_events=max_events, seed=seed, sample_rate=sample_rate)
    params = _params(**kwargs)
    root = Path(root).absolute()
    if _is_complete(root, params):
        return root
    marker = _read_marker(root)
    ours = marker is not None and marker.get("generator") == params["generator"]
    if root.exists() and not ours and not _is_empty_dir(root):
        raise FileExistsError(
            f"{root} exists but is not a tagging set written by this generator (no "
            f"{MARKER_NAME} marker of it); refusing to overwrite it. Point data.root at an "
            "empty or new directory."
        )
    try:
        return generate_tagging_dataset(root, overwrite=ours, **kwargs)
    except FileExistsError:
        # Another process may have finished the same set in the meantime.
        if _is_complete(root, params):
            return root
        raise
