"""Label audio files with a trained model.

    python -m src.predict RUN_DIR_OR_MODEL audio=PATH [PATH ...] [top_k=5]
        [window=auto|SECONDS] [hop=SECONDS] [per_window=true] [batch_size=32]
        [threshold=0.5|FILE] [--json]

``RUN_DIR_OR_MODEL`` is a saved ``.keras`` model, a fold directory (``fold_<k>/`` holding
``model.keras``) or a run directory (``runs/<name>/<overrides>/``: the fold whose model has
the best validation metric in the folds' results, or the only ``fold_*/model.keras``;
the test split never chooses). ``audio=`` may be given several times or once followed by
several paths; plain paths after the model are audio files too.

Each file is streamed (any length in bounded memory: read and resampled in blocks, as
training decodes it: any format libsndfile reads, mono, resampled to the model's rate)
and cut into windows of the model's input length (``window=SECONDS`` for shorter
windows) every ``hop`` seconds (default: half a window); the last window ends at the end
of the file, so no window holds padding (:mod:`src.data.windows`). A file shorter than
one window is one window: zero-padded to the model's clip, as training padded short
clips (a model with a fixed position grid, or one that pads its features to
``target_frames``: training saw silence up to the clip length, then the model's zero
frames), or given as it is to a model that takes any length
(``model.pos_embedding=disentangled``; zero-padded only up to one patch of frames,
:func:`min_input_samples`) and to an imported AST checkpoint (whose fbank AST's code
zero-pads). The model removes each window's mean and clips
it (it stores whether it was trained so). Window probabilities (softmax for a
single-label model, sigmoid for a multi-label one) are averaged, weighted by coverage.

Prints the ``top_k`` classes per file; a multi-label model also lists every class whose
probability reaches ``threshold`` (a number, or a file of ``class,threshold`` lines or a
JSON object ``{class: threshold}``, per class; default 0.5). ``per_window=true`` also
lists each window's top class. ``--json`` prints one JSON document. A file that cannot be
read gets an error line (and an ``error`` entry in the JSON) and the others are still
labelled. Exit status: 0 when every file was labelled, 1 when some could not be read, 2
for bad arguments or a model that cannot be found or loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

MODEL_FILE = "model.keras"
_FOLD_DIR = re.compile(r"^fold_(\d+)$")

__all__ = [
    "AudioReadError",
    "ModelNotFoundError",
    "ResolvedModel",
    "load_audio",
    "load_waveform_model",
    "main",
    "min_input_samples",
    "predict_files",
    "resolve_model",
    "stream_windows",
    "window_samples",
]


class ModelNotFoundError(FileNotFoundError):
    """No saved model where one was asked for."""


class AudioReadError(Exception):
    """An audio file that cannot be read; the message names the file and the reason."""


# --------------------------------------------------------------------------- model lookup


@dataclass(frozen=True)
class ResolvedModel:
    """A saved model and, when it sits in a run directory, that run and its fold."""

    path: Path
    run_dir: Path | None = None
    fold: int | None = None

    def describe(self) -> str:
        return f"{self.path} (fold {self.fold})" if self.fold is not None else str(self.path)


def _fold_number(directory: Path) -> int | None:
    match = _FOLD_DIR.match(directory.name)
    return int(match.group(1)) if match else None


def _run_dir_of(model_dir: Path) -> Path | None:
    """The run directory of a model saved in ``model_dir`` (a fold dir, or the run itself)."""
    candidate = model_dir.parent if _fold_number(model_dir) is not None else model_dir
    if (candidate / "config.yaml").is_file() or (candidate / "results.json").is_file():
        return candidate
    return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _validation_score(entry) -> float | None:
    """The validation metric of a fold's saved (last-epoch) model."""
    if not isinstance(entry, dict):
        return None
    primary = entry.get("primary_metric") or "accuracy"
    try:
        value = float(entry[f"val_{primary}"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def fold_validation_scores(run_dir: Path) -> dict[int, float]:
    """Validation metric per fold, from each ``fold_<k>/results.json``."""
    out: dict[int, float] = {}
    for fold_results in run_dir.glob("fold_*/results.json"):
        fold = _fold_number(fold_results.parent)
        score = _validation_score(_read_json(fold_results))
        if fold is not None and score is not None:
            out[fold] = score
    return out


def resolve_model(target: str | os.PathLike) -> ResolvedModel:
    """Find the saved model meant by a ``.keras`` file, a fold dir or a run dir.

    A run dir with several fold models: the fold with the best validation metric
    (``val_accuracy`` or ``val_mAP`` in fold_<k>/results.json; ties go to the lower fold).
    """
    path = Path(target)
    what = "a .keras file, a fold dir (fold_<k>/model.keras) or a run dir (runs/<name>/<overrides>/)"
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist; expected {what}.")
    if path.is_file():
        if path.suffix != ".keras":
            raise ModelNotFoundError(f"{path} is not a .keras model file; expected {what}.")
        return ResolvedModel(path, _run_dir_of(path.parent), _fold_number(path.parent))
    if (path / MODEL_FILE).is_file():
        return ResolvedModel(path / MODEL_FILE, _run_dir_of(path), _fold_number(path))

    models = {}
    for model_path in sorted(path.glob(f"fold_*/{MODEL_FILE}")):
        fold = _fold_number(model_path.parent)
        if fold is not None and model_path.is_file():
            models[fold] = model_path
    if not models and (path / "backbone.keras").is_file():  # a pretraining run
        return ResolvedModel(path / "backbone.keras", path, None)
    if not models:
        folds = sorted(p for p in path.glob("fold_*") if p.is_dir())
        unfinished = [p.name for p in folds if not (p / "results.json").exists()]
        why = ("a training run writes them with trainer.save_model=true, once a fold is "
               "finished")
        if unfinished:
            why = (f"{', '.join(unfinished)} of this run did not finish (no results.json): "
                   "rerun its training command to resume it")
        raise ModelNotFoundError(
            f"no saved model under {path}: looked for {path / MODEL_FILE}, "
            f"{path}/fold_*/{MODEL_FILE} and {path / 'backbone.keras'} ({why}); expected "
            f"{what}."
        )
    if len(models) == 1:
        fold, model_path = next(iter(models.items()))
        return ResolvedModel(model_path, path, fold)
    scored = {f: s for f, s in fold_validation_scores(path).items() if f in models}
    if not scored:
        listed = ", ".join(str(models[f].parent.name) for f in sorted(models))
        raise ModelNotFoundError(
            f"{path} holds {len(models)} fold models ({listed}) but no validation scores to "
            f"choose between them (val_* in {path}/fold_*/results.json). Pass one fold "
            "directory instead."
        )
    best = max(scored, key=lambda f: (scored[f], -f))
    return ResolvedModel(models[best], path, best)


def load_waveform_model(path: str | os.PathLike):
    """Load a saved waveform model (``AudioTransformer``: waveform in, logits out)."""
    from src.models import load_model

    model = load_model(path)
    missing = [a for a in ("frontend", "clip_samples") if not hasattr(model, a)]
    if missing or not hasattr(model.frontend, "sample_rate"):
        raise ValueError(
            f"{path} holds a {type(model).__name__}, not a waveform model with a frontend "
            f"(save the AudioTransformer that training writes as model.keras)."
        )
    return model


# --------------------------------------------------------------------------- audio


def _error_reason(err: BaseException) -> str:
    """A one-line reason from a TensorFlow or libsndfile error."""
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S)
    text = re.sub(r"^Error opening '.*?': ", "", text)  # libsndfile repeats the path
    text = re.sub(r"^.*?: (cannot|not an?|no )", r"\1", text, count=1)  # our own path prefix
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise AudioReadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AudioReadError(f"{path}: is a directory, not an audio file")


def load_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of a whole file at ``sample_rate``, decoded as in training."""
    from src.data.audio import read_audio

    path = os.fspath(path)
    _check_path(path)
    try:
        audio = read_audio(path, sample_rate)
    except Exception as err:  # libsndfile / soxr errors
        raise AudioReadError(f"{path}: cannot decode audio: {_error_reason(err)}") from err
    if audio.size == 0:
        raise AudioReadError(f"{path}: the file holds no audio samples")
    return audio


def read_blocks(path: str, sample_rate: int, block_s: float) -> Iterator[np.ndarray]:
    from src.data.audio import read_audio_blocks

    _check_path(path)
    try:
        for block in read_audio_blocks(path, sample_rate, block_s):
            if not np.isfinite(block).all():
                raise AudioReadError(f"{path}: the decoded audio holds NaN or infinite samples")
            yield block
    except AudioReadError:
        raise
    except Exception as err:  # libsndfile / soxr errors
        raise AudioReadError(f"{path}: cannot decode audio: {_error_reason(err)}") from err


def stream_windows(
    blocks: Iterable[np.ndarray], window: int, hop: int
) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, samples)`` of the windows of :func:`src.data.windows.window_starts` over a
    stream of sample blocks, holding at most about one window plus one block in memory.
    The last window ends at the end of the stream; a stream shorter than one window gives
    one window with all of it (unpadded)."""
    buf = np.zeros(0, np.float32)
    offset = 0  # stream position of buf[0]
    next_start = 0
    emitted_last = -1
    for block in blocks:
        buf = np.concatenate([buf, np.asarray(block, np.float32)])
        end = offset + len(buf)
        # A window is certain once it ends strictly before the data seen so far ends.
        while next_start + window < end:
            i = next_start - offset
            yield next_start, buf[i : i + window]
            emitted_last = next_start
            next_start += hop
        drop = min(next_start, max(end - window, 0)) - offset
        if drop > 0:
            buf, offset = buf[drop:], offset + drop
    end = offset + len(buf)
    if end == 0:
        return
    if end <= window:
        yield 0, buf[: end - offset]
        return
    last = end - window
    if last > emitted_last:
        yield last, buf[last - offset : last - offset + window]


def window_samples(model, window_s: float | None = None, hop_s: float | None = None):
    """``(window, hop)`` in samples; the window defaults to the model's clip length."""
    sample_rate = int(model.frontend.sample_rate)
    clip = int(model.clip_samples)
    window = clip if window_s is None else int(round(float(window_s) * sample_rate))
    if window <= 0:
        raise ValueError(f"window={window_s} s is shorter than one sample at {sample_rate} Hz.")
    if window > clip:
        raise ValueError(
            f"window={window_s} s is longer than the model's clips ({clip / sample_rate:g} s, "
            f"{clip} samples); use window=auto or at most {clip / sample_rate:g}."
        )
    hop = max(1, window // 2) if hop_s is None else int(round(float(hop_s) * sample_rate))
    if hop <= 0:
        raise ValueError(f"hop={hop_s} s is shorter than one sample at {sample_rate} Hz.")
    if hop > window:
        raise ValueError(
            f"hop={hop_s} s is longer than the window ({window / sample_rate:g} s): parts of the "
            f"audio would be skipped."
        )
    return window, hop


def _class_names(model, num_classes: int) -> list[str]:
    names = getattr(model, "class_names", None)
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    return [f"class_{i}" for i in range(num_classes)]


def takes_short_input(model) -> bool:
    """Whether a window shorter than the clip goes in unpadded: the model's position
    embedding takes any length and it does not pad its features to a fixed count.

    A model with ``target_frames`` pads its features with zeros. Trained by src.train, a
    short clip was first padded to the clip length with silence (zero samples, or the
    feature store's frames of silence) and only the frames beyond the clip with zeros:
    its short windows are zero-padded to the clip, so that it sees the same. An imported
    AST checkpoint (``short_input="features"``) saw its fbank zero-padded, as AST's code
    pads it: its short windows go in as they are."""
    if getattr(model, "target_frames", None) is not None:
        return getattr(model, "short_input", "clip") == "features"
    hp = getattr(model.backbone, "hparams", {})
    return hp.get("pos_embedding") == "disentangled"


def min_input_samples(model) -> int:
    """The fewest samples a window may hold when it goes to the model: the model's clip
    unless it takes short input (:func:`takes_short_input`; shorter windows are
    zero-padded to it); else the samples of the frames it needs (one patch of frames, or
    one frame for a model that pads its features), shorter windows zero-padded to that."""
    clip = int(model.clip_samples)
    if not takes_short_input(model):
        return clip
    need = 1  # target_frames pads the rest
    if getattr(model, "target_frames", None) is None:
        need = int(model.backbone.hparams.get("patch_size", 1))
    lo, hi = 1, clip  # the frame count grows with the sample count: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if model.frontend.num_frames(mid) >= need:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _score(model, pieces: list[np.ndarray], clip: int, batch_size: int) -> np.ndarray:
    """Probabilities of each piece (window samples)."""
    from src.evaluation.evaluate import probabilities

    multi = bool(getattr(model, "multi_label", False))
    out = []
    full = [p for p in pieces if len(p) == clip]
    if len(full) == len(pieces):
        for i in range(0, len(pieces), batch_size):
            x = np.stack(pieces[i : i + batch_size]).astype(np.float32)
            out.append(np.asarray(model.predict_on_batch(x), np.float64))
        return probabilities(np.concatenate(out), multi)
    shortest = min_input_samples(model)
    for p in pieces:  # short pieces: one at a time, at their own length or padded
        if len(p) < shortest:
            p = np.pad(p, (0, shortest - len(p)))
        # Another length than the traced predict function: run the model eagerly.
        logits = np.asarray(model(p[None].astype(np.float32), training=False), np.float64)
        out.append(logits)
    return probabilities(np.concatenate(out), multi)


def read_thresholds(value, class_names: Sequence[str]) -> np.ndarray:
    """``threshold=`` as one value per class: a number, or a file (``class,threshold``
    lines, or a JSON object); every class must be listed in a file."""
    k = len(class_names)
    try:
        t = float(value)
    except (TypeError, ValueError):
        pass
    else:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold={value!r}: a probability threshold is between 0 and "
                             "1 (0.5 is a common start)")
        return np.full(k, t)
    path = Path(str(value))
    if not path.is_file():
        raise ValueError(f"threshold={value!r} is neither a number nor a file")
    text = path.read_text()
    try:
        table = {str(c): float(v) for c, v in json.loads(text).items()}
    except (ValueError, AttributeError):
        table, line_of = {}, {}
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, sep, number = line.rpartition(",")
            name = name.strip().strip('"')
            if name in line_of:
                raise ValueError(f"{path} line {n}: {name!r} has a threshold already (line "
                                 f"{line_of[name]}); name each class once") from None
            try:
                table[name] = float(number)
            except ValueError:
                raise ValueError(f"{path} line {n}: expected 'class,threshold', got {line!r}") from None
            line_of[name] = n
    outside = [f"{c}={t:g}" for c, t in table.items() if not 0.0 <= t <= 1.0]
    if outside:
        raise ValueError(f"{path}: thresholds are probabilities between 0 and 1; got "
                         f"{', '.join(outside[:10])}")
    missing = [c for c in class_names if c not in table]
    unknown = [c for c in table if c not in set(class_names)]
    if missing or unknown:
        def listed(names):
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            return f"{', '.join(map(repr, names[:10]))}{more}"

        parts = ([f"missing {len(missing)} of the model's {len(class_names)} classes: "
                  f"{listed(missing)}"] if missing else [])
        parts += [f"{len(unknown)} name(s) the model does not have: {listed(unknown)}"
                  if unknown else ""]
        raise ValueError(
            f"{path}: a threshold file names every class of the model once (a number, "
            f"threshold=0.3, applies one threshold to all); {'; '.join(p for p in parts if p)}"
        )
    return np.array([table[c] for c in class_names])


def predict_files(
    model,
    paths: Iterable[str | os.PathLike],
    *,
    top_k: int = 5,
    window_s: float | None = None,
    hop_s: float | None = None,
    per_window: bool = False,
    batch_size: int = 32,
    threshold=0.5,
) -> list[dict]:
    """Label each file; one dict per file, in order.

    Keys: ``path``, ``duration_s``, ``windows``, ``top`` (the ``top_k`` classes of the
    window-averaged probabilities, ``{"label", "prob"}``, best first), ``labels`` (a
    multi-label model's classes at or above their threshold, else None), ``per_window``
    (with ``per_window=True``: each window's ``start_s``, ``end_s``, top ``label`` and its
    ``prob``; else None), ``notes`` (what about the input may make the labels mean less:
    silence, a file shorter than the model's input and zero-padded, samples at or beyond
    full scale, another rate or several channels; empty when none) and ``error`` (None,
    or why the file could not be read).
    """
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sample_rate = int(model.frontend.sample_rate)
    clip = int(model.clip_samples)
    window, hop = window_samples(model, window_s, hop_s)
    multi = bool(getattr(model, "multi_label", False))
    names = _class_names(model, int(model.backbone.hparams["num_classes"]))
    thresholds = read_thresholds(threshold, names) if multi else None
    block_s = max(window, 4 * batch_size * hop) / sample_rate
    results = []
    for path in paths:
        path = os.fspath(path)
        entry = {"path": path, "duration_s": None, "windows": 0, "top": [], "labels": None,
                 "per_window": [] if per_window else None, "notes": [], "error": None}
        results.append(entry)
        acc = _Average(model, names, clip, window, int(batch_size), per_window)
        level = _Level()
        try:
            blocks = level.watch(read_blocks(path, sample_rate, block_s))
            for start, piece in stream_windows(blocks, window, hop):
                # Windows shorter than the model's clip (window=SECONDS) are padded.
                if len(piece) == window and window < clip and not takes_short_input(model):
                    piece = np.pad(piece, (0, clip - window))
                acc.add(start, piece)
            acc.flush()
        except AudioReadError as err:
            entry["error"] = str(err)
            continue
        if acc.count == 0:
            entry["error"] = f"{path}: the file holds no audio samples"
            continue
        mean = acc.total / acc.weight
        order = np.argsort(-mean, kind="stable")[: int(top_k)]
        entry["duration_s"] = acc.length / sample_rate
        entry["notes"] = _input_notes(path, sample_rate, level, acc.length, clip, model)
        entry["windows"] = acc.count
        entry["top"] = [{"label": names[i], "prob": float(mean[i])} for i in order]
        if per_window:
            entry["per_window"] = acc.windows
        if multi:
            hit = np.flatnonzero(mean >= thresholds)
            hit = hit[np.argsort(-mean[hit], kind="stable")]
            entry["labels"] = [{"label": names[i], "prob": float(mean[i])} for i in hit]
    return results


class _Level:
    """The peak and the full-scale samples of the blocks passing through ``watch``."""

    def __init__(self):
        self.peak, self.full_scale = 0.0, 0

    def watch(self, blocks):
        for block in blocks:
            if block.size:
                magnitude = np.abs(block)
                self.peak = max(self.peak, float(magnitude.max()))
                self.full_scale += int(np.count_nonzero(magnitude >= 1.0))
            yield block


def _short_note(length: int, clip: int, rate: int, model) -> str:
    """What the model saw of a file shorter than its clip (:func:`takes_short_input`)."""
    text = f"{length / rate:.3g} s, shorter than the model's input of {clip / rate:g} s: "
    if not takes_short_input(model):
        return text + (f"zero-padded ({100 * (1 - length / clip):.0f}% of what the model saw "
                       "is padding)")
    frames = getattr(model, "target_frames", None)
    if frames is not None:
        return text + f"its features zero-padded to the model's {int(frames)} frames, as AST does"
    least = min_input_samples(model)
    if length < least:
        return text + (f"zero-padded to {least / rate:.3g} s, the least the model takes (one "
                       "patch of frames); the model takes shorter input as it is otherwise")
    return text + "the model takes it as it is (the first time positions, no padding)"


def _input_notes(path: str, sample_rate: int, level: _Level, length: int, clip: int,
                 model) -> list:
    """What about a file may make its labels mean less (as ``scripts.check_data`` notes
    for a dataset): silence, zero-padding to the model's input, clipping, conversions."""
    import math

    import soundfile as sf

    from src.data.check import SILENCE_DBFS

    notes = []
    if level.peak == 0.0 or 20.0 * math.log10(level.peak) < SILENCE_DBFS:
        notes.append("silent (all zeros)" if level.peak == 0.0 else
                     f"silent (peak {20.0 * math.log10(level.peak):.1f} dBFS): the labels "
                     "describe nothing in the file")
    if length < clip:
        notes.append(_short_note(length, clip, sample_rate, model))
    if level.full_scale:
        notes.append(f"{level.full_scale} sample(s) at or beyond full scale (clipped to "
                     "[-1, 1]): the recording may be distorted")
    try:
        info = sf.info(path)
    except Exception:  # decoded above; the format's details are only for notes
        return notes
    if info.samplerate != sample_rate:
        notes.append(f"{info.samplerate} Hz, resampled to {sample_rate} Hz")
    if info.channels > 1:
        notes.append(f"{info.channels} channels, averaged to mono")
    return notes


class _Average:
    """The coverage-weighted mean of a file's window probabilities, scored in batches."""

    def __init__(self, model, names, clip, window, batch_size, per_window):
        self.model, self.names, self.clip, self.window = model, names, clip, window
        self.batch_size, self.per_window = batch_size, per_window
        self.rate = int(model.frontend.sample_rate)
        self.pending: list[tuple[int, np.ndarray]] = []
        self.total, self.weight, self.count, self.length = None, 0.0, 0, 0
        self.windows: list[dict] = []

    def add(self, start: int, piece: np.ndarray) -> None:
        self.pending.append((start, piece))
        self.length = max(self.length, start + min(len(piece), self.window))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        probs = _score(self.model, [p for _, p in self.pending], self.clip, self.batch_size)
        for (start, piece), p in zip(self.pending, probs):
            w = min(len(piece), self.window) / self.window  # coverage (src.data.windows)
            self.total = w * p if self.total is None else self.total + w * p
            self.weight += w
            self.count += 1
            if self.per_window:
                b = int(p.argmax())
                self.windows.append({
                    "start_s": start / self.rate,
                    "end_s": (start + min(len(piece), self.window)) / self.rate,
                    "label": self.names[b], "prob": float(p[b]),
                })
        self.pending.clear()


# --------------------------------------------------------------------------- command line

_OPTIONS = ("audio", "top_k", "window", "hop", "per_window", "batch_size", "threshold")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass
class _Args:
    model: str
    audio: list[str]
    top_k: int = 5
    window_s: float | None = None
    hop_s: float | None = None
    per_window: bool = False
    batch_size: int = 32
    threshold: str = "0.5"
    json: bool = False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.predict",
        description="Label audio files with a trained model (top classes per file).",
        epilog=(
            "options as key=value: audio=PATH [PATH ...] (repeatable; also audio=A,B), "
            "top_k=5, "
            "window=auto|SECONDS, hop=SECONDS (default: half a window), per_window=true, "
            "batch_size=32, threshold=0.5|FILE (multi-label models). Exit status 1 when "
            "some file could not be read."
        ),
    )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="ARG",
        help="RUN_DIR_OR_MODEL, then key=value options and audio file paths",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def _positive(parser, key, value, kind):
    try:
        number = kind(value)
    except ValueError:
        parser.error(f"{key}={value!r}: expected a {'whole ' if kind is int else ''}number")
    if not number > 0 or (kind is float and not math.isfinite(number)):
        parser.error(f"{key}={value!r}: must be positive")
    return number


