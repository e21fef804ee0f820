"""Deterministic synthetic sound-event dataset in ESC-50 layout.

The generated tree looks exactly like ESC-50, so the same reader and pipeline work on both::

    ROOT/audio/{fold}-{clip_id}-{take}-{target}.wav   # 16-bit PCM mono
    ROOT/meta/esc50.csv                               # filename,fold,target,category,esc10,src_file,take
    ROOT/.complete                                    # JSON of the generation parameters

Every class is a short sound event placed at a random onset inside a clip of background
noise. Classes come in pairs that share their spectral range and differ only in their
time-frequency structure (sweep direction, click rate, amplitude vs. frequency modulation,
noise colour), so a model has to look at the spectrogram over time, not just at the
average spectrum. Per-clip randomisation covers onset, event duration, pitch, amplitude,
background colour and SNR; parameter ranges of paired classes never overlap, so the task
is learnable.

Everything is a pure function of ``seed``: each clip draws from its own generator seeded by
``(seed, target, index)``, so a clip does not depend on how many others are generated.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

__all__ = [
    "CLASSES",
    "ESC10_CLASSES",
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "coloured_noise",
    "ensure_dataset",
    "generate_dataset",
    "synthesize_clip",
    "synthesize_event",
]

# Bump whenever the generated audio or layout changes, so cached trees are regenerated.
GENERATOR_VERSION = 1
MARKER_NAME = ".complete"
CSV_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
TAKE = "A"

CLASSES: tuple[str, ...] = (
    "chirp_up",
    "chirp_down",
    "clicks_slow",
    "clicks_fast",
    "am_tone",
    "fm_tone",
    "knock",
    "white_noise_burst",
    "brown_noise_burst",
    "dual_tone",
    "harmonic_stack",
    "tone_pulses",
)

# Ten-class subset flagged in the ``esc10`` column, mirroring ESC-50's ESC-10 subset. It is
# deliberately not a prefix of CLASSES, so selecting it remaps targets.
ESC10_CLASSES: frozenset[str] = frozenset(CLASSES) - {"knock", "dual_tone"}

_RAMP_S = 0.01  # raised-cosine fade in/out of tonal events
_SNR_DB = (5.0, 20.0)  # event-to-background ratio, measured over the event span
_PEAK = (0.25, 0.9)  # final clip peak amplitude
_MAX_EVENT_FRACTION = 0.8  # an event never covers more than this fraction of the clip

EventFn = Callable[[np.random.Generator, int, float], np.ndarray]


# --------------------------------------------------------------------------- primitives


def _seconds(n: int, sr: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / sr


def _event_len(rng: np.random.Generator, lo: float, hi: float, sr: int, clip_s: float) -> int:
    dur = min(rng.uniform(lo, hi), _MAX_EVENT_FRACTION * clip_s)
    return max(int(round(dur * sr)), 1)


def _fade(x: np.ndarray, sr: int, ramp_s: float = _RAMP_S) -> np.ndarray:
    n = min(int(round(ramp_s * sr)), len(x) // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))
        x = x.copy()
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _fmax(sr: int) -> float:
    """Highest frequency any component may use (keeps clear of Nyquist at low rates)."""
    return 0.45 * sr


def coloured_noise(
    rng: np.random.Generator, n: int, sr: int, exponent: float, f_floor: float = 30.0
) -> np.ndarray:
    """Unit-RMS noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown).

    The spectrum is flat below ``f_floor`` Hz, which avoids runaway DC / sub-audio drift.
    """
    white = rng.standard_normal(n)
    if exponent == 0.0:
        out = white
    else:
        spec = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n, d=1.0 / sr)
        freqs = np.maximum(freqs, f_floor)
        spec *= freqs ** (-exponent / 2.0)
        out = np.fft.irfft(spec, n=n)
    out -= out.mean()
    rms = np.sqrt(np.mean(out**2))
    return out / rms if rms > 0 else out


def _click_train(rng: np.random.Generator, sr: int, clip_s: float, rate: tuple[float, float]):
    n = _event_len(rng, 0.8, 1.6, sr, clip_s)
    hz = rng.uniform(*rate)
    period = sr / hz
    click_len = max(int(round(rng.uniform(0.002, 0.004) * sr)), 2)
    decay = np.exp(-np.arange(click_len) / (0.001 * sr))
    x = np.zeros(n)
    t = rng.uniform(0.0, 0.3) * period
    while t < n - click_len:
        start = int(t)
        amp = rng.uniform(0.8, 1.2)
        x[start : start + click_len] += amp * rng.standard_normal(click_len) * decay
        t += period * rng.uniform(0.95, 1.05)
    if not np.any(x):  # clip too short for a single period: still emit one click
        x[:click_len] = rng.standard_normal(click_len) * decay
    return x


# ------------------------------------------------------------------------------- events


def _chirp(rng: np.random.Generator, sr: int, clip_s: float, up: bool) -> np.ndarray:
    n = _event_len(rng, 0.4, 1.2, sr, clip_s)
    f_lo = rng.uniform(300.0, 700.0)
    f_hi = min(rng.uniform(2000.0, 3500.0), _fmax(sr))
    f0, f1 = (f_lo, f_hi) if up else (f_hi, f_lo)
    dur = n / sr
    t = _seconds(n, sr)
    k = f1 / f0  # exponential sweep: equal time per octave, a straight line on a mel axis
    phase = 2.0 * np.pi * f0 * dur / np.log(k) * (k ** (t / dur) - 1.0)
    return _fade(np.sin(phase + rng.uniform(0, 2 * np.pi)), sr)


def _chirp_up(rng, sr, clip_s):
    return _chirp(rng, sr, clip_s, up=True)


def _chirp_down(rng, sr, clip_s):
    return _chirp(rng, sr, clip_s, up=False)


def _clicks_slow(rng, sr, clip_s):
    return _click_train(rng, sr, clip_s, rate=(3.0, 6.0))


def _clicks_fast(rng, sr, clip_s):
    return _click_train(rng, sr, clip_s, rate=(15.0, 25.0))


def _am_tone(rng, sr, clip_s):
    n = _event_len(rng, 0.6, 1.5, sr, clip_s)
    t = _seconds(n, sr)
    fc = min(rng.uniform(400.0, 1500.0), _fmax(sr))
    fm = rng.uniform(4.0, 10.0)
    depth = rng.uniform(0.7, 1.0)
    env = 1.0 - depth * 0.5 * (1.0 + np.cos(2 * np.pi * fm * t + rng.uniform(0, 2 * np.pi)))
    return _fade(env * np.sin(2 * np.pi * fc * t + rng.uniform(0, 2 * np.pi)), sr)


def _fm_tone(rng, sr, clip_s):
    n = _event_len(rng, 0.6, 1.5, sr, clip_s)
    t = _seconds(n, sr)
    fc = min(rng.uniform(400.0, 1500.0), _fmax(sr) / 1.25)
    fm = rng.uniform(4.0, 10.0)
    dev = rng.uniform(0.1, 0.2) * fc  # peak deviation: several mel bands either side
    phase = 2 * np.pi * fc * t + (dev / fm) * np.sin(2 * np.pi * fm * t + rng.uniform(0, 2 * np.pi))
    return _fade(np.sin(phase), sr)


def _knock(rng, sr, clip_s):
    """A single damped resonance with a short noise transient (a knock on wood)."""
    n = _event_len(rng, 0.25, 0.4, sr, clip_s)
    t = _seconds(n, sr)
    f = min(rng.uniform(150.0, 500.0), _fmax(sr))
    tau = rng.uniform(0.03, 0.08)
    body = np.exp(-t / tau) * np.sin(2 * np.pi * f * t)
    # second, weaker mode a little above the first
    f2 = min(f * rng.uniform(2.2, 2.8), _fmax(sr))
    body += 0.4 * np.exp(-t / (0.6 * tau)) * np.sin(2 * np.pi * f2 * t)
    transient = rng.standard_normal(n) * np.exp(-t / 0.002) * 0.5
    return _fade(body + transient, sr, ramp_s=0.002)


def _white_noise_burst(rng, sr, clip_s):
    n = _event_len(rng, 0.3, 1.2, sr, clip_s)
    return _fade(coloured_noise(rng, n, sr, exponent=0.0), sr)


def _brown_noise_burst(rng, sr, clip_s):
    n = _event_len(rng, 0.3, 1.2, sr, clip_s)
    # flat up to 150 Hz so the burst's energy is not all below the lowest mel bands
    return _fade(coloured_noise(rng, n, sr, exponent=2.0, f_floor=150.0), sr)


def _dual_tone(rng, sr, clip_s):
    """Two simultaneous steady tones, like a telephone key (DTMF) tone."""
    n = _event_len(rng, 0.3, 1.0, sr, clip_s)
    t = _seconds(n, sr)
    f_low = rng.uniform(650.0, 950.0)
    f_high = min(rng.uniform(1200.0, 1650.0), _fmax(sr))
    x = np.sin(2 * np.pi * f_low * t + rng.uniform(0, 2 * np.pi))
    x += rng.uniform(0.7, 1.0) * np.sin(2 * np.pi * f_high * t + rng.uniform(0, 2 * np.pi))
    return _fade(x, sr)


def _harmonic_stack(rng, sr, clip_s):
    n = _event_len(rng, 0.5, 1.5, sr, clip_s)
    t = _seconds(n, sr)
    f0 = rng.uniform(120.0, 400.0)
    n_harm = int(rng.integers(4, 9))
    x = np.zeros(n)
    for k in range(1, n_harm + 1):
        if k * f0 >= _fmax(sr):
            break
        amp = rng.uniform(0.5, 1.0) / k**0.5
        x += amp * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
    return _fade(x, sr)


def _tone_pulses(rng, sr, clip_s):
    """3-6 rectangular beeps of one high tone, separated by silence."""
    f = min(rng.uniform(1800.0, 3000.0), _fmax(sr))
    n_pulses = int(rng.integers(3, 7))
    on = rng.uniform(0.05, 0.12)
    off = rng.uniform(0.05, 0.15)
    total = min(n_pulses * on + (n_pulses - 1) * off, _MAX_EVENT_FRACTION * clip_s)
    n = max(int(round(total * sr)), 1)
    t = _seconds(n, sr)
    tone = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    env = np.zeros(n)
    on_n, period_n = int(round(on * sr)), int(round((on + off) * sr))
    for start in range(0, n, max(period_n, 1)):
        seg = env[start : start + on_n]
        seg[:] = _fade(np.ones(len(seg)), sr, ramp_s=0.005)
    return tone * env


_EVENTS: dict[str, EventFn] = {
    "chirp_up": _chirp_up,
    "chirp_down": _chirp_down,
    "clicks_slow": _clicks_slow,
    "clicks_fast": _clicks_fast,
    "am_tone": _am_tone,
    "fm_tone": _fm_tone,
    "knock": _knock,
    "white_noise_burst": _white_noise_burst,
    "brown_noise_burst": _brown_noise_burst,
    "dual_tone": _dual_tone,
    "harmonic_stack": _harmonic_stack,
    "tone_pulses": _tone_pulses,
}
assert tuple(_EVENTS) == CLASSES


# --------------------------------------------------------------------------------- clips


def synthesize_event(
    target: int, rng: np.random.Generator, sample_rate: int, clip_seconds: float
) -> np.ndarray:
    """One sound event of class ``target`` (float64, unnormalised, no background), drawn
    from ``rng``; at most ``0.8 * clip_seconds`` long."""
    return _EVENTS[CLASSES[target]](rng, sample_rate, clip_seconds)


def synthesize_clip(target: int, index: int, *, seed: int, sample_rate: int, duration: float):
    """Return one clip (float64, mono, peak < 1) of class ``target``; pure in its arguments."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, target, index]))
    n = int(round(duration * sample_rate))
    event = synthesize_event(target, rng, sample_rate, duration)[:n]

    onset = int(rng.integers(0, n - len(event) + 1))
    clip_event = np.zeros(n)
    clip_event[onset : onset + len(event)] = event

    event_rms = np.sqrt(np.mean(event**2))
    snr_db = rng.uniform(*_SNR_DB)
    colour = rng.choice((0.0, 1.0))  # white or pink background
    background = coloured_noise(rng, n, sample_rate, exponent=colour)
    background *= event_rms * 10.0 ** (-snr_db / 20.0)

    clip = clip_event + background
    peak = np.max(np.abs(clip))
    return clip * (rng.uniform(*_PEAK) / peak) if peak > 0 else clip


