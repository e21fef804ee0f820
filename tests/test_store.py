"""The feature store: computed once, incremental, versioned, checked, resumable; the
streams over it (training crops, evaluation windows, statistics)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import tensorflow as tf

from src.data.index import DatasetIndex, Record
from src.data.pipeline import LabelTable, eval_dataset, feature_stats, training_dataset
from src.data.store import CorruptShardError, build_store
from src.data.windows import window_starts
from src.models.frontend import LogMel

RATE = 16000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_clips(folder, n, seconds=0.5, seed=0, folds=2, rate=RATE):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        length = int(rate * (seconds if np.isscalar(seconds) else seconds[i]))
        x = 0.3 * rng.standard_normal(length) + 0.05
        path = folder / f"clip{i:04d}.wav"
        sf.write(path, x, rate, subtype="PCM_16")
        records.append(Record(path=str(path), label=i % 3, fold=1 + i % folds))
    return records


def _index(records, root):
    return DatasetIndex(records=tuple(records), class_names=("a", "b", "c"), root=str(root))


def _build(index, tmp_path, frontend=None, **kw):
    kw.setdefault("clip_samples", RATE // 2)
    return build_store(
        index, frontend or LogMel(sample_rate=RATE, n_mels=16), sample_rate=RATE,
        cache_dir=tmp_path / "features", name="t", shard_clips=4, progress=False, **kw,
    )


@pytest.fixture
def clips(tmp_path):
    records = _write_clips(tmp_path / "audio", 24)
    return _index(records, tmp_path / "audio"), tmp_path


def test_features_are_the_models_own(clips):
    """A stored clip equals the frontend run on the preprocessed decoded waveform."""
    from src.data.audio import read_audio
    from src.models.waveform import preprocess_waveform

    index, tmp = clips
    frontend = LogMel(sample_rate=RATE, n_mels=16)
    store = _build(index, tmp, frontend)
    assert store.built == len(store.shards) and store.reused == 0
    assert sum(s.count for s in store.shards) == 24
    path = index.records[5].path
    shard = next(s for s in store.shards if path in s.keys)
    got = {k.numpy().decode(): f.numpy() for k, f in store.records([shard])}
    wave = read_audio(path, RATE, clip_samples=RATE // 2)
    want = np.asarray(frontend(preprocess_waveform(wave[None], True)))[0]
    np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=1e-5)


def test_second_build_reuses_everything_and_a_touched_file_rebuilds_only_its_shard(clips):
    index, tmp = clips
    first = _build(index, tmp)
    again = _build(index, tmp)
    assert again.built == 0 and again.reused == len(first.shards)
    path = index.records[7].path
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = _build(index, tmp)
    assert touched.built == 1
    (rebuilt,) = [s for s in touched.shards if path in s.keys]
    assert rebuilt.path not in {s.path for s in first.shards}
    # the old version of that shard is gone from disk
    assert len(list((first.directory / "shards").glob("*.tfrecord"))) == len(first.shards)


def test_adding_and_removing_files_rebuilds_only_their_shards(clips):
    index, tmp = clips
    first = _build(index, tmp)
    extra = _write_clips(tmp / "more", 1, seed=9)
    grown = _index(list(index.records) + [Record(extra[0].path, 0, 1)], tmp / "audio")
    after_add = _build(grown, tmp)
    assert after_add.built == 1 and after_add.reused == len(first.shards) - 1 + (
        len(after_add.shards) - len(first.shards))
    # buckets are chosen by a hash of the path, so take a clip that shares its shard: a
    # clip alone in its bucket leaves no shard to rebuild
    shared = next(s for s in after_add.shards if s.count >= 2)
    gone = shared.keys[0]
    shrunk = _index([r for r in grown.records if r.path != gone], tmp / "audio")
    after_remove = _build(shrunk, tmp)
    assert after_remove.built == 1
    (rebuilt,) = [s for s in after_remove.shards if shared.keys[1] in s.keys]
    assert rebuilt.count == shared.count - 1 and gone not in rebuilt.keys
    assert sum(s.count for s in after_remove.shards) == 24


def test_a_new_feature_version_recomputes_everything(clips):
    index, tmp = clips
    first = _build(index, tmp)

    class NewLogMel(LogMel):
        feature_version = LogMel.feature_version + 1

    second = _build(index, tmp, NewLogMel(sample_rate=RATE, n_mels=16))
    assert second.directory != first.directory
    assert second.built == len(second.shards) and second.reused == 0
    # a library version is part of the key as well
    material = json.loads((first.directory / "store.json").read_text())["material"]
    assert {"tensorflow", "numpy", "librosa", "soxr", "soundfile"} <= set(material["libraries"])
    assert material["feature_version"] == LogMel.feature_version


def test_truncated_or_corrupt_shards_are_rebuilt_never_read(clips):
    index, tmp = clips
    store = _build(index, tmp)
    victim = store.shards[0].path
    data = open(victim, "rb").read()
    with open(victim, "wb") as fh:
        fh.write(data[: len(data) // 2])
    rebuilt = _build(index, tmp)
    assert rebuilt.built == 1

    # Same size and mtime, flipped bytes: "always" hashes every shard.
    victim = rebuilt.shards[1].path
    st = os.stat(victim)
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _build(index, tmp, verify="auto").built == 0  # not noticed by the stat check...
    with pytest.raises(CorruptShardError, match="corrupt.*run the same command again"):
        feature_stats(rebuilt, index, range(len(index.records)))  # ...but by the CRC on read
    assert _build(index, tmp).built == 1  # and rebuilt on the next run
    data = bytearray(open(victim, "rb").read()) if os.path.exists(victim) else None
    store = _build(index, tmp)
    victim = store.shards[2].path
    st = os.stat(victim)
    data = bytearray(open(victim, "rb").read())
    data[-5] ^= 0x01
    open(victim, "wb").write(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _build(index, tmp, verify="always").built == 1


def test_bad_files_are_recorded_and_a_fixed_file_is_taken_up(clips):
    index, tmp = clips
    bad = index.records[4].path
    open(bad, "w").write("not audio")
    store = _build(index, tmp)
    fatal = [p for p in store.problems if p.fatal]
    assert [p.path for p in fatal] == [bad] and fatal[0].kind == "unreadable"
    assert bad not in {k for s in store.shards for k in s.keys}
    _write_clips(tmp / "audio", 5)  # rewrites clip0000..0004, clip0004 valid again
    fixed = _build(index, tmp)
    assert not [p for p in fixed.problems if p.fatal]
    assert bad in {k for s in fixed.shards for k in s.keys}


def test_a_killed_build_resumes_from_its_finished_shards(tmp_path):
    records = _write_clips(tmp_path / "audio", 64, seconds=1.0)
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        from pathlib import Path
        from src.data.index import DatasetIndex, Record
        from src.data.store import build_store
        from src.models.frontend import LogMel
        import json
        recs = [Record(**r) for r in json.loads(Path({str(tmp_path / 'recs.json')!r}).read_text())]
        index = DatasetIndex(records=tuple(recs), class_names=("a", "b", "c"), root={str(tmp_path / 'audio')!r})
        build_store(index, LogMel(sample_rate=16000, n_mels=16), sample_rate=16000, clip_samples=16000,
                    cache_dir=Path({str(tmp_path / 'features')!r}), name="t", shard_clips=2, progress=False,
                    workers=1)
    """))
    (tmp_path / "recs.json").write_text(json.dumps([r.__dict__ for r in records]))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    deadline = time.time() + 120
    finished = []
    while time.time() < deadline and proc.poll() is None:
        finished = list((tmp_path / "features").glob("*/shards/f*.json"))
        if len(finished) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert len(finished) >= 3, "the build finished before it could be killed"
    index = _index(records, tmp_path / "audio")
    store = build_store(index, LogMel(sample_rate=RATE, n_mels=16), sample_rate=RATE,
                        clip_samples=RATE, cache_dir=tmp_path / "features", name="t",
                        shard_clips=2, progress=False)
    assert store.reused >= 3 and store.built == len(store.shards) - store.reused
    assert sum(s.count for s in store.shards) == 64
    assert not list((tmp_path / "features").glob("*/shards/.*tmp"))


