"""Distributed training (trainer.strategy / logical_cpus / mixed_precision / jit_compile).

End to end as in test_train.py: `python -m src.train` in subprocesses on the generated
quickstart data, compared with the single-device run of the same config.

Run as a script (``python tests/test_distribute.py probe OUT OVERRIDES...``, one process
per worker of the cluster in ``TF_CONFIG``) it reads the training split as a multi-worker
run does and writes which clips each epoch gave this worker (:func:`probe_worker`).
"""

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_DATA, TINY_MODEL
from helpers import train_env as shared_train_env

from src.config import ConfigError
from src.training import distribute

ROOT = Path(__file__).resolve().parents[1]

# The tiny quickstart of test_train.py: 12 classes x 5 clips of 1 s (fold 5 tests 12 clips,
# 36 train and 12 validate). Two clips per feature-store shard: the training split lies in
# about 30 shard files, which a multi-worker run shares out between its workers.
TINY = ["experiment=quickstart", *TINY_DATA, *TINY_MODEL, "data.store.shard_clips=2"]
NUM_TRAIN = 36
# Runs compared number by number across strategies:
# * no random layers (dropout, SpecAugment): each replica draws its own random numbers;
# * one step per epoch (batch_size = the 36 training clips): under a strategy, Keras' fit
#   draws a batch from a fresh iterator to build the model, which advances the seeded
#   reshuffle, so with several steps per epoch the distributed run sees a different
#   (equally random) order of the clips than the single-device run;
# * 36 = 2 replicas x 18.
COMPARABLE = [
    *TINY,
    "trainer.epochs=3",
    f"trainer.batch_size={NUM_TRAIN}",
    "trainer.deterministic=true",
    "trainer.attention_maps=0",
    "model.dropout_rate=0.0",
    "augment.freq_mask_param=0",
    "augment.time_mask_param=0",
]
PER_REPLICA = NUM_TRAIN // 2
# Agreement with the single-device run. Only the order of the floating-point sums differs
# (gradients all-reduced over the replicas, per-replica means); measured on 2 CPU cores:
# relative differences of the per-epoch losses <= 2e-7, same accuracies. Allowed: 1e-4
# relative on losses, and one of the 12 test clips flipping on a near-tie of its logits.
LOSS_RTOL = 1e-4


def train_env(tmp: Path, **extra) -> dict:
    env = shared_train_env(tmp, TMPDIR=str(tmp / "scratch"))  # a non-chief worker's dir
    env.pop("TF_CONFIG", None)
    (tmp / "scratch").mkdir(exist_ok=True)
    env.update(extra)
    return env


def run_train(tmp: Path, *overrides, env=None, check=True, timeout=300):
    out = subprocess.run(
        [sys.executable, "-m", "src.train", *overrides],
        cwd=ROOT, env=env or train_env(tmp), capture_output=True, text=True, timeout=timeout,
    )
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def fold_results(tmp: Path, name: str) -> dict:
    (path,) = (tmp / "runs" / name).glob("*/fold_5/results.json")
    return json.loads(path.read_text())


def untimed(history: dict) -> dict:
    """A fold's history without the epochs' wall times (no two runs share those)."""
    return {k: v for k, v in history.items() if k != "epoch_time_s"}