# ------------------------------------------------------------------------------ dataset


def _params(clips_per_class, num_folds, sample_rate, duration, seed) -> dict:
    clips_per_class, num_folds = int(clips_per_class), int(num_folds)
    sample_rate, seed, duration = int(sample_rate), int(seed), float(duration)
    if clips_per_class < 1 or num_folds < 1:
        raise ValueError("clips_per_class and num_folds must be positive")
    if clips_per_class % num_folds:
        raise ValueError(
            f"clips_per_class={clips_per_class} is not divisible by num_folds={num_folds}; "
            "folds must be balanced"
        )
    if sample_rate < 4000:
        raise ValueError(f"sample_rate={sample_rate} is too low (minimum 4000 Hz)")
    if duration < 0.1:
        raise ValueError(f"duration={duration} s is too short (minimum 0.1 s)")
    if seed < 0:
        raise ValueError("seed must be non-negative")
    return {
        "generator": "synthetic-esc50",
        "version": GENERATOR_VERSION,
        "classes": list(CLASSES),
        "clips_per_class": clips_per_class,
        "num_folds": num_folds,
        "sample_rate": sample_rate,
        "duration": duration,
        "seed": seed,
    }


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, params: dict) -> bool:
    return (root / "meta" / "esc50.csv").is_file() and _read_marker(root) == params


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _write_tree(dest: Path, params: dict) -> None:
    audio_dir, meta_dir = dest / "audio", dest / "meta"
    audio_dir.mkdir()
    meta_dir.mkdir()
    cpc, folds = params["clips_per_class"], params["num_folds"]
    rows = []
    for target, category in enumerate(CLASSES):
        for index in range(cpc):
            fold = 1 + index % folds
            clip_id = 100001 + target * cpc + index
            filename = f"{fold}-{clip_id}-{TAKE}-{target}.wav"
            audio = synthesize_clip(
                target,
                index,
                seed=params["seed"],
                sample_rate=params["sample_rate"],
                duration=params["duration"],
            )
            sf.write(audio_dir / filename, audio, params["sample_rate"], subtype="PCM_16")
            esc10 = "True" if category in ESC10_CLASSES else "False"
            rows.append((filename, fold, target, category, esc10, clip_id, TAKE))
    rows.sort()  # ESC-50's csv is sorted by filename
    with open(meta_dir / "esc50.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    # The marker goes last: a tree without it is never treated as complete.
    (dest / MARKER_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def _install(tmp: Path, root: Path, overwrite: bool) -> None:
    """Move the finished tree ``tmp`` to ``root`` with renames only."""
    if root.exists() or root.is_symlink():
        if _is_empty_dir(root):
            root.rmdir()
        elif not overwrite:
            raise FileExistsError(
                f"{root} already exists and is not empty; pass overwrite=True to replace it"
            )
        else:
            old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(root, old)
            os.replace(tmp, root)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
            return
    os.replace(tmp, root)


def generate_dataset(
    root: str | os.PathLike,
    *,
    clips_per_class: int = 40,
    num_folds: int = 5,
    sample_rate: int = 16000,
    duration: float = 2.0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic dataset to ``root`` in ESC-50 layout and return ``root``.

    The tree is built in a temporary directory next to ``root`` and renamed into place once
    complete, so ``root`` only ever holds a finished dataset. An existing non-empty ``root``
    raises FileExistsError unless ``overwrite`` is true, in which case it is replaced.
    """
    params = _params(clips_per_class, num_folds, sample_rate, duration, seed)
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


def ensure_dataset(
    root: str | os.PathLike,
    *,
    clips_per_class: int = 40,
    num_folds: int = 5,
    sample_rate: int = 16000,
    duration: float = 2.0,
    seed: int = 0,
) -> Path:
    """Return ``root``, generating the dataset first unless an identical one is already there.

    A tree counts as present only if it has ``meta/esc50.csv`` and a ``.complete`` marker
    recording the same generation parameters. A tree written by this module with other
    parameters (or an older generator version) is regenerated; a non-empty directory
    without a marker is somebody else's data and is left alone (FileExistsError).
    """
    kwargs = dict(
        clips_per_class=clips_per_class,
        num_folds=num_folds,
        sample_rate=sample_rate,
        duration=duration,
        seed=seed,
    )
    params = _params(**kwargs)
    root = Path(root).absolute()
    if _is_complete(root, params):
        return root
    ours = _read_marker(root) is not None
    if root.exists() and not ours and not _is_empty_dir(root):
        raise FileExistsError(
            f"{root} exists but is not a synthetic dataset written by this generator "
            f"(no {MARKER_NAME} marker); refusing to overwrite it. Point the dataset root "
            "at an empty or new directory."
        )
    try:
        return generate_dataset(root, overwrite=ours, **kwargs)
    except FileExistsError:
        # Another process may have finished the same dataset in the meantime.
        if _is_complete(root, params):
            return root
        raise
