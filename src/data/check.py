"""Up-front check of every audio file of a dataset, before the input pipeline reads it.

Inside ``tf.data`` a single file that the decoder rejects aborts the whole iteration with
an error that does not say which file it was. :func:`check_records` finds such files first
and names them, together with non-fatal notes about what the pipeline will do to a file
(resample, mix to mono, pad, crop).

A problem is *fatal* when the pipeline's decoder (:func:`src.data.audio.read_audio`:
libsndfile via soundfile, then soxr) cannot read the file (missing, empty, not audio, a
cut-off header), when a WAV file is truncated (its data chunk holds fewer bytes than its
header declares: a failed copy or download, whose remains are never trained on), and,
for datasets stored at their own length, when a clip is shorter than one analysis
window. Every file is decoded once. The feature store (:mod:`src.data.store`) runs the
same :func:`inspect_file` while it computes features, so training decodes each file
once in all; ``python -m scripts.check_data`` runs it on its own.

Results can be cached in ``cache_dir`` (one json file), keyed by path, size, mtime,
sample rate and clip length, so a repeated check only decodes files that changed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import stat
import struct
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import tensorflow as tf
from tqdm.auto import tqdm

from src.data.esc50 import DatasetIndex, Record

__all__ = [
    "CACHE_NAME",
    "FATAL_KINDS",
    "NOTE_KINDS",
    "SILENCE_DBFS",
    "CheckReport",
    "FileProblem",
    "check_file",
    "check_records",
    "filter_records",
]

log = logging.getLogger(__name__)

# Kinds in the order the summary lists them.
FATAL_KINDS = ("missing", "empty", "unreadable", "truncated", "too_short")
NOTE_KINDS = ("resampled", "stereo", "short", "long", "silent", "clipped")
# A clip whose peak lies below this level counts as silent. One LSB of 16-bit PCM is
# -90.3 dBFS, so a 16-bit file that never leaves +-1 LSB is silent.
SILENCE_DBFS = -90.0
CACHE_NAME = "data_check.json"
# Bump whenever check_file's verdicts change, so cached results are not reused.
CHECK_VERSION = 4


@dataclasses.dataclass(frozen=True)
class FileProblem:
    path: str
    kind: str  # one of FATAL_KINDS or NOTE_KINDS
    message: str  # names the file and, for fatal problems, the fix
    fatal: bool  # True: the pipeline cannot decode the file


@dataclasses.dataclass
class CheckReport:
    problems: list[FileProblem]
    num_files: int
    num_checked: int = 0  # files decoded by this call; the others came from the cache

    def fatal(self) -> list[FileProblem]:
        return [p for p in self.problems if p.fatal]

    def notes(self) -> list[FileProblem]:
        return [p for p in self.problems if not p.fatal]

    def fatal_paths(self) -> set[str]:
        return {p.path for p in self.problems if p.fatal}

    def summary(self, max_files: int = 10) -> str:
        """Problems grouped by kind, fatal ones first, at most ``max_files`` files per kind."""
        fatal, notes = self.fatal(), self.notes()
        cached = self.num_files - self.num_checked
        head = f"Checked {self.num_files} audio file(s)"
        if cached:
            head += f" ({cached} unchanged since the last check, taken from the cache)"
        if not self.problems:
            return head + ": no problems."
        lines = [
            f"{head}: {len({p.path for p in fatal})} file(s) with fatal problems, "
            f"{len(notes)} note(s)."
        ]
        if fatal:
            lines.append(
                "FATAL: the training pipeline cannot decode these files; fix, replace or "
                "remove them (or drop their rows from the metadata):"
            )
            lines += _grouped(fatal, FATAL_KINDS, max_files)
        if notes:
            lines.append("Notes (these files are used as described):")
            lines += _grouped(notes, NOTE_KINDS, max_files)
        return "\n".join(lines)


def _grouped(problems: list[FileProblem], order: tuple[str, ...], max_files: int) -> list[str]:
    by_kind: dict[str, list[FileProblem]] = defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    kinds = [k for k in order if k in by_kind] + sorted(set(by_kind) - set(order))
    lines = []
    for kind in kinds:
        group = by_kind[kind]
        lines.append(f"  {kind} ({len(group)} file(s)):")
        lines += [f"    {p.message}" for p in group[:max_files]]
        if len(group) > max_files:
            lines.append(f"    ... and {len(group) - max_files} more")
    return lines


# ---------------------------------------------------------------------------- one file


def _tf_message(err: tf.errors.OpError) -> str:
    """The op's own message, without TensorFlow's function/node/op decorations."""
    msg = re.sub(r"\{\{[^}]*\}\}\s*", "", str(err.message))
    msg = re.sub(r"\s*\[\[.*", "", msg, flags=re.S)
    msg = re.sub(r"\s*\[Op:.*", "", msg, flags=re.S)
    return msg.strip()


def _sf_message(err: Exception) -> str:
    return str(getattr(err, "error_string", None) or err)


def _wav_data_chunk(path: str, file_size: int) -> tuple[int, int, int] | None:
    """``(declared_bytes, available_bytes, block_align)`` of a RIFF/WAVE data chunk.

    None when the file is not RIFF/WAVE or has no complete data chunk header.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            pos, block_align = 12, 0
            while pos + 8 <= file_size:
                fh.seek(pos)
                chunk = fh.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                pos += 8
                if cid == b"fmt ":
                    fmt = fh.read(16)
                    if len(fmt) == 16:
                        block_align = struct.unpack("<H", fmt[12:14])[0]
                elif cid == b"data":
                    if size in (0, 0xFFFFFFFF):  # a streaming recorder's "unknown length"
                        return None
                    return size, file_size - pos, block_align
                pos += size + (size & 1)
    except OSError:
        return None
    return None


