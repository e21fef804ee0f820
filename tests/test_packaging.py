"""The pinned environment is consistent and tensorflow-io's compiled kernels load."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_pip_check_passes():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_installed_versions_match_constraints():
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    for name in ("tensorflow", "tensorflow-io", "keras", "protobuf", "wandb", "numpy"):
        assert importlib.metadata.version(name) == pins[name], name


def test_tfio_compiled_resample_kernel_loads():
    # tfio.audio.resample runs a compiled kernel (IO>AudioResample); with a
    # TensorFlow it was not built against this fails with undefined symbols.
    import tensorflow as tf
    import tensorflow_io as tfio

    t = np.arange(44100) / 44100.0
    x = tf.constant(np.sin(2 * np.pi * 1000 * t).astype("float32")[:, None])
    y = tfio.audio.resample(x, rate_in=44100, rate_out=16000).numpy()[:, 0]
    assert abs(len(y) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * 16000 / len(y) - 1000) < 5


def test_src_is_importable_as_a_package():
    out = subprocess.run(
        [sys.executable, "-c", "import src.models.attention, src.train; print('ok')"],
        capture_output=True, text=True, cwd="/",
    )
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_kernels_sources_are_package_data():
    """An installed (non-editable) copy builds the CPU kernels from its package data:
    every source and header under src/models/native must match a package-data pattern."""
    import fnmatch

    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["src.models"]
    native = ROOT / "src" / "models" / "native"
    files = [p.relative_to(native.parent).as_posix() for p in native.iterdir() if p.is_file()]
    assert any(f.endswith(".cc") for f in files) and any(f.endswith(".h") for f in files)
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missing, f"add to [tool.setuptools.package-data] in pyproject.toml: {missing}"


def test_tensorflow_is_imported_without_the_plugin_registration_noise(tmp_path):
    """`src.import_tensorflow` drops the wheels' "Unable to register cuFFT factory" lines
    and lets anything else the import prints through (a stand-in package prints both)."""
    import os

    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os, sys\n"
        "os.write(2, b'E cuda_fft.cc:485] Unable to register cuFFT factory: Attempting to "
        "register factory for plugin cuFFT when one has already been registered\\n')\n"
        "os.write(2, b'W something worth reading\\n')\n"
        "print('a Python warning', file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    out = subprocess.run(
        [sys.executable, "-c", "import os; from src import import_tensorflow; "
         "tf = import_tensorflow(); print(tf.__file__, os.environ['TF_CPP_MIN_LOG_LEVEL'])"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(fake / "__init__.py"), "2"]
    assert "Unable to register" not in out.stderr
    assert out.stderr.splitlines() == ["W something worth reading", "a Python warning"]
