"""Classify audio files with a trained model.

    python -m src.predict RUN_DIR_OR_MODEL audio=PATH [PATH ...] [top_k=5]
        [window=auto|SECONDS] [hop=SECONDS] [per_window=true] [batch_size=32] [--json]

``RUN_DIR_OR_MODEL`` is a saved ``.keras`` model, a fold directory (``fold_<k>/`` holding
``model.keras``) or a run directory (``runs/<name>/<overrides>/``: the fold with the best
accuracy in the run's ``results.json`` is used, or the only ``fold_*/model.keras``).
``audio=`` may be given several times or once followed by several paths; plain paths after
the model are audio files too.

Each file is decoded as in training (any format libsndfile reads, mono, resampled to the
model's rate, mean removed when the run's ``data.remove_mean`` says so), cut into windows
of the model's clip length (``window=SECONDS`` for shorter windows, zero-padded to the clip
length) every ``hop`` seconds (default: half a window; the last window is zero-padded; a model
with ``target_frames``, such as an imported AST, takes short pieces unpadded and zero-pads their
features instead, as AST does), and
the softmax probabilities of the windows are averaged. ``per_window=true`` also lists the
top class of every window.

Prints the ``top_k`` classes per file, or one JSON document with ``--json``. A file that
cannot be read gets an error line (and an ``error`` entry in the JSON) and the others are
still classified. Exit status: 0 when every file was classified, 1 when some could not be
read, 2 for bad arguments or a model that cannot be found or loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
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
    "predict_files",
    "resolve_model",
    "run_remove_mean",
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


def _accuracy(entry) -> float | None:
    try:
        value = float(entry["accuracy"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fold_accuracies(run_dir: Path) -> dict[int, float]:
    """Test accuracy per fold: ``per_fold`` of the run's results.json, else each fold's own."""
    out: dict[int, float] = {}
    results = _read_json(run_dir / "results.json")
    for entry in (results or {}).get("per_fold") or []:
        if isinstance(entry, dict) and "fold" in entry and _accuracy(entry) is not None:
            out[int(entry["fold"])] = _accuracy(entry)
    if out:
        return out
    for fold_results in run_dir.glob("fold_*/results.json"):
        fold = _fold_number(fold_results.parent)
        entry = _read_json(fold_results)
        if fold is not None and entry is not None and _accuracy(entry) is not None:
            out[fold] = _accuracy(entry)
    return out


def resolve_model(target: str | os.PathLike) -> ResolvedModel:
    """Find the saved model meant by a ``.keras`` file, a fold dir or a run dir.

    A run dir with several fold models: the fold with the best test accuracy (per_fold in
    results.json, else fold_<k>/results.json; ties go to the lower fold).
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
    if not models:
        raise ModelNotFoundError(
            f"no saved model under {path}: looked for {path / MODEL_FILE} and "
            f"{path}/fold_*/{MODEL_FILE} (a training run writes them with "
            f"trainer.save_model=true); expected {what}."
        )
    if len(models) == 1:
        fold, model_path = next(iter(models.items()))
        return ResolvedModel(model_path, path, fold)
    scored = {f: acc for f, acc in _fold_accuracies(path).items() if f in models}
    if not scored:
        listed = ", ".join(str(models[f].parent.name) for f in sorted(models))
        raise ModelNotFoundError(
            f"{path} holds {len(models)} fold models ({listed}) but no fold accuracies to "
            f"choose between them: looked for per_fold in {path / 'results.json'} and for "
            f"{path}/fold_*/results.json. Pass one fold directory instead."
        )
    best = max(scored, key=lambda f: (scored[f], -f))
    return ResolvedModel(models[best], path, best)


def run_remove_mean(resolved: ResolvedModel, default: bool = True) -> bool:
    """``data.remove_mean`` of the run that trained the model, or ``default`` if unknown."""
    if resolved.run_dir is None:
        return default
    config = resolved.run_dir / "config.yaml"
    if not config.is_file():
        return default
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(OmegaConf.load(config), "data.remove_mean", default=None)
    except Exception:  # an unreadable config only costs the default
        return default
    return default if value is None else bool(value)


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
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_audio(path: str | os.PathLike, sample_rate: int, remove_mean: bool = True) -> np.ndarray:
    """Mono float32 samples at ``sample_rate``, decoded as in training (whole file)."""
    import tensorflow as tf

    from src.data.audio import decode_audio

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioReadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AudioReadError(f"{path}: is a directory, not an audio file")
    try:
        audio = decode_audio(tf.constant(path), sample_rate, None, remove_mean=remove_mean)
        audio = np.asarray(audio, dtype=np.float32)
    except Exception as err:  # libsndfile / TensorFlow decode errors
        raise AudioReadError(f"{path}: cannot decode audio: {_error_reason(err)}") from err
    if audio.size == 0:
        raise AudioReadError(f"{path}: the file holds no audio samples")
    if not np.isfinite(audio).all():
        raise AudioReadError(f"{path}: the decoded audio holds NaN or infinite samples")
    return audio


# --------------------------------------------------------------------------- prediction


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


def _cut_windows(audio: np.ndarray, window: int, hop: int, clip: int):
    """Windows ``(n, clip)`` (each zero-padded to the model's clip) and their start samples."""
    n = len(audio)
    count = 1 if n <= window else 1 + math.ceil((n - window) / hop)
    starts = np.arange(count) * hop
    out = np.zeros((count, clip), dtype=np.float32)
    for i, start in enumerate(starts):
        piece = audio[start : start + window]
        out[i, : len(piece)] = piece
    return out, starts


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _class_names(model, num_classes: int) -> list[str]:
    names = getattr(model, "class_names", None)
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    return [f"class_{i}" for i in range(num_classes)]


