"""Distributed training (trainer.strategy / logical_cpus / mixed_precision / jit_compile).

End to end as in test_train.py: `python -m src.train` in subprocesses on the generated
quickstart data, compared with the single-device run of the same config.
"""

import json
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

# The tiny quickstart of test_train.py: 12 classes x 5 clips of 1 s (48 train / 12 test).
TINY = ["experiment=quickstart", *TINY_DATA, *TINY_MODEL]
# Runs compared number by number across strategies:
# * no random layers (dropout, SpecAugment): each replica draws its own random numbers;
# * one step per epoch (batch_size = the 48 training clips): under a strategy, Keras' fit
#   draws a batch from a fresh iterator to build the model, which advances the seeded
#   reshuffle, so with several steps per epoch the distributed run sees a different
#   (equally random) order of the clips than the single-device run;
# * 48 = 2 replicas x 24.
COMPARABLE = [
    *TINY,
    "trainer.epochs=3",
    "trainer.batch_size=48",
    "trainer.deterministic=true",
    "model.dropout_rate=0.0",
    "augment.freq_mask_param=0",
    "augment.time_mask_param=0",
]
# Agreement with the single-device run. Only the order of the floating-point sums differs
# (gradients all-reduced over the replicas, per-replica means); measured on 2 CPU cores:
# relative differences of the per-epoch losses <= 2e-7 (mirrored and multi-worker), same
# accuracies. Allowed: 1e-4 relative on losses, and one of the 12 test clips flipping on a
# near-tie of its logits.
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


def assert_agree(result: dict, reference: dict) -> None:
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(
            result["history"][key], reference["history"][key], rtol=LOSS_RTOL, err_msg=key
        )
    np.testing.assert_allclose(result["loss"], reference["loss"], rtol=LOSS_RTOL)
    assert abs(result["accuracy"] - reference["accuracy"]) <= 1 / reference["num_test"] + 1e-9
    assert result["epochs"] == reference["epochs"] == 3


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    """The default strategy's run (it also generates the data and caches the features)."""
    tmp = tmp_path_factory.mktemp("distribute")
    run_train(tmp, *COMPARABLE, "name=single", "trainer.strategy=default")
    return tmp, fold_results(tmp, "single")


def test_mirrored_on_two_logical_cpus_matches_single_device(single_device):
    tmp, reference = single_device
    out = run_train(
        tmp, *COMPARABLE, "name=mirrored", "trainer.strategy=mirrored", "trainer.logical_cpus=2"
    )
    assert "MirroredStrategy, replicas: 2, per-replica batch 24" in out.stdout + out.stderr
    result = fold_results(tmp, "mirrored")
    assert_agree(result, reference)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_multi_worker_two_processes_match_single_device(single_device):
    """Two workers on loopback (one CPU replica each); only the chief writes the run."""
    tmp, reference = single_device
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    procs, logs = [], []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        log_file = open(tmp / f"worker_{index}.log", "w")
        logs.append(log_file)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "src.train", *COMPARABLE, "name=multi",
             "trainer.strategy=multi_worker"],
            cwd=ROOT, env=train_env(tmp, TF_CONFIG=tf_config), stdout=log_file,
            stderr=subprocess.STDOUT,
        ))
    deadline = time.time() + 300
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
    texts = [(tmp / f"worker_{i}.log").read_text() for i in range(2)]
    for p, text in zip(procs, texts):
        assert p.returncode == 0, text[-6000:]
    assert "MultiWorkerMirroredStrategy, replicas: 2, per-replica batch 24" in texts[0]

    # The chief (worker 0) wrote the run; worker 1 wrote only to its scratch directory.
    assert len(list((tmp / "runs" / "multi").glob("*/results.json"))) == 1
    assert len(list((tmp / "runs" / "multi").glob("*/fold_*"))) == 1
    (scratch,) = (tmp / "scratch" / "audio-transformer-workers").glob("*/worker_1")
    assert (scratch / "fold_5" / "results.json").exists()
    assert "worker 1 is not the chief" in texts[1]

    chief = fold_results(tmp, "multi")
    assert_agree(chief, reference)
    other = json.loads((scratch / "fold_5" / "results.json").read_text())
    assert other["history"] == chief["history"]  # the same model on both workers


@pytest.mark.slow
def test_mixed_precision_on_cpu_warns_and_trains_in_float32(tmp_path):
    out = run_train(
        tmp_path, *TINY, "trainer.epochs=1", "trainer.mixed_precision=true",
        "trainer.jit_compile=true",
    )
    assert "trainer.mixed_precision=true: no GPU found" in out.stdout + out.stderr
    (model_file,) = (tmp_path / "runs").rglob("fold_5/model.keras")
    with zipfile.ZipFile(model_file) as zf:
        config = zf.read("config.json").decode()
    assert "mixed_float16" not in config and '"float32"' in config
    (results,) = (tmp_path / "runs").rglob("fold_5/results.json")
    assert 0.0 <= json.loads(results.read_text())["accuracy"] <= 1.0


@pytest.mark.slow
def test_bfloat16_training_on_cpu(tmp_path):
    out = run_train(tmp_path, *TINY, "trainer.epochs=1", "trainer.mixed_precision=bfloat16")
    (model_file,) = (tmp_path / "runs").rglob("fold_5/model.keras")
    with zipfile.ZipFile(model_file) as zf:
        config = zf.read("config.json").decode()
    assert "mixed_bfloat16" in config, out.stderr[-2000:]
    (results,) = (tmp_path / "runs").rglob("fold_5/results.json")
    assert 0.0 <= json.loads(results.read_text())["accuracy"] <= 1.0


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


@pytest.mark.parametrize(
    "overrides, env, expected",
    [
        (["trainer.strategy=bogus"], {}, ["trainer.strategy='bogus'", "mirrored"]),
        (["trainer.strategy=multi_worker"], {}, ["TF_CONFIG", "not set"]),
        (["trainer.strategy=mirrored", "trainer.logical_cpus=2", "trainer.batch_size=5"], {},
         ["trainer.batch_size=5", "not divisible by the 2 replicas"]),
    ],
    ids=["unknown-strategy", "no-tf-config", "batch-not-divisible"],
)
def test_bad_distribution_config_fails_before_data_work(tmp_path, overrides, env, expected):
    out = run_train(
        tmp_path, *TINY, *overrides, env=train_env(tmp_path, **env), check=False, timeout=120
    )
    assert out.returncode == 2, out.stderr[-3000:]
    for text in expected:
        assert text in out.stderr
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