def _decode(path: str, sample_rate: int, clip_samples: int | None):
    """The pipeline's decoder on one file: ``(samples, None)`` or ``(None, error message)``."""
    from src.data.audio import read_audio

    try:
        return read_audio(path, sample_rate, clip_samples=clip_samples), None
    except tf.errors.OpError as err:
        return None, _tf_message(err)
    except Exception as err:  # soundfile / soxr errors
        return None, _sf_message(err)


def check_file(
    path: str | os.PathLike, *, sample_rate: int, clip_samples: int | None,
    min_samples: int = 0,
) -> list[FileProblem]:
    """Problems of one audio file as the pipeline would read it; ``[]`` when there are none.

    See :func:`inspect_file`, which also returns the decoded samples.
    """
    return inspect_file(
        path, sample_rate=sample_rate, clip_samples=clip_samples, min_samples=min_samples
    )[1]


def inspect_file(
    path: str | os.PathLike,
    *,
    sample_rate: int,
    clip_samples: int | None,
    min_samples: int = 0,
) -> tuple[np.ndarray | None, list[FileProblem]]:
    """Decode one audio file once and say what is wrong with it: ``(samples, problems)``.

    The file is stat-ed, its header read with soundfile and its audio decoded once with
    the pipeline's decoder (:func:`src.data.audio.read_audio`, mono at ``sample_rate``,
    cropped / zero-padded to ``clip_samples``, or its whole length when that is None);
    ``samples`` is None when a fatal problem makes it unusable. A decode failure, a
    truncated file (its data chunk shorter than its header declares) and, when
    ``min_samples`` is set, fewer samples than that are fatal; non-fatal notes describe
    what the pipeline does to the file (resample, mix to mono, pad, crop, silence).
    """
    path = os.fspath(path)
    sample_rate = int(sample_rate)
    clip_samples = None if clip_samples is None else int(clip_samples)

    def problem(kind: str, text: str, fatal: bool) -> FileProblem:
        return FileProblem(path=path, kind=kind, message=f"{path}: {text}", fatal=fatal)

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, [problem("missing", "file not found", True)]
    except OSError as err:
        return None, [problem("unreadable", f"cannot stat the file ({err.strerror})", True)]
    if not stat.S_ISREG(st.st_mode):
        return None, [problem("unreadable", "not a regular file", True)]
    if st.st_size == 0:
        return None, [problem("empty", "file is empty (0 bytes)", True)]

    try:
        info = sf.info(path)
        info_err = None
    except Exception as err:  # soundfile raises several types on garbage input
        info, info_err = None, _sf_message(err)

    # soundfile does not flag a cut-off WAV: it reports (and reads) the frames that are
    # present. The declared size of the data chunk is compared with the bytes on disk.
    chunk = _wav_data_chunk(path, st.st_size)
    if chunk is not None and chunk[0] > chunk[1]:
        declared, available, align = chunk
        if align:
            text = (
                f"truncated: the header declares {declared // align} frames but the file "
                f"holds only {available // align} ({available} of {declared} data bytes)"
            )
        else:
            text = f"truncated: {available} of {declared} declared data bytes present"
        # A cut-off file is a failed copy or download: never train on its remains.
        return None, [problem("truncated", f"{text}; re-copy or re-download it", True)]

    samples, decode_err = _decode(path, sample_rate, clip_samples)
    if decode_err is not None:
        return None, [
            problem(
                "unreadable",
                "not a readable audio file (soundfile: "
                f"{info_err or decode_err}); replace it with an intact audio file",
                True,
            )
        ]

    problems = []
    if (info is not None and int(info.frames) == 0) or (info is None and not samples.size):
        # A header and no audio: a failed copy or download, not a recording of silence.
        return None, [problem("empty", "no audio frames to decode (a header only, or a data "
                              "chunk whose size says 0); re-copy or re-download it, or "
                              "rewrite its header (e.g. sox in.wav out.wav)", True)]
    if info is not None:
        rate, channels, frames = int(info.samplerate), int(info.channels), int(info.frames)
        if rate != sample_rate:
            problems.append(problem("resampled", f"{rate} Hz, resampled to {sample_rate} Hz",
                                    False))
        if channels > 1:
            problems.append(problem("stereo", f"{channels} channels, averaged to mono", False))
        length = frames * sample_rate / rate  # samples after resampling
        if min_samples and length < min_samples:
            return None, problems + [
                problem(
                    "too_short",
                    f"{frames / rate:.3f} s is shorter than the shortest usable clip "
                    f"({min_samples / sample_rate:.3f} s: one analysis window); remove it "
                    "or run with data.skip_bad_files=true",
                    True,
                )
            ]
        if clip_samples is not None:
            clip_s = clip_samples / sample_rate
            if length < clip_samples - 1:
                problems.append(
                    problem("short", f"{frames / rate:.3f} s, zero-padded to {clip_s:.3f} s",
                            False)
                )
            elif length > clip_samples + 1:
                problems.append(
                    problem("long", f"{frames / rate:.3f} s, cropped to its first {clip_s:.3f} s",
                            False)
                )
    # Silence is judged on the decoded clip, i.e. what the model receives.
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak == 0.0:
        problems.append(problem("silent", "silent (all zeros); kept", False))
    elif 20.0 * math.log10(peak) < SILENCE_DBFS:
        problems.append(
            problem("silent", f"silent (peak {20.0 * math.log10(peak):.1f} dBFS); kept", False)
        )
    elif peak >= 1.0 and info is not None and info.subtype in ("FLOAT", "DOUBLE"):
        # the decoder clips to [-1, 1]: a float file that reaches it went beyond it
        share = float(np.mean(np.abs(samples) >= 1.0))
        problems.append(problem(
            "clipped", f"samples beyond full scale (a float file; {100 * share:.2g}% of "
            "the samples) are clipped to [-1, 1]; kept", False))
    return samples, problems


