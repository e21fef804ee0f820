"""A fold's inputs beyond its config (splits, stored features, pretrained weights): a
finished or begun fold is only reused on the inputs it had."""

import dataclasses
import json

import numpy as np
import pytest
import soundfile as sf

from src.config import ConfigError
from src.data.index import DatasetIndex, Record
from src.data.splits import make_splits
from src.data.store import build_store
from src.models.frontend import LogMel
from src.training.fold_inputs import INPUTS_FILE, changes, check_fold_inputs, fold_inputs

RATE = 16000
DATA = {"val_fraction": 0.25, "split_seed": 0}


def _clips(folder, n=18, folds=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        path = folder / f"clip{i:03d}.wav"
        sf.write(path, 0.3 * rng.standard_normal(RATE // 4), RATE, subtype="PCM_16")
        records.append(Record(path=str(path), label=i % 3, fold=1 + i % folds))
    return DatasetIndex(records=tuple(records), class_names=("a", "b", "c"), root=str(folder))


def _inputs(index, tmp_path, pretrained=None, fold=1, shard_clips=4, cache="features"):
    store = build_store(index, LogMel(sample_rate=RATE, n_mels=16), sample_rate=RATE,
                        clip_samples=RATE // 4, cache_dir=tmp_path / cache, name="t",
                        shard_clips=shard_clips, progress=False)
    return fold_inputs(index, store, make_splits(index, fold, DATA), pretrained)


@pytest.fixture
def setup(tmp_path):
    index = _clips(tmp_path / "audio")
    return index, tmp_path, _inputs(index, tmp_path)


def test_the_same_inputs_are_the_same(setup, tmp_path):
    index, _, inputs = setup
    assert [inputs["splits"][s]["clips"] for s in ("train", "val", "test")] == [8, 4, 6]
    assert _inputs(index, tmp_path) == inputs
    # A clip touched (new mtime, the same audio): its shard is recomputed to the same bytes.
    import os

    st = os.stat(index.records[2].path)
    os.utime(index.records[2].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _inputs(index, tmp_path) == inputs


def test_relabelled_refolded_and_changed_clips_are_named(setup, tmp_path):
    index, _, inputs = setup
    records = list(index.records)
    records[0] = dataclasses.replace(records[0], label=2)  # fold 1: the test split
    relabelled = dataclasses.replace(index, records=tuple(records))
    (found,) = changes(inputs, _inputs(relabelled, tmp_path))
    assert found.startswith("the test split (the same number of clips;")

    records = list(index.records)
    records[1] = dataclasses.replace(records[1], fold=1)  # from fold 2 into the test fold
    refolded = dataclasses.replace(index, records=tuple(records))
    found = changes(inputs, _inputs(refolded, tmp_path))
    assert any(f.startswith("the test split (6 -> 7 clips") for f in found), found

    path = index.records[4].path  # fold 2
    samples, _ = sf.read(path, dtype="float32")
    sf.write(path, samples * 0.5, RATE, subtype="PCM_16")
    assert changes(inputs, _inputs(index, tmp_path)) == [
        "the stored features of data fold(s) 2 (an audio file in them changed)"]


def test_pretrained_weights_that_changed_are_named(setup, tmp_path):
    index, _, _ = setup
    weights = tmp_path / "weights.keras"
    weights.write_bytes(b"first weights")
    before = _inputs(index, tmp_path, pretrained=weights)
    assert before["pretrained"]["file"] == str(weights)
    weights.write_bytes(b"other weights")
    (found,) = changes(before, _inputs(index, tmp_path, pretrained=weights))
    assert found.startswith(f"model.pretrained ({weights}: sha256 ")
    (found,) = changes(before, _inputs(index, tmp_path))
    assert found == f"model.pretrained ({weights} -> none)"


def test_a_fold_records_its_inputs_then_stops_on_others(setup, tmp_path):
    index, _, inputs = setup
    fold_dir = tmp_path / "run" / "fold_1"
    fold_dir.mkdir(parents=True)
    check_fold_inputs(fold_dir, inputs, 1)  # first start: recorded
    assert json.loads((fold_dir / INPUTS_FILE).read_text()) == inputs
    check_fold_inputs(fold_dir, inputs, 1)  # the same: nothing to say
    other = json.loads(json.dumps(inputs))
    other["splits"]["train"]["digest"] = "0" * 64
    with pytest.raises(ConfigError, match=r"fold 1 in .*run was begun on other inputs .*"
                                          r"the train split .*trainer\.resume=false"):
        check_fold_inputs(fold_dir, other, 1)
    (fold_dir / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="was finished on other inputs"):
        check_fold_inputs(fold_dir, other, 1)
    assert json.loads((fold_dir / INPUTS_FILE).read_text()) == inputs  # kept
    # A record that cannot be read (a crash while it was written) is made anew.
    (fold_dir / INPUTS_FILE).write_text("{")
    check_fold_inputs(fold_dir, other, 1)
    assert json.loads((fold_dir / INPUTS_FILE).read_text()) == other


def test_a_store_sharded_anew_holds_the_same_inputs(setup, tmp_path):
    """The digests are of each clip's decoded audio: regrouping the clips into other
    shards (data.store.shard_clips) changes the shards' checksums, not the inputs."""
    index, _, inputs = setup
    resharded = _inputs(index, tmp_path, shard_clips=1, cache="resharded")
    assert resharded["features"]["shards"] > inputs["features"]["shards"]
    assert resharded["features"]["digest"] != inputs["features"]["digest"]
    assert resharded["features"]["clips_digest"] == inputs["features"]["clips_digest"]
    assert changes(inputs, resharded) == []
    fold_dir = tmp_path / "run" / "fold_1"
    fold_dir.mkdir(parents=True)
    check_fold_inputs(fold_dir, inputs, 1)
    check_fold_inputs(fold_dir, resharded, 1)  # no error
    # Another store key (an upgraded library, say) whose features are byte for byte the
    # same (the same shard checksums): the same input. With other features: named.
    other = json.loads(json.dumps(inputs))
    other["features"]["store"] = "t-0000"
    assert changes(inputs, other) == []
    other["features"]["digest"] = "0" * 64
    (found,) = changes(inputs, other)
    assert found.startswith(f"the feature store ({inputs['features']['store']} -> t-0000")


def test_a_record_from_before_the_clip_digests_is_completed(setup, tmp_path):
    """An inputs.json without the per-clip digests (an older run) is checked on the
    shards' checksums, then completed, so the store may be sharded anew afterwards."""
    index, _, inputs = setup
    old = json.loads(json.dumps(inputs))
    for key in ("store", "clips_digest", "clips_by_data_fold"):
        del old["features"][key]
    fold_dir = tmp_path / "run" / "fold_1"
    fold_dir.mkdir(parents=True)
    (fold_dir / INPUTS_FILE).write_text(json.dumps(old))
    changed = json.loads(json.dumps(inputs))
    changed["features"]["digest"] = "0" * 64  # other shards, no clip digests to compare
    with pytest.raises(ConfigError, match="the stored features of data fold"):
        check_fold_inputs(fold_dir, changed, 1)
    check_fold_inputs(fold_dir, inputs, 1)
    assert json.loads((fold_dir / INPUTS_FILE).read_text()) == inputs
    check_fold_inputs(fold_dir, _inputs(index, tmp_path, shard_clips=1, cache="resharded"), 1)


def test_a_shard_from_before_the_empty_check_that_holds_a_header_only_file_is_rebuilt(
        setup, tmp_path):
    """A shard written before a file without audio frames was fatal holds it as a silent
    clip (a "0.000 s, zero-padded" note): it is decoded again, and only it."""
    index, _, _ = setup
    (manifest,) = [m for m in (tmp_path / "features").rglob("shards/*.json")
                   if json.loads(m.read_text())["keys"]][:1]
    m = json.loads(manifest.read_text())
    path = m["keys"][0]
    del m["clips"]
    m["problems"].append({"path": path, "kind": "short", "fatal": False,
                          "message": f"{path}: 0.000 s, zero-padded to 0.250 s"})
    manifest.write_text(json.dumps(m))
    store = build_store(index, LogMel(sample_rate=RATE, n_mels=16), sample_rate=RATE,
                        clip_samples=RATE // 4, cache_dir=tmp_path / "features", name="t",
                        shard_clips=4, progress=False)
    assert store.built == 1 and store.reused == len(store.shards) - 1