def _audio_paths(value: str) -> list[str]:
    """``audio=``'s value: one path, or, where no file has that name, Hydra's list forms
    ``a.wav,b.wav`` and ``[a.wav,b.wav]`` (each part then checked as a file)."""
    if not value or os.path.exists(value):
        return [value] if value else []
    inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if "," not in inner and inner == value:
        return [value]
    return [part.strip() for part in inner.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None = None) -> _Args:
    parser = _parser()
    ns = parser.parse_intermixed_args(argv)
    model = None
    audio: list[str] = []
    values: dict[str, str] = {}
    for token in ns.args:
        key, sep, value = token.partition("=")
        if sep and key in _OPTIONS:
            if key == "audio":
                audio.extend(_audio_paths(value))
            else:
                values[key] = value
        elif sep and not os.path.exists(token):
            parser.error(f"unknown option {key}= (options: {', '.join(_OPTIONS)})")
        elif model is None:
            model = token
        else:
            audio.append(token)
    if model is None:
        parser.error("missing RUN_DIR_OR_MODEL (a .keras file, a fold dir or a run dir)")
    if not audio:
        parser.error("no audio files given; pass audio=PATH [PATH ...]")
    args = _Args(model=model, audio=audio, json=ns.json)
    if "top_k" in values:
        args.top_k = _positive(parser, "top_k", values["top_k"], int)
    if "batch_size" in values:
        args.batch_size = _positive(parser, "batch_size", values["batch_size"], int)
    if "window" in values and values["window"].lower() != "auto":
        args.window_s = _positive(parser, "window", values["window"], float)
    if "hop" in values:
        args.hop_s = _positive(parser, "hop", values["hop"], float)
    if "threshold" in values:
        args.threshold = values["threshold"]
    if "per_window" in values:
        flag = values["per_window"].lower()
        if flag not in _TRUE | _FALSE:
            parser.error(f"per_window={values['per_window']!r}: expected true or false")
        args.per_window = flag in _TRUE
    return args


