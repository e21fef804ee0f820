"""A sharded, versioned store of a dataset on disk (TFRecord), built once and streamed.

Every audio file of a dataset is decoded once (:func:`src.data.check.inspect_file`: the
data check and the decode are one step) and written to TFRecord shards, as one of two
kinds of record (``content``, ``data.store.content``):

* ``"features"`` (the default): the waveform is preprocessed as the saved model does it
  (:func:`src.models.waveform.preprocess_waveform`) and turned into frontend features
  ``(frames, n_mels)`` float32. Training feeds them to the backbone: the STFT is computed
  once per clip, not once per epoch.
* ``"waveform"``: the decoded mono waveform itself, ``(samples,)`` at the data's sample
  rate, cropped / zero-padded to the clip length (or at its own length with
  ``variable_length``), exactly as the decoder returns it (before the model's own
  preprocessing). Training runs the whole waveform model (preprocessing, frontend,
  backbone) per batch, which waveform augmentation and AST's waveform mixup need. The
  samples are stored as float32, not int16: the decoder's output is in general not a
  multiple of 1/32768 (resampled or mixed-down audio, 24-bit or float files), and only
  the exact float32 samples give the features the feature store holds, so that both
  kinds of store train the same model. A 16 kHz clip takes 64 kB per second (half that
  as int16; log-mel features at a 10 ms hop with 128 mel bins: 51 kB).

Training streams the shards (:mod:`src.data.pipeline`); nothing holds the whole dataset
in memory.

Layout::

    <paths.cache_dir>/features/<dataset>-<store key>/    (waveform stores: .../waveforms/)
        store.json                      # what the key covers; shards per fold
        shards/f<fold>-b<bucket>-<content key>.tfrecord
        shards/f<fold>-b<bucket>-<content key>.json    # the shard's manifest

* **Versioned.** The key of a feature store covers the frontend's config and
  ``feature_version``, the decoder's version, the sample rate, clip handling, the mean
  removal, the dataset root and the versions of the libraries that compute features
  (TensorFlow, NumPy, librosa, soxr, soundfile and libsndfile). Features of another code
  or library version live in another directory and are never read. The key of a
  waveform store covers ``content``, the sample type, the decoder's version, the sample
  rate, clip handling, the shortest usable clip, the root and the decoding libraries
  (NumPy, soxr, soundfile, libsndfile); it never equals a feature store's key. The
  frontend is not part of it (for variable-length data only its window length is, as
  the shortest usable clip): one waveform store serves every frontend config.
* **Incremental.** The files of each fold are spread over a fixed number of buckets by
  a hash of their path; a shard's content key covers its files (path, size, mtime). A
  new, removed or modified file changes only its own bucket's key, so only that shard is
  recomputed. A fold that grows past 4x ``shard_clips`` per bucket is re-bucketed.
* **Checked.** A shard's manifest records its size, record count and SHA-256. A shard
  whose size or mtime differs from the manifest is hashed again; a mismatch, or a
  missing or unreadable manifest, rebuilds the shard (``verify="always"`` hashes every
  shard). TFRecord's per-record CRC catches damage that keeps size and mtime when the
  shard is read (:class:`CorruptShardError` then names it and drops its manifest, so
  the next run rebuilds it).
* **Resumable.** A shard is written to a temporary file and renamed, then its manifest;
  a killed build keeps every finished shard.
* **Bad files.** Problems found while decoding are recorded in the manifests: fatal ones
  (missing, unreadable, truncated, too short) are listed and, unless skipped, stop the
  run before training; a fixed file changes its mtime and so its shard.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from src.data.check import FileProblem, inspect_file
from src.data.index import DatasetError, DatasetIndex

__all__ = [
    "CONTENTS",
    "STORE_FORMAT",
    "CorruptShardError",
    "FeatureStore",
    "Shard",
    "build_store",
    "parse_example",
    "parse_waveform_example",
    "store_key_material",
]

log = logging.getLogger(__name__)

# Bump when the shard or manifest layout changes.
STORE_FORMAT = 1
_LIBRARIES = ("tensorflow", "numpy", "librosa", "soxr", "soundfile")
# What a waveform store holds depends on the decoder only (soundfile + soxr, NumPy).
_DECODE_LIBRARIES = ("numpy", "soxr", "soundfile")
# What a store's records are: frontend features (frames, n_mels) or waveforms (samples,).
CONTENTS = ("features", "waveform")
_MAX_BUCKET_FACTOR = 4


class CorruptShardError(DatasetError):
    """A shard failed its checksum while being read; it is rebuilt on the next run."""


@dataclasses.dataclass(frozen=True)
class Shard:
    fold: int
    bucket: int
    path: str  # the .tfrecord file
    count: int  # records in it
    keys: tuple[str, ...]  # the file paths stored in it, in order
    frames: tuple[int, ...]  # length of each record: frames (features) or samples (waveform)
    sha256: str = ""  # of the .tfrecord file: what the records hold
    # Per record, a digest of the file's decoded samples (:func:`samples_digest`): what
    # the clip holds, whatever shard it is in; empty for a shard written before them.
    clips: tuple[str, ...] = ()


def samples_digest(samples: np.ndarray) -> str:
    """A short digest of a decoded clip (its dtype, shape and samples): the same for a
    file copied or touched, another for other audio."""
    a = np.ascontiguousarray(samples)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:24]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _bucket(path: str, buckets: int) -> int:
    return int(hashlib.sha1(path.encode()).hexdigest()[:12], 16) % buckets


def _library_versions(names: Sequence[str] = _LIBRARIES) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        import soundfile

        out["libsndfile"] = soundfile.__libsndfile_version__
    except (ImportError, AttributeError):
        out["libsndfile"] = None
    return out


def store_key_material(
    frontend, *, sample_rate: int, clip_samples: int | None, remove_mean: bool, root: str,
    content: str = "features", min_samples: int = 0,
) -> dict:
    """Everything the stored records depend on (the store's key is its hash). A waveform
    store's records do not depend on the frontend (nor on the mean removal, which the
    model applies), only on the decoder and on which files are too short to keep
    (``min_samples``)."""
    from src.data import audio

    if content == "waveform":
        return {
            "format": STORE_FORMAT,
            "content": "waveform",
            "dtype": "float32",
            "decoder_version": int(getattr(audio, "DECODER_VERSION", 0)),
            "sample_rate": int(sample_rate),
            "clip_samples": None if clip_samples is None else int(clip_samples),
            "min_samples": int(min_samples),
            "root": str(root),
            "libraries": _library_versions(_DECODE_LIBRARIES),
        }
    config = {
        k: v for k, v in frontend.get_config().items() if k not in ("name", "dtype", "trainable")
    }
    return {
        "format": STORE_FORMAT,
        "frontend": type(frontend).__name__,
        "frontend_config": config,
        "feature_version": int(getattr(frontend, "feature_version", 0)),
        "decoder_version": int(getattr(audio, "DECODER_VERSION", 0)),
        "sample_rate": int(sample_rate),
        "clip_samples": None if clip_samples is None else int(clip_samples),
        "remove_mean": bool(remove_mean),
        "root": str(root),
        "libraries": _library_versions(),
    }


def json_digest(obj) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (blocks while another process builds the store)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the feature store %s", path.parent)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# Stores this process reads: an open file holding a shared lock on <store>/.readers for
# the life of the process. A build by another process deletes the shards its own plan
# does not use only when it can take that lock exclusively, i.e. when nobody reads.
_READING: dict[str, object] = {}


def _hold_for_reading(directory: Path) -> None:
    key = str(Path(directory).resolve())
    if key not in _READING:
        fh = open(Path(directory) / ".readers", "a+")  # noqa: SIM115 (held until exit)
        fcntl.flock(fh, fcntl.LOCK_SH)
        _READING[key] = fh


def _remove_stale_unless_read(directory: Path, keep: set[str], layout: dict) -> None:
    """:func:`_remove_stale`, unless another process reads the store (a run with another
    fold layout over the same files, still training): its shards are left for a later
    build to remove."""
    held = _READING.pop(str(Path(directory).resolve()), None)
    if held is not None:  # this process's own earlier reading: not another reader
        fcntl.flock(held, fcntl.LOCK_UN)
        held.close()
    with open(directory / ".readers", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("feature store %s: another process reads it; its unused shards are "
                     "left for a later build to remove", directory)
            return
        try:
            _remove_stale(directory / "shards", keep, layout)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _example(key: str, feats: np.ndarray) -> bytes:
    feats = np.ascontiguousarray(feats, dtype="<f4")
    feature = {
        "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
        "frames": tf.train.Feature(int64_list=tf.train.Int64List(value=[feats.shape[0]])),
        "features": tf.train.Feature(bytes_list=tf.train.BytesList(value=[feats.tobytes()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_example(serialized, n_mels: int):
    """A stored record -> ``(key string, features (frames, n_mels) float32)``."""
    parsed = tf.io.parse_single_example(
        serialized,
        {
            "key": tf.io.FixedLenFeature([], tf.string),
            "frames": tf.io.FixedLenFeature([], tf.int64),
            "features": tf.io.FixedLenFeature([], tf.string),
        },
    )
    feats = tf.io.decode_raw(parsed["features"], tf.float32)
    feats = tf.reshape(feats, [-1, n_mels])
    return parsed["key"], feats


def _waveform_example(key: str, samples: np.ndarray) -> bytes:
    samples = np.ascontiguousarray(samples, dtype="<f4")
    feature = {
        "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
        "samples": tf.train.Feature(int64_list=tf.train.Int64List(value=[samples.shape[0]])),
        "waveform": tf.train.Feature(bytes_list=tf.train.BytesList(value=[samples.tobytes()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_waveform_example(serialized):
    """A waveform store's record -> ``(key string, samples (samples,) float32)``."""
    parsed = tf.io.parse_single_example(
        serialized,
        {
            "key": tf.io.FixedLenFeature([], tf.string),
            "samples": tf.io.FixedLenFeature([], tf.int64),
            "waveform": tf.io.FixedLenFeature([], tf.string),
        },
    )
    return parsed["key"], tf.io.decode_raw(parsed["waveform"], tf.float32)