def test_a_build_with_other_folds_leaves_the_shards_another_process_reads(tmp_path):
    """Two fold layouts over one folder (pretraining with one fold, fine-tuning with
    several): a build does not delete shards that a live process still reads; once
    nobody reads them, the next build removes them."""
    import dataclasses

    records = _write_clips(tmp_path / "audio", 12, folds=3)
    (tmp_path / "recs.json").write_text(json.dumps([r.__dict__ for r in records]))
    script = tmp_path / "reader.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        import json
        from pathlib import Path
        from src.data.index import DatasetIndex, Record
        from src.data.store import build_store
        from src.models.frontend import LogMel
        recs = [Record(**r) for r in json.loads(Path({str(tmp_path / 'recs.json')!r}).read_text())]
        index = DatasetIndex(records=tuple(recs), class_names=("a", "b", "c"),
                             root={str(tmp_path / 'audio')!r})
        store = build_store(index, LogMel(sample_rate={RATE}, n_mels=16), sample_rate={RATE},
                            clip_samples={RATE // 2}, cache_dir=Path({str(tmp_path / 'features')!r}),
                            name="t", shard_clips=4, progress=False, workers=1)
        print(json.dumps([s.path for s in store.shards]), flush=True)
        sys.stdin.readline()  # reads the store until told to stop
    """))
    reader = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        theirs = json.loads(reader.stdout.readline())
        assert theirs and all(Path(p).exists() for p in theirs)
        other = [dataclasses.replace(r, fold=1 + i % 4) for i, r in enumerate(records)]
        mine = _build(_index(other, tmp_path / "audio"), tmp_path)
        assert Path(theirs[0]).parent == Path(mine.shards[0].path).parent  # one store
        assert set(theirs) != {s.path for s in mine.shards}
        assert all(Path(p).exists() for p in theirs)  # still read by the other process
        assert all(Path(s.path).exists() for s in mine.shards)
    finally:
        reader.communicate("stop\n", timeout=60)
    again = _build(_index(other, tmp_path / "audio"), tmp_path)
    assert again.reused == len(again.shards)
    left = {str(p) for p in (tmp_path / "features").glob("*/shards/*.tfrecord")}
    assert left == {s.path for s in again.shards}  # nobody reads the others now


def test_training_stream_is_one_epoch_of_the_split_with_crops_and_targets(clips):
    index, tmp = clips
    store = _build(index, tmp)
    rows = np.arange(0, 24, 2)
    labels = LabelTable(index)
    for cache_mb in (0, 1024):  # streamed and cached: the same clips
        ds = training_dataset(store, index, rows, labels, batch_size=5, seed=3,
                              memory_cache_mb=cache_mb)
        for _epoch in range(2):
            ys = []
            for x, y in ds:
                assert x.shape[1:] == (store.clip_frames, 16)
                ys.append(y.numpy())
            y = np.concatenate(ys)
            assert y.shape == (12, 3)
            assert np.bincount(y.argmax(1), minlength=3).tolist() == np.bincount(
                [index.records[r].label for r in rows], minlength=3).tolist()


def test_the_log_says_whether_the_split_is_cached_or_streamed(clips, caplog):
    index, tmp = clips
    store = _build(index, tmp)
    rows, labels = np.arange(24), LabelTable(index)
    with caplog.at_level("INFO", logger="src.data.pipeline"):
        training_dataset(store, index, rows, labels, batch_size=4, seed=0)
    assert "training split: 24 clips" in caplog.text and "cached in memory" in caplog.text
    assert "shuffle buffer 24 clips" in caplog.text and "WARNING" not in caplog.text
    caplog.clear()
    clip_mb = store.clip_frames * 16 * 4 / 2**20
    with caplog.at_level("INFO", logger="src.data.pipeline"):
        training_dataset(store, index, rows, labels, batch_size=4, seed=0, memory_cache_mb=0,
                         shuffle_buffer_mb=3.5 * clip_mb)
    assert "streamed from the store's shards" in caplog.text
    assert "shuffle buffer 3 clips" in caplog.text
    assert "holds 3 clip(s) of the 24 streamed" in caplog.text  # under 4 batches: warned


def test_variable_length_clips_are_cropped_for_training_and_windowed_for_evaluation(tmp_path):
    lengths = [0.3, 0.5, 1.2, 2.05]
    records = _write_clips(tmp_path / "audio", 4, seconds=lengths)
    index = _index(records, tmp_path / "audio")
    store = _build(index, tmp_path, variable_length=True)
    frames = store.frames_of()
    fe = LogMel(sample_rate=RATE, n_mels=16)
    for r, secs in zip(records, lengths):
        assert frames[r.path] == fe.num_frames(int(RATE * secs))  # stored at its own length
    ds = training_dataset(store, index, range(4), LabelTable(index), batch_size=4, seed=0)
    (x, _y), = list(ds)
    assert x.shape == (4, store.clip_frames, 16)
    ev = eval_dataset(store, index, range(4), batch_size=3)
    rows, weights = [], []
    for xb, rb, wb in ev:
        assert xb.shape[1:] == (store.clip_frames, 16)
        rows += rb.numpy().tolist()
        weights += wb.numpy().tolist()
    hop = store.clip_frames // 2
    for i, r in enumerate(records):
        n = frames[r.path]
        expected = len(window_starts(n, store.clip_frames, hop))
        assert rows.count(i) == expected
    short = records[0].path
    assert weights[rows.index(0)] == pytest.approx(frames[short] / store.clip_frames)
    assert all(w == 1.0 for row, w in zip(rows, weights) if row in (2, 3))


def test_balanced_sampling_evens_out_a_skewed_set(tmp_path):
    # class 0: 40 clips, class 1: 8, class 2: 2
    counts = [40, 8, 2]
    records = []
    folder = tmp_path / "audio"
    base = _write_clips(folder, sum(counts), seconds=0.2)
    labels = np.repeat(np.arange(3), counts)
    records = [Record(r.path, int(lab), 1) for r, lab in zip(base, labels)]
    index = _index(records, folder)
    store = _build(index, tmp_path, clip_samples=RATE // 5)
    ds = training_dataset(store, index, range(len(records)), LabelTable(index), batch_size=50,
                          seed=0, balanced=True, samples_per_epoch=3000, repeat=True)
    drawn = np.concatenate([y.numpy().argmax(1) for _, y in ds.take(60)])
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.abs(freq - 1 / 3).max() < 0.05, freq
    unbalanced = training_dataset(store, index, range(len(records)), LabelTable(index),
                                  batch_size=50, seed=0)
    drawn = np.concatenate([y.numpy().argmax(1) for _, y in unbalanced])
    assert np.bincount(drawn, minlength=3).tolist() == counts


def test_statistics_use_only_the_rows_given(clips):
    index, tmp = clips
    store = _build(index, tmp)
    rows = np.arange(12)
    mean, std = feature_stats(store, index, rows)
    feats = {k.numpy().decode(): f.numpy() for k, f in store.records(store.shards)}
    x = np.concatenate([feats[index.records[r].path].ravel() for r in rows]).astype(np.float64)
    assert mean == pytest.approx(x.mean(), rel=1e-6) and std == pytest.approx(x.std(), rel=1e-6)
    other = feature_stats(store, index, np.arange(12, 24))
    assert other[0] != pytest.approx(mean, rel=1e-6)


@pytest.fixture(autouse=True)
def _quiet():
    tf.get_logger().setLevel("ERROR")


@pytest.mark.slow  # builds and trains on 1600 and 4800 ten-second clips (a few minutes)
def test_training_memory_does_not_grow_with_the_number_of_clips(tmp_path):
    """The bound of `python -m scripts.benchmark memory` on a smaller set: three times the
    clips (780 MB more features) may not raise the peak RSS of training by more than a
    small fraction of that. Below about 1600 clips the fixed buffers (a shard being
    written, the shuffle buffer, prefetch) are still filling up, so the smaller set
    starts there."""
    from scripts.benchmark import bench_memory

    r = bench_memory([1600, 4800], 10.0, 64, tmp_path, progress=False, shuffle_mb=32)
    small, large = r["sizes"]
    grown_features = large["features_mb"] - small["features_mb"]
    assert grown_features > 700
    for key in ("build_and_train_peak_rss_mb", "train_peak_rss_mb"):
        assert large[key] - small[key] < 0.2 * grown_features, (key, small, large)
