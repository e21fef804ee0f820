"""tf.data input pipelines over the feature store (:mod:`src.data.store`).

Training, per epoch::

    shard files (shuffled) -> interleave TFRecord readers -> parse
      -> keep the split's clips (a hash table: path -> record row)
      -> [in-memory cache, when the split's features fit in data.memory_cache_mb]
      -> [balanced sampling: each clip repeated ~ Poisson(its share of the epoch)]
      -> bounded shuffle buffer -> random crop (clips longer than the model's input)
         / pad (shorter) -> targets (one-hot or multi-hot) -> batch -> prefetch

Evaluation: the split's clips in store order, each cut into windows of the model's
input length (:mod:`src.data.windows`; one window for clips of that length), with the
clip's row and the window's weight, so that scores are averaged per clip.

Memory does not grow with the number of clips: only the shuffle buffer, the prefetched
batches and (for small splits, by choice) the cache hold features. The same code serves
small and large data: the cache is the only difference.

Over a waveform store (``data.store.content=waveform``) the same streams carry waveforms
``(B, samples)`` instead of features, in samples: the training crop is a random
``clip_samples`` stretch of a longer clip and a shorter clip is zero-padded; evaluation
windows are ``clip_samples`` long every half window (one window per clip for data of a
fixed length). The model (preprocessing, frontend, ``target_frames``) turns them into
features per batch. For data of a fixed length both kinds of store give the model the
same features. For variable-length data they differ slightly: a waveform window has its
own mean removed and its edge frames see the window's samples only (as
:mod:`src.predict` does it), while the feature store crops the features of the whole
clip (its mean removed, edge frames computed with the neighbouring samples), and pads a
short clip with the features of silence rather than with zero samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from src.data.index import DatasetError, DatasetIndex
from src.data.store import CorruptShardError, FeatureStore, invalidate
from src.data.windows import window_starts_tf

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE

__all__ = [
    "LabelTable",
    "balanced_weights",
    "corrupt_shard_error",
    "eval_dataset",
    "feature_stats",
    "fit_frames_np",
    "training_dataset",
]


class LabelTable:
    """Every record's targets as tensors, looked up by row in the graph."""

    def __init__(self, index: DatasetIndex):
        self.num_classes = index.num_classes
        self.multi_label = index.multi_label
        if self.multi_label:
            lists = index.label_lists()
            lengths = np.array([len(x) for x in lists], np.int64)
            values = np.array([c for x in lists for c in x], np.int64)
            self._ragged = tf.RaggedTensor.from_row_lengths(values, lengths)
        else:
            self._labels = tf.constant([int(r.label) for r in index.records], tf.int32)

    def target(self, row):
        """Float32 ``(num_classes,)``: one-hot (single-label) or multi-hot."""
        k = self.num_classes
        if self.multi_label:
            labels = self._ragged[row]
            hot = tf.reduce_sum(tf.one_hot(labels, k, dtype=tf.float32), axis=0)
            return tf.minimum(hot, 1.0)
        return tf.one_hot(self._labels[row], k, dtype=tf.float32)


def _row_table(index: DatasetIndex, rows: Sequence[int]) -> tf.lookup.StaticHashTable:
    """path -> record row for ``rows`` (the first row of a path listed twice)."""
    keys, values, seen = [], [], set()
    for r in rows:
        path = index.records[int(r)].path
        if path in seen:
            continue
        seen.add(path)
        keys.append(path)
        values.append(int(r))
    init = tf.lookup.KeyValueTensorInitializer(
        tf.constant(keys, tf.string), tf.constant(values, tf.int64)
    )
    return tf.lookup.StaticHashTable(init, default_value=-1)


def _fit(feats, frames: int, pad_value: float):
    """Crop (first frames) or pad ``(T, M)`` to ``(frames, M)`` (or a waveform ``(T,)`` to
    ``(frames,)`` samples)."""
    feats = feats[:frames]
    missing = frames - tf.shape(feats)[0]
    inner = feats.shape.rank - 1
    feats = tf.pad(feats, [[0, missing]] + [[0, 0]] * inner, constant_values=pad_value)
    return tf.ensure_shape(feats, [frames] + [None] * inner)


def fit_frames_np(feats: np.ndarray, frames: int | None, pad_value: float = 0.0) -> np.ndarray:
    """NumPy version of the crop / pad of one clip's ``(T, M)`` features."""
    if frames is None:
        return feats
    out = np.full((frames, feats.shape[1]), pad_value, np.float32)
    n = min(frames, feats.shape[0])
    out[:n] = feats[:n]
    return out