def _logits(model, windows: np.ndarray, batch_size: int, eager: bool = False) -> np.ndarray:
    run = model if eager else model.predict_on_batch
    parts = [
        np.asarray(run(windows[i : i + batch_size].astype(np.float32)), dtype=np.float32)
        for i in range(0, len(windows), batch_size)
    ]
    return np.concatenate(parts, axis=0)


def predict_files(
    model,
    paths: Iterable[str | os.PathLike],
    *,
    top_k: int = 5,
    window_s: float | None = None,
    hop_s: float | None = None,
    per_window: bool = False,
    remove_mean: bool = True,
    batch_size: int = 32,
) -> list[dict]:
    """Classify each file; one dict per file, in order.

    Keys: ``path``, ``duration_s`` (after resampling), ``windows``, ``top`` (the ``top_k``
    classes of the window-averaged softmax, ``{"label", "prob"}``, best first),
    ``per_window`` (with ``per_window=True``: each window's ``start_s``, ``end_s``, top
    ``label`` and its ``prob``; else None) and ``error`` (None, or why the file could not
    be read; the other keys are then empty).
    """
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sample_rate = int(model.frontend.sample_rate)
    clip = int(model.clip_samples)
    window, hop = window_samples(model, window_s, hop_s)
    names: list[str] | None = None
    results = []
    for path in paths:
        entry = {
            "path": os.fspath(path),
            "duration_s": None,
            "windows": 0,
            "top": [],
            "per_window": [] if per_window else None,
            "error": None,
        }
        results.append(entry)
        try:
            audio = load_audio(path, sample_rate, remove_mean=remove_mean)
        except AudioReadError as err:
            entry["error"] = str(err)
            continue
        windows, starts = _cut_windows(audio, window, hop, clip)
        # Models that pad their features (AST: zeros up to target_frames frames) see a
        # short piece as it is, not followed by samples of digital silence.
        short: dict[int, list[int]] = {}  # piece length -> window indices
        if getattr(model, "target_frames", None) is not None:
            for i, start in enumerate(starts):
                n = len(audio[start : start + window])
                if n < clip and model.frontend.num_frames(n) > 0:
                    short.setdefault(n, []).append(i)
        padded = np.setdiff1d(np.arange(len(windows)), sum(short.values(), []))
        groups = [(padded, windows[padded], True)] if len(padded) else []
        groups += [
            (np.asarray(idx), np.stack([audio[starts[i] : starts[i] + n] for i in idx]), False)
            for n, idx in short.items()
        ]
        logits = None
        for idx, batch, full in groups:
            # Pieces of another length run eagerly: the padding to target_frames needs
            # their frame count, which a traced predict function may leave unknown.
            out = _logits(model, batch, int(batch_size), eager=not full)
            if logits is None:
                logits = np.zeros((len(windows), out.shape[-1]), dtype=np.float32)
            logits[idx] = out
        probs = _softmax(logits)  # (windows, classes)
        if names is None:
            names = _class_names(model, probs.shape[-1])
        mean = probs.mean(axis=0)
        order = np.argsort(-mean, kind="stable")[: int(top_k)]
        entry["duration_s"] = len(audio) / sample_rate
        entry["windows"] = int(len(windows))
        entry["top"] = [{"label": names[i], "prob": float(mean[i])} for i in order]
        if per_window:
            best = probs.argmax(axis=-1)
            entry["per_window"] = [
                {
                    "start_s": float(start) / sample_rate,
                    "end_s": float(min(start + window, len(audio))) / sample_rate,
                    "label": names[b],
                    "prob": float(p[b]),
                }
                for start, b, p in zip(starts, best, probs)
            ]
    return results


# --------------------------------------------------------------------------- command line

_OPTIONS = ("audio", "top_k", "window", "hop", "per_window", "batch_size")
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
    json: bool = False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.predict",
        description="Classify audio files with a trained model (top classes per file).",
        epilog=(
            "options as key=value: audio=PATH [PATH ...] (repeatable), top_k=5, "
            "window=auto|SECONDS, hop=SECONDS (default: half a window), per_window=true, "
            "batch_size=32. Exit status 1 when some file could not be read."
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
                if value:
                    audio.append(value)
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
    if "per_window" in values:
        flag = values["per_window"].lower()
        if flag not in _TRUE | _FALSE:
            parser.error(f"per_window={values['per_window']!r}: expected true or false")
        args.per_window = flag in _TRUE
    return args


def _print_text(resolved: ResolvedModel, model, window: int, hop: int, results) -> None:
    rate = int(model.frontend.sample_rate)
    print(
        f"model: {resolved.describe()}; {rate} Hz, windows of {window / rate:g} s "
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
        if entry["per_window"]:
            print("  per window:")
            for w in entry["per_window"]:
                print(f"    {w['start_s']:8.2f} s  {w['label']}  {w['prob']:.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    try:
        resolved = resolve_model(args.model)
        model = load_waveform_model(resolved.path)
        window, hop = window_samples(model, args.window_s, args.hop_s)
    except (ModelNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    remove_mean = run_remove_mean(resolved)
    results = predict_files(
        model,
        args.audio,
        top_k=args.top_k,
        window_s=args.window_s,
        hop_s=args.hop_s,
        per_window=args.per_window,
        remove_mean=remove_mean,
        batch_size=args.batch_size,
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
            "remove_mean": remove_mean,
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
