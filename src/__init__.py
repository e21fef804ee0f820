"""Audio event classification and tagging with a hand-written transformer."""

from __future__ import annotations

import os
import re
import sys
import threading
from typing import Any

# Printed on every `import tensorflow` by the pip wheels, GPU or not, and harmless: two
# of TensorFlow's own libraries both register the CUDA plugins.
_IMPORT_NOISE = re.compile(
    rb"Unable to register cu(FFT|DNN|BLAS) factory: Attempting to register factory for plugin"
)
_IMPORT_LOCK = threading.Lock()


def _forward(read_fd: int, write_fd: int) -> None:
    """Copy lines from ``read_fd`` to ``write_fd`` as they come, but the noise lines."""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not _IMPORT_NOISE.search(line))
            if kept:
                os.write(write_fd, kept)
        if pending and not _IMPORT_NOISE.search(pending):
            os.write(write_fd, pending)


def import_tensorflow() -> Any:
    """``import tensorflow``, quietly: its C++ info and warning lines off
    (``TF_CPP_MIN_LOG_LEVEL=2`` unless set) and the wheels' CUDA plugin registration
    errors ("Unable to register cuFFT factory ...") dropped. Anything else the import
    writes to stderr passes through as it is written (a fatal error during the import
    included). Returns the module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _IMPORT_LOCK:
        if "tensorflow" in sys.modules:
            return sys.modules["tensorflow"]
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (AttributeError, OSError, ValueError):  # no file descriptor 2
            import tensorflow

            return tensorflow
        try:
            read_fd, write_fd = os.pipe()
        except OSError:
            os.close(saved)
            import tensorflow

            return tensorflow
        forward = threading.Thread(target=_forward, args=(read_fd, saved), daemon=True)
        forward.start()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        try:
            import tensorflow
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)  # closes the pipe's last write end: the thread ends
                forward.join(timeout=10)
                os.close(saved)
        return tensorflow