class _Shape:
    """How a stored clip becomes the model's input ``(model_frames, n_mels)``.

    ``clip_frames``: frames of data.clip_seconds (the crop of a longer clip; a shorter
    clip is padded with the features of silence). ``target_frames`` (AST's 512 / 1024):
    the crop is then zero-padded or cut to that many frames, as the saved model does
    after its frontend.

    Over a waveform store the unit is the sample: ``clip_frames`` is then the clip's
    samples, a shorter clip is zero-padded, and ``target_frames`` is left to the model
    (it pads its features after its frontend)."""

    def __init__(self, store: FeatureStore, target_frames: int | None):
        self.waveform = bool(store.waveform)
        self.clip_frames = int(store.clip_length)
        self.target_frames = (
            None if target_frames is None or self.waveform else int(target_frames)
        )
        self.silence = float(store.pad_value)
        self.variable = bool(store.variable_length)

    @property
    def model_frames(self) -> int:
        return self.target_frames or self.clip_frames

    def element_shape(self) -> list:
        """Static shape of one finished crop."""
        return [self.model_frames] if self.waveform else [self.model_frames, None]

    def finish(self, crop):
        crop = _fit(crop, self.clip_frames, self.silence)
        if self.target_frames is not None:
            crop = _fit(crop, self.target_frames, 0.0)
        return crop

    def train_crop(self, feats, seed=None):
        """A random clip-long stretch of a longer stored clip; ``seed`` (shape (2,)) a
        stateless seed for it, None for TensorFlow's stateful random op."""
        if not self.variable:
            return self.finish(feats)
        extra = tf.maximum(tf.shape(feats)[0] - self.clip_frames, 0)
        if seed is None:
            start = tf.random.uniform([], 0, extra + 1, dtype=tf.int32)
        else:
            start = tf.random.stateless_uniform([], seed, 0, extra + 1, dtype=tf.int32)
        return self.finish(feats[start : start + self.clip_frames])