def assert_agree(result: dict, reference: dict) -> None:
    for key in ("loss", "val_loss", "learning_rate"):
        np.testing.assert_allclose(
            result["history"][key], reference["history"][key], rtol=LOSS_RTOL, err_msg=key
        )
    np.testing.assert_allclose(result["test_loss"], reference["test_loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(result["val_loss"], reference["val_loss"], rtol=LOSS_RTOL)
    tol = 1 / reference["num_test"] + 1e-9
    assert abs(result["test_accuracy"] - reference["test_accuracy"]) <= tol
    assert result["epochs"] == reference["epochs"] == 3
    assert result["splits"] == reference["splits"]


def load_weights(model_file: Path) -> list:
    from src.models import load_model

    return [np.asarray(w) for w in load_model(model_file).backbone.get_weights()]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    """The default strategy's run (it also generates the data and builds the store)."""
    tmp = tmp_path_factory.mktemp("distribute")
    run_train(tmp, *COMPARABLE, "name=single", "trainer.strategy=default")
    reference = fold_results(tmp, "single")
    assert reference["num_train"] == NUM_TRAIN  # one step per epoch
    assert all(math.isfinite(v) for v in reference["history"]["loss"])
    assert reference["history"]["loss"][-1] < reference["history"]["loss"][0]
    return tmp, reference


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_matches_single_device(single_device):
    tmp, reference = single_device
    out = run_train(
        tmp, *COMPARABLE, "name=mirrored", "trainer.strategy=mirrored", "trainer.logical_cpus=2"
    )
    assert f"MirroredStrategy, replicas: 2, per-replica batch {PER_REPLICA}" in (
        out.stdout + out.stderr
    )
    result = fold_results(tmp, "mirrored")
    assert_agree(result, reference)
    # The same weights, to the order of the floating-point sums.
    (mirrored,) = (tmp / "runs" / "mirrored").glob("*/fold_5/model.keras")
    (single,) = (tmp / "runs" / "single").glob("*/fold_5/model.keras")
    for a, b in zip(load_weights(mirrored), load_weights(single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_workers(tmp: Path, name: str, command: list[str], timeout=300) -> list[str]:
    """Start one process per worker of a two-worker loopback cluster; their logs."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    procs, logs = [], []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        log_file = open(tmp / f"{name}_{index}.log", "w")  # noqa: SIM115
        logs.append(log_file)
        env = train_env(tmp, TF_CONFIG=tf_config, PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file,
                                      stderr=subprocess.STDOUT))
    deadline = time.time() + timeout
    try:
        # One worker failing leaves the other waiting for it: stop at the first failure.
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
    texts = [(tmp / f"{name}_{i}.log").read_text() for i in range(2)]
    for p, text in zip(procs, texts):
        assert p.returncode == 0, text[-6000:]
    return texts


def probe_worker(out: str, overrides: list[str], epochs: int = 2) -> None:
    """As one worker of ``trainer.strategy=multi_worker``: build the training split's
    dataset as src.train does (the strategy from ``TF_CONFIG``, the feature store, the
    splits, ``training_dataset(..., shard_by_file=True)``, streamed for the planned steps
    of an epoch), distribute it as Keras' fit does, read ``epochs`` epochs and write the
    clip keys each gave this worker's replica, and its batch sizes, to ``out`` (json)."""
    import keras
    from hydra import compose, initialize_config_dir

    from src.data.datasets import load_index
    from src.data.pipeline import LabelTable, training_dataset
    from src.data.splits import make_splits
    from src.train import build_features
    from src.training.mixup import apply_mixup

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    distribute.setup(cfg, Path(out).parent)
    strategy = distribute.get_strategy(cfg.trainer)
    store, index, _ = build_features(cfg, load_index(cfg.data))
    splits = make_splits(index, int(cfg.data.folds[0]), cfg.data)
    batch = int(cfg.trainer.batch_size)
    keras.utils.set_random_seed(int(cfg.seed))
    ds = training_dataset(  # the buffer sizes at their defaults: they move no clip
        store, index, splits.train, LabelTable(index), batch_size=batch, seed=int(cfg.seed),
        target_frames=cfg.data.get("target_frames"),
        memory_cache_mb=float(cfg.data.memory_cache_mb), repeat=True, shard_by_file=True,
    )
    ds = apply_mixup(ds, prob=float(cfg.augment.mixup), alpha=float(cfg.augment.mixup_alpha),
                     domain=str(cfg.augment.mixup_domain))
    dist = strategy.experimental_distribute_dataset(ds)

    def digest(features):
        return hashlib.sha1(np.ascontiguousarray(features, np.float32).tobytes()).hexdigest()

    # A fixed-length clip reaches training as stored: its features identify it.
    key_of = {digest(f.numpy()): k.numpy().decode() for k, f in store.records(store.shards)}
    result = {"train": sorted(index.records[i].path for i in splits.train), "epochs": []}
    steps = math.ceil(len(splits.train) / batch)  # the steps src.train plans per epoch
    stream = iter(dist)
    for _ in range(epochs):
        keys, batches = [], []
        for _ in range(steps):
            x, _y = next(stream)
            (local,) = strategy.experimental_local_results(x)  # this worker's one replica
            batches.append(int(local.shape[0]))
            keys += [key_of[digest(clip)] for clip in local.numpy()]
        result["epochs"].append({"keys": keys, "batches": batches})
    Path(out).write_text(json.dumps(result))


@pytest.mark.slow
def test_multi_worker_trains_from_shards_two_processes(single_device):
    """Two workers on loopback (one CPU replica each), each streaming its own shard files.
    Only the chief writes the run; both hold the same model; every step gives each worker
    a full batch; no clip reaches both workers, and between them they train on the whole
    training split."""
    tmp, reference = single_device
    texts = run_workers(tmp, "worker", [sys.executable, "-m", "src.train", *COMPARABLE,
                                        "name=multi", "trainer.strategy=multi_worker"])
    assert f"MultiWorkerMirroredStrategy, replicas: 2, per-replica batch {PER_REPLICA}" in (
        texts[0]
    )
    # The chief (worker 0) wrote the run; worker 1 wrote only to its scratch directory.
    assert len(list((tmp / "runs" / "multi").glob("*/results.json"))) == 1
    assert len(list((tmp / "runs" / "multi").glob("*/fold_*"))) == 1
    (scratch,) = (tmp / "scratch" / "audio-transformer-workers").glob("*/worker_1")
    assert (scratch / "fold_5" / "results.json").exists()
    assert "worker 1 is not the chief" in texts[1]
    (run_dir,) = (tmp / "runs" / "multi").iterdir()
    chief = fold_results(tmp, "multi")
    other = json.loads((scratch / "fold_5" / "results.json").read_text())
    assert chief["splits"] == reference["splits"]
    # The same model on both workers: mirrored variables, updated in step.
    assert untimed(other["history"]) == untimed(chief["history"])
    for a, b in zip(load_weights(run_dir / "fold_5" / "model.keras"),
                    load_weights(scratch / "fold_5" / "model.keras"), strict=True):
        np.testing.assert_array_equal(a, b)
    loss = chief["history"]["loss"]
    assert all(math.isfinite(v) for v in loss + chief["history"]["val_loss"])
    assert loss[-1] < loss[0]
    # The planned steps per epoch (ceil(36 / 36) = 1): the learning rate logged at each
    # epoch's first step is the single-device run's.
    np.testing.assert_allclose(chief["history"]["learning_rate"],
                               reference["history"]["learning_rate"], rtol=1e-7)

    # What each worker read: the same command's dataset, built and distributed as in fit.
    run_workers(tmp, "probe", [sys.executable, str(Path(__file__).resolve()), "probe",
                               str(tmp / "probe_{index}.json"), *COMPARABLE, "name=multi",
                               "trainer.strategy=multi_worker"], timeout=240)
    probes = [json.loads((tmp / f"probe_{i}.json").read_text()) for i in range(2)]
    train = set(probes[0]["train"])
    assert probes[1]["train"] == probes[0]["train"] and len(train) == NUM_TRAIN
    # Each worker's share: the clips it read in any epoch (each reads 2 x 18 clips in the
    # two epochs, more than its share of about 18, so it has gone through all of it).
    shares = [{k for e in p["epochs"] for k in e["keys"]} for p in probes]
    assert not shares[0] & shares[1], "a clip reached both workers"
    assert shares[0] | shares[1] == train  # every training clip is someone's
    assert min(len(s) for s in shares) > 0
    for epoch in range(2):
        reads = [p["epochs"][epoch] for p in probes]
        for read in reads:  # one full per-replica batch per step, on every worker
            assert read["batches"] == [PER_REPLICA] * math.ceil(NUM_TRAIN / (2 * PER_REPLICA))
    # The first epoch, from a fresh stream: a worker whose share is larger than what an
    # epoch reads leaves the rest of it for the next epoch; every other clip is read.
    first = [set(p["epochs"][0]["keys"]) for p in probes]
    per_epoch = len(probes[0]["epochs"][0]["keys"])
    assert len(train - first[0] - first[1]) == sum(max(0, len(s) - per_epoch) for s in shares)
    for read, share in zip(first, shares):
        assert len(read) == min(len(share), per_epoch)


@pytest.mark.slow
def test_mixed_precision_on_cpu_is_ignored_and_trains_exactly_as_float32(tmp_path):
    """mixed_precision=true without a GPU is float32 training: the same numbers."""
    one = [*COMPARABLE, "trainer.epochs=1", "trainer.jit_compile=true"]
    out = run_train(tmp_path, *one, "name=fp16", "trainer.mixed_precision=true")
    assert "trainer.mixed_precision=true: no GPU found" in out.stdout + out.stderr
    (model_file,) = (tmp_path / "runs" / "fp16").rglob("fold_5/model.keras")
    with zipfile.ZipFile(model_file) as zf:
        config = zf.read("config.json").decode()
    assert "mixed_float16" not in config and '"float32"' in config
    run_train(tmp_path, *one, "name=fp32")
    ignored, plain = fold_results(tmp_path, "fp16"), fold_results(tmp_path, "fp32")
    assert untimed(ignored["history"]) == untimed(plain["history"])
    assert ignored["test_report"] == plain["test_report"]


@pytest.mark.slow
def test_bfloat16_training_on_cpu(tmp_path):
    """bfloat16 compute, float32 variables and logits; a run that learns."""
    import keras

    from src.models import load_model

    out = run_train(tmp_path, *COMPARABLE, "name=bf16", "trainer.mixed_precision=bfloat16")
    (model_file,) = (tmp_path / "runs").rglob("fold_5/model.keras")
    with zipfile.ZipFile(model_file) as zf:
        config = zf.read("config.json").decode()
    assert "mixed_bfloat16" in config, out.stderr[-2000:]
    model = load_model(model_file)
    assert model.backbone.dtype_policy.name == "mixed_bfloat16"
    assert {keras.backend.standardize_dtype(w.dtype) for w in model.weights} == {"float32"}
    wave = np.random.default_rng(0).standard_normal((2, 16000)).astype("float32") * 0.1
    logits = model(wave)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert np.isfinite(keras.ops.convert_to_numpy(logits)).all()
    r = fold_results(tmp_path, "bf16")
    loss = r["history"]["loss"]
    assert all(math.isfinite(v) for v in loss) and loss[-1] < loss[0]
    m = np.array(r["test_report"]["confusion_matrix"])
    assert m.sum() == r["num_test"] and np.trace(m) / m.sum() == pytest.approx(
        r["test_accuracy"])


def test_bfloat16_policy_leaves_the_frontend_and_logits_in_float32(tmp_path):
    """Only the backbone computes in bfloat16: the saved waveform model computes the same
    float32 features as training did, and the logits are float32."""
    import keras

    from src.models import load_model
    from src.models.build import build_model

    def build():
        return build_model(dict(embed_dim=16, num_heads=2, ff_dim=32, num_layers=1),
                           dict(n_mels=32), num_classes=3, clip_samples=8000)

    reference = build()
    distribute.enter_strategy({"mixed_precision": "bfloat16"})
    try:
        model = build()
    finally:
        distribute.exit_strategy()
    assert model.backbone.dtype_policy.name == "mixed_bfloat16"
    assert model.frontend.dtype_policy.name == "float32"
    assert model.backbone.classifier.dtype_policy.name == "float32"
    wave = np.random.default_rng(0).standard_normal((2, 8000)).astype("float32") * 0.1
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.features(wave)),
                                  keras.ops.convert_to_numpy(reference.features(wave)))
    model.save(tmp_path / "m.keras")
    loaded = load_model(tmp_path / "m.keras")
    logits = loaded(wave)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert loaded.frontend.dtype_policy.name == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(logits),
                               keras.ops.convert_to_numpy(model(wave)), atol=1e-6)
    assert distribute.precision_policy({"mixed_precision": "bfloat16"}) == "mixed_bfloat16"
    assert distribute.precision_policy({"mixed_precision": False}) == "float32"


def test_bad_distribution_config_fails_before_data_work(tmp_path):
    # The config checks themselves are tested in-process below; this one is the command's
    # exit and that it stops before any data is generated or read.
    out = run_train(
        tmp_path, *TINY, "trainer.strategy=mirrored", "trainer.logical_cpus=2",
        "trainer.batch_size=5", env=train_env(tmp_path), check=False, timeout=120,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "trainer.batch_size=5 (the global batch) is not divisible by the 2 replicas" in (
        out.stderr)
    assert not (tmp_path / "cache" / "quickstart").exists()  # no data generated


# In-process checks of the config and TF_CONFIG handling (no TensorFlow work).


def test_check_config_names_the_key():
    distribute.check_config({"strategy": "default", "logical_cpus": None})
    for cfg, key in [
        ({"strategy": "horovod"}, "trainer.strategy"),
        ({"logical_cpus": 0}, "trainer.logical_cpus"),
        ({"logical_cpus": "two"}, "trainer.logical_cpus"),
        ({"mixed_precision": "yes"}, "trainer.mixed_precision"),
        ({"mixed_precision": "fp8"}, "trainer.mixed_precision"),
        ({"jit_compile": "xla"}, "trainer.jit_compile"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            distribute.check_config(cfg)


def test_jit_compile_values():
    assert distribute.jit_compile({}) == "auto"
    assert distribute.jit_compile({"jit_compile": "auto"}) == "auto"
    assert distribute.jit_compile({"jit_compile": True}) is True
    assert distribute.jit_compile({"jit_compile": "false"}) is False


def test_tf_config_is_checked(monkeypatch):
    cfg = {"strategy": "multi_worker"}
    for raw, match in [
        (None, "not set"),
        ("{not json", "not valid JSON"),
        ('{"cluster": {}, "task": {"type": "worker", "index": 0}}', "cluster"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "task"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "index"),
    ]:
        if raw is None:
            monkeypatch.delenv("TF_CONFIG", raising=False)
        else:
            monkeypatch.setenv("TF_CONFIG", raw)
        with pytest.raises(ConfigError, match=match) as err:
            distribute.check_config(cfg)
        assert "TF_CONFIG" in str(err.value)


def test_only_the_chief_writes_the_run_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    run_dir = tmp_path / "runs" / "x"
    cfg = {"strategy": "multi_worker"}
    workers = {"worker": ["a:1", "b:1"]}

    def task(type_, index, cluster=workers):
        monkeypatch.setenv(
            "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": type_, "index": index}})
        )

    task("worker", 0)
    assert distribute.is_chief(cfg) and distribute.output_dir(cfg, run_dir) == run_dir
    task("worker", 1)
    assert not distribute.is_chief(cfg)
    scratch = distribute.output_dir(cfg, run_dir)
    assert scratch.is_relative_to(tmp_path / "tmp") and scratch.name == "worker_1"
    assert distribute.output_dir(cfg, run_dir) == scratch  # the same after a restart
    with_chief = {"chief": ["c:1"], **workers}
    task("worker", 0, with_chief)
    assert not distribute.is_chief(cfg)
    task("chief", 0, with_chief)
    assert distribute.is_chief(cfg)
    assert distribute.output_dir({"strategy": "mirrored"}, run_dir) == run_dir


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    probe_worker(sys.argv[2].format(index=task["index"]), sys.argv[3:])