@dataclasses.dataclass
class FeatureStore:
    """The shards of one dataset's features (or waveforms), after :func:`build_store`."""

    directory: Path
    n_mels: int  # mel bins of the frontend's features (of the stored ones, or computed later)
    clip_frames: int  # frames of a clip of data.clip_seconds (the model's input length)
    variable_length: bool
    silence_value: float  # the features of digital silence (padding of short clips)
    shards: list[Shard]
    problems: list[FileProblem]  # per file, from decoding (fatal and notes)
    built: int = 0  # shards (re)computed by this build
    reused: int = 0
    content: str = "features"  # what a record is: one of CONTENTS
    clip_samples: int = 0  # samples of a clip of data.clip_seconds
    # The frontend that computed the stored features, or that computes them from the
    # stored waveforms (normalisation statistics), with the model's mean removal.
    frontend: object = None
    remove_mean: bool = True

    @property
    def waveform(self) -> bool:
        """Whether the records are waveforms (else frontend features)."""
        return self.content == "waveform"

    @property
    def clip_length(self) -> int:
        """The model's input length in the records' unit: samples or frames."""
        return int(self.clip_samples) if self.waveform else int(self.clip_frames)

    @property
    def pad_value(self) -> float:
        """What pads a record shorter than a clip: zeros or the features of silence."""
        return 0.0 if self.waveform else float(self.silence_value)

    def fatal_paths(self) -> set[str]:
        return {p.path for p in self.problems if p.fatal}

    def frames_of(self) -> dict[str, int]:
        """Each stored file's record length (frames, or samples in a waveform store)."""
        return {k: f for s in self.shards for k, f in zip(s.keys, s.frames)}

    def shards_for(self, paths: Iterable[str]) -> list[Shard]:
        """The shards holding any of ``paths``, in store order."""
        wanted = set(paths)
        return [s for s in self.shards if wanted.intersection(s.keys)]

    def count(self, paths: Iterable[str]) -> int:
        wanted = set(paths)
        return sum(1 for s in self.shards for k in s.keys if k in wanted)

    def parse(self, serialized):
        """A record of this store -> ``(key, features (frames, n_mels))`` or, in a
        waveform store, ``(key, samples (samples,))``."""
        if self.waveform:
            return parse_waveform_example(serialized)
        return parse_example(serialized, self.n_mels)

    def records(self, shards: Sequence[Shard]) -> tf.data.Dataset:
        """``(key, features)`` (or ``(key, samples)``) of every record of ``shards``, in
        order."""
        files = [s.path for s in shards]
        ds = tf.data.TFRecordDataset(files)
        return ds.map(self.parse)