def epoch_seeds(seed: int) -> tf.data.Dataset:
    """An endless stream of stateless seeds (int32, shape (2,)), new in every pass over
    the dataset it is zipped with, and the same passes for the same ``seed``.

    TensorFlow's stateful random ops in a ``tf.data`` function restart their sequence
    with every new iterator once a global seed is set (``keras.utils.set_random_seed``),
    and their draws follow the order in which a parallel map runs its calls. These seeds
    do neither (``rerandomize_each_iteration``): each pass of the training stream
    (:func:`epoch_stream`) draws its own, the same ones in every run with the same
    ``seed``, so that a resumed run can replay them."""
    draws = tf.data.Dataset.random(seed=int(seed), rerandomize_each_iteration=True)
    return draws.map(lambda v: tf.stack([tf.cast(v % 2**31, tf.int32),
                                         tf.cast(v // 2**31 % 2**31, tf.int32)]))


def _records(store: FeatureStore, index: DatasetIndex, rows, *, shuffle_files: bool, seed: int):
    """``(row, features)`` of the split's clips, streamed from the shards that hold them."""
    paths = {index.records[int(r)].path for r in rows}
    shards = store.shards_for(paths)
    if not shards:
        raise ValueError("none of the split's clips is in the feature store")
    files = [s.path for s in shards]
    table = _row_table(index, rows)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    parallel = {"num_parallel_calls": AUTOTUNE, "deterministic": True} if len(files) > 1 else {}
    ds = ds.interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(files), 8), block_length=1, **parallel
    )

    def parse(serialized):
        key, feats = store.parse(serialized)
        return table.lookup(key), feats

    ds = ds.map(parse, num_parallel_calls=AUTOTUNE)
    ds = ds.filter(lambda row, feats: row >= 0)
    return ds, files


def _value_bytes(store: FeatureStore) -> int:
    """Bytes per stored frame (n_mels float32) or sample (one float32)."""
    return 4 if store.waveform else store.n_mels * 4


def _cache_bytes(store: FeatureStore, index: DatasetIndex, rows) -> int:
    frames = store.frames_of()
    total = 0
    for r in rows:
        total += frames.get(index.records[int(r)].path, 0)
    return total * _value_bytes(store)


def fits_in_memory(store: FeatureStore, index: DatasetIndex, rows, memory_cache_mb: float) -> bool:
    """Whether :func:`training_dataset` caches the split in memory (its stored features
    or waveforms within ``data.memory_cache_mb``) rather than streaming it every epoch."""
    return _cache_bytes(store, index, rows) <= float(memory_cache_mb) * 2**20


def balanced_weights(index: DatasetIndex, rows: Sequence[int]) -> np.ndarray:
    """AST's balanced-sampling weight of each of ``rows``: the sum over its labels of
    1000 / (the label's count in ``rows`` + 0.01)."""
    rows = np.asarray(rows, np.int64)
    counts = index.label_counts(rows).astype(np.float64)
    class_w = 1000.0 / (counts + 0.01)
    lists = index.label_lists()
    return np.array([sum(class_w[c] for c in lists[r]) for r in rows], np.float64)


def training_dataset(
    store: FeatureStore,
    index: DatasetIndex,
    rows: Sequence[int],
    labels: LabelTable,
    *,
    batch_size: int,
    seed: int,
    target_frames: int | None = None,
    shuffle_buffer_mb: float = 512,
    memory_cache_mb: float = 1024,
    balanced: bool = False,
    samples_per_epoch: int | None = None,
    repeat: bool = False,
    shard_by_file: bool = False,
) -> tf.data.Dataset:
    """Batches ``(features (B, frames, n_mels), targets (B, K))`` of one epoch (or, with
    ``repeat``, an endless stream; the caller sets steps per epoch); over a waveform store
    ``(waveforms (B, clip_samples), targets)``. ``shard_by_file``:
    under a multi-worker strategy, tf.distribute gives each worker its own shard files;
    the trainer then repeats the stream and sets the steps per epoch, so that every step
    has a full batch on every worker (workers hold different numbers of clips)."""
    rows = np.asarray(rows, np.int64)
    shape = _Shape(store, target_frames)
    ds, _files = _records(store, index, rows, shuffle_files=True, seed=seed)
    nbytes = _cache_bytes(store, index, rows)
    cached = fits_in_memory(store, index, rows, memory_cache_mb)
    if cached:
        ds = ds.cache()
    if balanced:
        weights = balanced_weights(index, rows)
        n = int(samples_per_epoch or len(rows))
        lam = np.zeros(len(index.records), np.float32)
        lam[rows] = n * weights / weights.sum()
        lam_t = tf.constant(lam)

        def repeat_clip(row, feats, draw_seed=None):
            # Each clip's number of draws: Poisson with its share of the epoch's samples,
            # from a stateless seed (new every pass, the same for the same seed); under
            # multi_worker from the stateful op (the file list stays the only source).
            if draw_seed is None:
                k = tf.random.poisson([], lam_t[row])
            else:
                k = tf.random.stateless_poisson([], draw_seed, lam_t[row])
            return tf.data.Dataset.from_tensors((row, feats)).repeat(tf.cast(k, tf.int64))

        if shard_by_file:
            ds = ds.flat_map(repeat_clip)
        else:
            ds = tf.data.Dataset.zip((ds, epoch_seeds(seed + 3))).flat_map(
                lambda pair, s: repeat_clip(*pair, s))
    # The shuffle buffer holds the split when it is cached (a full shuffle), else as many
    # clips as fit in shuffle_buffer_mb.
    clip_bytes = max(shape.model_frames, store.clip_length) * _value_bytes(store)
    if store.variable_length:  # stored clips are longer than the crop: count them whole
        frames = store.frames_of()
        longest = max((frames.get(index.records[int(r)].path, 0) for r in rows), default=0)
        clip_bytes = max(clip_bytes, longest * _value_bytes(store))
    buffer = max(len(rows), 1) if cached else max(int(shuffle_buffer_mb * 2**20 // clip_bytes), 1)
    if balanced and cached:
        buffer = int(samples_per_epoch or len(rows)) + len(rows)
    what = "waveforms" if store.waveform else "features"
    log.info(
        "training split: %d clips, %.1f MB of %s, %s; shuffle buffer %d clips (%.1f MB)",
        len(rows), nbytes / 2**20, what,
        f"cached in memory (data.memory_cache_mb={memory_cache_mb:g})" if cached else
        f"streamed from the store's shards (over data.memory_cache_mb={memory_cache_mb:g})",
        buffer, buffer * clip_bytes / 2**20,
    )
    if not cached and buffer < min(len(rows), max(4 * int(batch_size), len(rows) // 100)):
        log.warning(
            "data.shuffle_buffer_mb=%g holds %d clip(s) of the %d streamed: a batch then mixes "
            "little beyond the shards' order (files are shuffled, clips within a shard "
            "barely); raise data.shuffle_buffer_mb to hold at least a few batches",
            shuffle_buffer_mb, buffer, len(rows),
        )
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)

    def example(row, feats, seed=None):
        return shape.train_crop(feats, seed), labels.target(row)

    if shape.variable and not shard_by_file:
        # Random crops from stateless seeds, new every epoch (see epoch_seeds).
        ds = tf.data.Dataset.zip((ds, epoch_seeds(seed))).map(
            lambda pair, s: example(*pair, s), num_parallel_calls=AUTOTUNE)
    else:
        # Under trainer.strategy=multi_worker the file list stays the pipeline's only
        # source, so tf.distribute can shard it by file (each worker reads its own
        # shards); the crops use the stateful op, in one endless iterator (repeat).
        ds = ds.map(example, num_parallel_calls=AUTOTUNE)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(int(batch_size))
    if shard_by_file:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.FILE
        )
        ds = ds.with_options(options)
    elif not repeat:
        # One pass over the split: its size is known (the clips of ``rows`` in the store),
        # so fit shows a total and counts steps from the first epoch on.
        clips = store.count(index.records[int(r)].path for r in rows)
        batches = -(-clips // int(batch_size))
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    return ds.prefetch(AUTOTUNE)


def epoch_stream(ds: tf.data.Dataset, steps_per_epoch: int, *, resumed_epochs: int = 0,
                 replay: bool = False) -> tf.data.Dataset:
    """The training batches of every epoch as one endless stream, for ``fit`` with
    ``steps_per_epoch``: ``ds`` is one epoch (``steps_per_epoch`` batches) or already
    endless (balanced sampling).

    ``fit`` then reads all epochs from one iterator, so what epoch ``e`` sees (its
    shuffle, crops, mixes, balanced draws, masks: each from the seed and the pass) does
    not depend on how many iterators Keras makes. ``replay``: the batches of the
    ``resumed_epochs`` epochs a resumed run has trained are drawn and dropped, the input
    pipeline running without the model, so that the epochs it trains see what they would
    have seen in an uninterrupted run (with the backup's weights, optimizer state and
    random generators: the same run, to float rounding)."""
    if ds.cardinality() != tf.data.INFINITE_CARDINALITY:
        ds = ds.repeat()
    if replay and resumed_epochs:
        ds = ds.skip(int(resumed_epochs) * int(steps_per_epoch))
    return ds.prefetch(AUTOTUNE)


def replay_on_resume(mode, *, cached: bool, resumed_epochs: int, strategy: str = "default",
                     backup_format: bool = True) -> bool:
    """Whether a run resuming after ``resumed_epochs`` epochs replays their input
    (:func:`epoch_stream`), by ``trainer.exact_resume``: ``auto`` when the training split
    is cached in memory (a replayed epoch then costs a fraction of a second per thousand
    clips), ``true`` always (a streamed split is read again once per trained epoch),
    ``false`` never (the resumed epochs see other draws than an uninterrupted run).

    Never under a distribution strategy (``trainer.strategy`` other than ``default``):
    Keras' ``fit`` then reads the input once with an iterator of its own before training,
    which moves the stream on by passes that an uninterrupted run did not skip in the
    same way. Never either for a backup from before this replay existed
    (``backup_format`` false): that run drew its epochs per iterator."""
    if not resumed_epochs:
        return False
    text = str(mode).strip().lower()
    if text not in ("auto", "true", "false"):
        raise ValueError(f"trainer.exact_resume={mode!r}: use auto, true or false")
    if strategy != "default" or not backup_format:
        log.info("resuming without replaying the input of the %d trained epoch(s) (%s): the "
                 "epochs from here draw their shuffles, crops and mixes afresh",
                 resumed_epochs,
                 f"trainer.strategy={strategy}" if strategy != "default" else
                 "the backup comes from a version that drew each epoch per iterator")
        return False
    replay = text == "true" or (text == "auto" and cached)
    if replay:
        log.info("replaying the input of the %d trained epoch(s) (no training) so that the "
                 "resumed epochs see the clips, crops and mixes of an uninterrupted run",
                 resumed_epochs)
    else:
        log.info("resuming without replaying the input of the %d trained epoch(s) (%s): the "
                 "epochs from here draw their shuffles, crops and mixes afresh; "
                 "trainer.exact_resume=true replays them", resumed_epochs,
                 "trainer.exact_resume=false" if text == "false" else
                 "the training split is streamed, not cached in memory")
    return replay


def eval_dataset(
    store: FeatureStore,
    index: DatasetIndex,
    rows: Sequence[int],
    *,
    batch_size: int,
    target_frames: int | None = None,
    hop_frames: int | None = None,
) -> tf.data.Dataset:
    """Batches ``(windows (B, frames, n_mels), rows (B,), weights (B,))``: every clip of
    ``rows`` once, cut into windows of the model's input length every ``hop_frames``
    (default: half a window) when it is longer; see :mod:`src.data.windows`. Over a
    waveform store the windows are waveforms ``(B, clip_samples)`` and ``hop_frames``
    counts samples."""
    rows = np.asarray(rows, np.int64)
    shape = _Shape(store, target_frames)
    ds, _files = _records(store, index, rows, shuffle_files=False, seed=0)
    window = shape.clip_frames
    hop = int(hop_frames or max(1, window // 2))

    if store.variable_length:

        def windows(row, feats):
            length = tf.shape(feats)[0]
            starts = window_starts_tf(length, window, hop)
            cover = tf.minimum(tf.cast(length, tf.int64) - starts, window)
            weight = tf.cast(cover, tf.float32) / float(window)
            crops = tf.map_fn(
                lambda s: shape.finish(feats[s : s + window]),
                starts,
                fn_output_signature=tf.TensorSpec(shape.element_shape(), tf.float32),
            )
            n = tf.shape(starts)[0]
            return tf.data.Dataset.from_tensor_slices(
                (crops, tf.fill([n], row), weight)
            )

        ds = ds.flat_map(windows)
    else:
        ds = ds.map(lambda row, feats: (shape.finish(feats), row, tf.constant(1.0)))
    return ds.batch(int(batch_size)).prefetch(AUTOTUNE)


def _features_of(frontend, remove_mean: bool, target_frames):
    """Waveform batches -> the backbone's inputs, as the waveform model computes them
    (:meth:`src.models.audio_transformer.AudioTransformer.features`)."""
    from src.models.audio_transformer import fit_frames
    from src.models.waveform import preprocess_waveform

    @tf.function(reduce_retracing=True)
    def run(waves):
        return fit_frames(frontend(preprocess_waveform(waves, remove_mean)), target_frames)

    return run


def feature_stats(
    store: FeatureStore,
    index: DatasetIndex,
    rows: Sequence[int],
    *,
    target_frames: int | None = None,
    max_clips: int | None = 20000,
    seed: int = 0,
    frontend=None,
    remove_mean: bool | None = None,
) -> tuple[float, float]:
    """Mean and std over every value of the model's inputs of ``rows`` (AST's dataset
    normalisation), in float64, streamed. With more than ``max_clips`` clips, a random
    subset of that many (drawn with ``seed``).

    Over a waveform store the features are computed batch by batch with ``frontend``
    and ``remove_mean`` (default: the store's), from each clip's first ``clip_samples``
    (a shorter clip zero-padded): the model's input for the clip's first window."""
    rows = np.asarray(rows, np.int64)
    if max_clips and len(rows) > int(max_clips):
        rows = np.sort(np.random.default_rng(seed).choice(rows, int(max_clips), replace=False))
    shape = _Shape(store, target_frames)
    ds, files = _records(store, index, rows, shuffle_files=False, seed=0)
    ds = ds.map(lambda row, feats: shape.finish(feats), num_parallel_calls=AUTOTUNE).batch(64)
    to_features = None
    if store.waveform:
        frontend = store.frontend if frontend is None else frontend
        if frontend is None:
            raise ValueError("feature_stats over a waveform store needs the frontend")
        remove_mean = store.remove_mean if remove_mean is None else remove_mean
        to_features = _features_of(frontend, bool(remove_mean), target_frames)
    total, total_sq, count = 0.0, 0.0, 0
    try:
        for batch in ds:
            if to_features is not None:
                batch = to_features(batch)
            x = batch.numpy().astype(np.float64)
            total += float(x.sum())
            total_sq += float(np.square(x).sum())
            count += x.size
    except tf.errors.DataLossError as err:
        raise corrupt_shard_error(files, err) from None
    if count == 0:
        raise ValueError("no features to compute statistics from")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    if not var > 0.0:
        raise DatasetError(
            f"the {len(rows)} training clip(s) give one constant value ({mean:.4g}) in "
            "every feature, so there is nothing to normalise or learn from: the audio is "
            "silent (or the same everywhere). Check the files (python -m scripts.check_data "
            "lists silent ones) and point data.root at recordings with sound."
        )
    return float(mean), float(np.sqrt(var))


def corrupt_shard_error(files: Sequence[str], err: Exception) -> CorruptShardError:
    """A readable error for a shard that failed TFRecord's CRC. The shards read are checked
    against their manifests' SHA-256; the damaged ones are marked, so that the next run
    rebuilds them (and only them)."""
    from src.data.store import shard_is_intact

    damaged = [f for f in files if not shard_is_intact(f)]
    for f in damaged:
        invalidate(f)
    which = ", ".join(damaged) if damaged else f"one of {len(files)} shard(s)"
    return CorruptShardError(
        f"the feature store shard {which} is corrupt ({str(err).splitlines()[0]}); it has "
        "been marked for rebuilding: run the same command again."
    )