# ------------------------------------------------------------------------- many files


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class _Cache:
    """Results per (path, sample rate, clip length), valid while size and mtime match."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.file = Path(cache_dir) / CACHE_NAME
        self.entries: dict[str, dict] = {}
        self.dirty = False
        try:
            data = json.loads(self.file.read_text())
            if data.get("version") == CHECK_VERSION and isinstance(data.get("entries"), dict):
                self.entries = data["entries"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as err:
            log.warning("ignoring unreadable check cache %s: %s", self.file, err)

    @staticmethod
    def key(path: str, sample_rate: int, clip_samples: int | None, min_samples: int) -> str:
        return f"{path}|{sample_rate}|{clip_samples}|{min_samples}"

    def get(self, key: str, stat_key: tuple[int, int]) -> list[FileProblem] | None:
        entry = self.entries.get(key)
        if not isinstance(entry, dict) or entry.get("stat") != list(stat_key):
            return None
        try:
            return [FileProblem(**p) for p in entry["problems"]]
        except (KeyError, TypeError):
            return None

    def put(self, key: str, stat_key: tuple[int, int], problems: list[FileProblem]) -> None:
        self.entries[key] = {
            "stat": list(stat_key),
            "problems": [dataclasses.asdict(p) for p in problems],
        }
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CHECK_VERSION, "entries": self.entries}))
        os.replace(tmp, self.file)  # atomic: a half-written cache is never read


def check_records(
    records: Iterable[Record | str | os.PathLike],
    *,
    sample_rate: int,
    clip_samples: int | None,
    min_samples: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> CheckReport:
    """Run :func:`check_file` over the records' files (each distinct path once).

    ``clip_samples``: the clip length files are cropped / padded to; None for a dataset
    stored at its own length (``data.variable_length``), where a file shorter than
    ``min_samples`` (one analysis window) is fatal, as the feature store finds it.

    Files are checked by ``workers`` threads (default: one per CPU core). With
    ``cache_dir``, results are kept in ``cache_dir/data_check.json`` and reused for files
    whose size and mtime are unchanged (a missing file is checked every time);
    ``num_checked`` of the report counts the files actually checked. Problems are listed
    in the order of ``records``.
    """
    sample_rate = int(sample_rate)
    clip_samples = None if clip_samples is None else int(clip_samples)
    min_samples = int(min_samples or 0)
    if sample_rate <= 0 or (clip_samples is not None and clip_samples <= 0):
        raise ValueError(
            f"sample_rate and clip_samples must be positive, got {sample_rate}, {clip_samples}"
        )
    paths = list(dict.fromkeys(os.fspath(getattr(r, "path", r)) for r in records))
    cache = _Cache(cache_dir) if cache_dir is not None else None

    results: dict[str, list[FileProblem]] = {}
    todo: list[tuple[str, tuple[int, int] | None]] = []
    for path in paths:
        stat_key = _stat_key(path)  # taken before the check: a file changed meanwhile
        cached = None  # is re-checked next time
        if cache is not None and stat_key is not None:
            cached = cache.get(cache.key(path, sample_rate, clip_samples, min_samples),
                               stat_key)
        if cached is None:
            todo.append((path, stat_key))
        else:
            results[path] = cached

    def run(path: str) -> list[FileProblem]:
        return check_file(path, sample_rate=sample_rate, clip_samples=clip_samples,
                          min_samples=min_samples)

    with tqdm(
        total=len(paths),
        initial=len(paths) - len(todo),
        desc="checking audio",
        unit="file",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    ) as bar, ThreadPoolExecutor(max_workers=max(1, int(workers or os.cpu_count() or 1))) as pool:
        for (path, stat_key), problems in zip(todo, pool.map(run, [p for p, _ in todo])):
            results[path] = problems
            if cache is not None and stat_key is not None:
                cache.put(cache.key(path, sample_rate, clip_samples, min_samples), stat_key,
                          problems)
            bar.update(1)
    if cache is not None:
        try:
            cache.save()
        except OSError as err:
            log.warning("could not write the check cache %s: %s", cache.file, err)

    problems = [p for path in paths for p in results[path]]
    return CheckReport(problems=problems, num_files=len(paths), num_checked=len(todo))


def filter_records(
    index: DatasetIndex, report: CheckReport
) -> tuple[DatasetIndex, list[FileProblem]]:
    """``index`` without the records whose file has a fatal problem, and those problems."""
    bad = report.fatal_paths()
    kept = tuple(r for r in index.records if r.path not in bad)
    present = {r.path for r in index.records}
    dropped = [p for p in report.fatal() if p.path in present]
    return dataclasses.replace(index, records=kept), dropped