def _clip_samples_or_none(clip_samples: int, variable_length: bool) -> int | None:
    return None if variable_length else int(clip_samples)


class _Featurizer:
    """Waveforms -> features with the frontend (batched when the lengths agree)."""

    def __init__(self, frontend, remove_mean: bool):
        from src.models.waveform import preprocess_waveform

        self.frontend = frontend

        @tf.function(reduce_retracing=True)
        def run(wave):
            return frontend(preprocess_waveform(wave, remove_mean))

        self._run = run

    def __call__(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        if not waves:
            return []
        if len({len(w) for w in waves}) == 1:
            out = self._run(tf.constant(np.stack(waves).astype(np.float32))).numpy()
            return list(out)
        return [self._run(tf.constant(w[None].astype(np.float32))).numpy()[0] for w in waves]


def _as_stored_waveforms(waves: list[np.ndarray]) -> list[np.ndarray]:
    """A waveform store keeps the decoder's samples as they are (float32)."""
    return [np.asarray(w, np.float32) for w in waves]


def _decoded(
    paths: Sequence[str], sample_rate: int, clip_samples: int | None, min_samples: int,
    workers: int,
) -> Iterator[tuple[str, np.ndarray | None, list[FileProblem]]]:
    """Decode ``paths`` with a thread pool, in order, a bounded number ahead."""
    ahead = max(4 * workers, 16)

    def one(path):
        return inspect_file(
            path, sample_rate=sample_rate, clip_samples=clip_samples, min_samples=min_samples
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[tuple[str, concurrent.futures.Future]] = []
        it = iter(paths)
        for path in it:
            pending.append((path, pool.submit(one, path)))
            if len(pending) >= ahead:
                break
        while pending:
            path, fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(one, nxt)))
            samples, problems = fut.result()
            yield path, samples, problems