def _print_text(resolved: ResolvedModel, model, window: int, hop: int, results) -> None:
    rate = int(model.frontend.sample_rate)
    kind = "multi-label (sigmoid)" if getattr(model, "multi_label", False) else "softmax"
    print(
        f"model: {resolved.describe()}; {kind}; {rate} Hz, windows of {window / rate:g} s "
        f"every {hop / rate:g} s"
    )
    for entry in results:
        if entry["error"] is not None:
            sys.stdout.flush()
            print(f"\nerror: {entry['error']}", file=sys.stderr, flush=True)
            continue
        print(f"\n{entry['path']}: {entry['duration_s']:.2f} s, {entry['windows']} window(s)")
        width = max(len(t["label"]) for t in entry["top"])
        for rank, t in enumerate(entry["top"], 1):
            print(f"  {rank:>2}. {t['label']:<{width}}  {t['prob']:.4f}")
        if entry["labels"] is not None:
            shown = ", ".join(f"{t['label']} ({t['prob']:.2f})" for t in entry["labels"])
            print(f"  labels above threshold: {shown or 'none'}")
        for note in entry["notes"]:
            print(f"  note: {note}")
        if entry["per_window"]:
            print("  per window:")
            for w in entry["per_window"]:
                print(f"    {w['start_s']:8.2f} s  {w['label']}  {w['prob']:.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from src import import_tensorflow

    tf = import_tensorflow()

    tf.get_logger().setLevel(logging.ERROR)
    try:
        resolved = resolve_model(args.model)
        model = load_waveform_model(resolved.path)
        window, hop = window_samples(model, args.window_s, args.hop_s)
        if getattr(model, "multi_label", False):
            names = _class_names(model, int(model.backbone.hparams["num_classes"]))
            read_thresholds(args.threshold, names)
    except (ModelNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    results = predict_files(
        model,
        args.audio,
        top_k=args.top_k,
        window_s=args.window_s,
        hop_s=args.hop_s,
        per_window=args.per_window,
        batch_size=args.batch_size,
        threshold=args.threshold,
    )
    failed = [r for r in results if r["error"] is not None]
    rate = int(model.frontend.sample_rate)
    if args.json:
        for entry in failed:
            print(f"error: {entry['error']}", file=sys.stderr, flush=True)
        doc = {
            "model": str(resolved.path),
            "fold": resolved.fold,
            "sample_rate": rate,
            "window_s": window / rate,
            "hop_s": hop / rate,
            "multi_label": bool(getattr(model, "multi_label", False)),
            "remove_mean": bool(getattr(model, "remove_mean", True)),
            "files": results,
        }
        print(json.dumps(doc, indent=2), flush=True)
    else:
        _print_text(resolved, model, window, hop, results)
        if failed:
            print(
                f"\n{len(failed)} of {len(results)} file(s) could not be read.",
                file=sys.stderr,
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
