"""Shared fixtures. TensorFlow logs are quieted before anything imports it."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# The compiled kernels are cached under the real home; tests that give their
# subprocesses a temporary HOME (no W&B credentials) reuse that one build instead of
# compiling it again in every subprocess.
# (src.models.native.cache_dir's default, without importing Keras here.)
if "AUDIO_TRANSFORMER_NATIVE_DIR" not in os.environ:
    _cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["AUDIO_TRANSFORMER_NATIVE_DIR"] = os.path.join(_cache, "audio-transformer",
                                                              "native")

# The tests' HTTP servers listen on 127.0.0.1: their requests never go through a proxy.
for _var in ("no_proxy", "NO_PROXY"):
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var), "127.0.0.1", "localhost"]))