def _silence_value(frontend, clip_samples: int) -> float:
    """What the frontend makes of digital silence (the padding of short clips)."""
    n = max(int(clip_samples), 1)
    out = np.asarray(frontend(tf.zeros((1, n), tf.float32)))
    return float(np.median(out)) if out.size else 0.0


def build_store(
    index: DatasetIndex,
    frontend,
    *,
    sample_rate: int,
    clip_samples: int,
    cache_dir: str | os.PathLike,
    name: str,
    remove_mean: bool = True,
    variable_length: bool = False,
    shard_clips: int = 512,
    verify: str = "auto",
    workers: int | None = None,
    progress: bool = True,
    content: str = "features",
) -> FeatureStore:
    """Bring the store of ``index`` up to date (computing only what is missing or stale)
    and return it. ``verify``: "auto" (hash shards whose size or mtime changed),
    "always" (hash every shard) or "never". ``content``: "features" (frontend features)
    or "waveform" (the decoded samples; ``frontend`` and ``remove_mean`` then only say
    how features are computed from them, and which files are too short to keep)."""
    if content not in CONTENTS:
        raise ValueError(f"data.store.content must be one of {CONTENTS}, got {content!r}.")
    if verify not in ("auto", "always", "never"):
        raise ValueError(f"data.store.verify must be auto, always or never, got {verify!r}.")
    if int(shard_clips) < 1:
        raise ValueError(f"data.store.shard_clips must be positive, got {shard_clips}.")
    workers = int(workers or os.cpu_count() or 1)
    crop = _clip_samples_or_none(clip_samples, variable_length)
    min_samples = int(getattr(frontend, "win_samples", 0) or 0) if variable_length else 0
    waveform = content == "waveform"
    material = store_key_material(
        frontend, sample_rate=sample_rate, clip_samples=crop, remove_mean=remove_mean,
        root=index.root, content=content, min_samples=min_samples,
    )
    store_key = json_digest(material)
    directory = Path(cache_dir) / f"{name}-{store_key[:16]}"
    shard_dir = directory / "shards"

    # Each distinct file once, in the fold of its first record.
    fold_of: dict[str, int] = {}
    for r in index.records:
        fold_of.setdefault(r.path, int(r.fold))
    by_fold: dict[int, list[str]] = {}
    for path, fold in fold_of.items():
        by_fold.setdefault(fold, []).append(path)

    with _locked(directory / ".lock"):
        shard_dir.mkdir(parents=True, exist_ok=True)
        meta_file = directory / "store.json"
        meta = {}
        if meta_file.exists():
            try:
                meta = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                meta = {}
        layout = {str(k): int(v) for k, v in (meta.get("buckets") or {}).items()}
        for fold, paths in by_fold.items():
            want = max(1, 1 << max(0, int(np.ceil(np.log2(max(len(paths) / shard_clips, 1))))))
            have = layout.get(str(fold))
            if have is None or len(paths) > _MAX_BUCKET_FACTOR * shard_clips * have:
                if have is not None:
                    log.info("feature store: fold %d grew to %d files; %d -> %d shards",
                             fold, len(paths), have, want)
                layout[str(fold)] = want
        meta = {"key": store_key, "material": material, "buckets": layout}
        tmp = meta_file.with_name(".store.json.tmp")
        tmp.write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp, meta_file)

        # Shard plan: (fold, bucket) -> files with their stat.
        plan: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
        for fold, paths in sorted(by_fold.items()):
            nb = layout[str(fold)]
            for path in sorted(paths):
                try:
                    st = os.stat(path)
                    stat_key = (int(st.st_size), int(st.st_mtime_ns))
                except OSError:
                    stat_key = (-1, -1)  # missing: decoded (and reported) like the others
                plan.setdefault((fold, _bucket(path, nb)), []).append((path, *stat_key))

        shards, problems, todo = [], [], []
        for (fold, bucket), files in sorted(plan.items()):
            shard_key = json_digest([store_key, files])[:16]
            stem = f"f{fold}-b{bucket:05d}-{shard_key}"
            loaded = _load_shard(shard_dir, stem, shard_key, verify)
            if loaded is None:
                todo.append((fold, bucket, stem, shard_key, files))
            else:
                shards.append(loaded[0])
                problems.extend(loaded[1])
        reused = len(shards)

        if todo:
            total = sum(len(t[4]) for t in todo)
            featurize = _as_stored_waveforms if waveform else _Featurizer(frontend, remove_mean)
            all_paths = [f[0] for t in todo for f in t[4]]
            decoded = _decoded(all_paths, sample_rate, crop, min_samples, workers)
            desc = f"{name} {'waveforms' if waveform else 'features'}"
            with tqdm(total=total, desc=desc, unit="clip", disable=not progress,
                      leave=False, dynamic_ncols=True) as bar:
                for fold, bucket, stem, shard_key, files in todo:
                    shard, probs = _write_shard(
                        shard_dir, stem, shard_key, fold, bucket, files, decoded, featurize,
                        bar, waveform=waveform,
                    )
                    shards.append(shard)
                    problems.extend(probs)
        _remove_stale_unless_read(directory, {s.path for s in shards}, layout)
        _hold_for_reading(directory)

    silence = 0.0 if waveform else _silence_value(frontend, clip_samples)
    order = {(s.fold, s.bucket): i for i, s in enumerate(sorted(shards, key=lambda s: (s.fold, s.bucket)))}
    shards.sort(key=lambda s: order[(s.fold, s.bucket)])
    clip_frames = int(frontend.num_frames(int(clip_samples)))
    store = FeatureStore(
        directory=directory, n_mels=int(frontend.n_mels), clip_frames=clip_frames,
        variable_length=bool(variable_length), silence_value=silence, shards=shards,
        problems=problems, built=len(todo), reused=reused, content=content,
        clip_samples=int(clip_samples), frontend=frontend, remove_mean=bool(remove_mean),
    )
    log.info("%s store %s: %d shard(s), %d computed now, %d reused",
             "waveform" if waveform else "feature", directory, len(shards), len(todo), reused)
    return store


def _load_shard(shard_dir: Path, stem: str, content: str, verify: str):
    """A finished shard and its problems, or None when it must be (re)built."""
    record = shard_dir / f"{stem}.tfrecord"
    manifest_file = shard_dir / f"{stem}.json"
    if not (record.exists() and manifest_file.exists()):
        return None
    try:
        m = json.loads(manifest_file.read_text())
        if m.get("format") != STORE_FORMAT or m.get("content") != content:
            return None
        st = record.stat()
        changed = [int(st.st_size), int(st.st_mtime_ns)] != m["stat"]
        if int(st.st_size) != int(m["bytes"]):
            log.warning("feature store: %s has %d bytes, its manifest says %d; rebuilding it",
                        record, st.st_size, m["bytes"])
            return None
        if verify == "always" or (verify == "auto" and changed):
            if file_sha256(record) != m["sha256"]:
                log.warning("feature store: %s fails its checksum; rebuilding it", record)
                return None
            if changed:  # same bytes, touched: remember the new stat
                m["stat"] = [int(st.st_size), int(st.st_mtime_ns)]
                _write_json(manifest_file, m)
        shard = Shard(
            fold=int(m["fold"]), bucket=int(m["bucket"]), path=str(record), count=int(m["count"]),
            keys=tuple(m["keys"]), frames=tuple(int(f) for f in m["frames"]),
            sha256=str(m["sha256"]), clips=tuple(m.get("clips") or ()),
        )
        problems = [FileProblem(**p) for p in m["problems"]]
        if "clips" not in m and any(p.kind == "short" and p.message.startswith(
                f"{p.path}: 0.000 s") for p in problems):
            # Written before a file without audio frames was fatal: it holds such a file
            # as a silent clip. Decoded again, the file is reported (and left out).
            return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("feature store: unreadable manifest %s (%s); rebuilding the shard",
                    manifest_file, err)
        return None
    return shard, problems


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _write_shard(shard_dir, stem, content, fold, bucket, files, decoded, featurize, bar,
                 waveform=False):
    record = shard_dir / f"{stem}.tfrecord"
    tmp = shard_dir / f".{stem}.tfrecord.tmp"
    keys, frames, clips, problems = [], [], [], []
    digests: dict[str, str] = {}  # of each decoded file's samples (samples_digest)
    batch: list[tuple[str, np.ndarray]] = []
    example = _waveform_example if waveform else _example
    what = "samples" if waveform else "features"

    with tf.io.TFRecordWriter(str(tmp)) as writer:

        def flush():
            feats = featurize([w for _, w in batch])
            for (path, _), f in zip(batch, feats):
                if not np.isfinite(f).all():
                    problems.append(FileProblem(
                        path=path, kind="unreadable", fatal=True,
                        message=f"{path}: its {what} are not finite (NaN or infinite "
                                "samples in the file); replace it",
                    ))
                    continue
                writer.write(example(path, f))
                keys.append(path)
                frames.append(int(f.shape[0]))
                clips.append(digests[path])
            batch.clear()

        for expected, _size, _mtime in files:
            path, samples, probs = next(decoded)
            assert path == expected
            problems.extend(probs)
            bar.update(1)
            if samples is None:
                continue
            digests[path] = samples_digest(samples)
            if batch and len(samples) != len(batch[0][1]):
                flush()
            batch.append((path, samples))
            if len(batch) >= 32:
                flush()
        if batch:
            flush()
    os.replace(tmp, record)
    st = record.stat()
    manifest = {
        "format": STORE_FORMAT, "content": content, "fold": fold, "bucket": bucket,
        "files": files, "keys": keys, "frames": frames, "clips": clips, "count": len(keys),
        "bytes": int(st.st_size), "stat": [int(st.st_size), int(st.st_mtime_ns)],
        "sha256": file_sha256(record), "problems": [dataclasses.asdict(p) for p in problems],
        "created": time.time(),
    }
    _write_json(shard_dir / f"{stem}.json", manifest)
    shard = Shard(fold=fold, bucket=bucket, path=str(record), count=len(keys),
                  keys=tuple(keys), frames=tuple(frames), sha256=manifest["sha256"],
                  clips=tuple(clips))
    return shard, problems


def _remove_stale(shard_dir: Path, keep: set[str], layout: dict) -> None:
    """Delete shards of this store's folds that the current plan does not use (older
    versions of a bucket, buckets of an earlier layout) and stray temporary files."""
    folds = set(layout)
    for f in shard_dir.iterdir():
        name = f.name
        if name.startswith("."):
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    f.unlink()
            continue
        stem = name.rsplit(".", 1)[0]
        fold = stem.split("-", 1)[0][1:]
        if fold not in folds:
            continue  # another index over the same store (e.g. more folds): leave it
        record = str(shard_dir / f"{stem}.tfrecord")
        if record not in keep:
            with contextlib.suppress(OSError):
                f.unlink()


def shard_is_intact(shard_path: str | os.PathLike) -> bool:
    """Whether a shard's bytes match the SHA-256 of its manifest."""
    record = Path(shard_path)
    try:
        m = json.loads(record.with_suffix(".json").read_text())
        return record.stat().st_size == int(m["bytes"]) and file_sha256(record) == m["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def invalidate(shard_path: str | os.PathLike) -> None:
    """Drop a shard's manifest so that the next build recomputes it."""
    manifest = Path(shard_path).with_suffix(".json")
    with contextlib.suppress(OSError):
        manifest.unlink()
