"""Audio event classification and tagging with a hand-written transformer."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import Any

# Printed on every `import tensorflow` by the pip wheels, GPU or not, and harmless: two
# of TensorFlow's own libraries both register the CUDA plugins.
_IMPORT_NOISE = re.compile(
    r"Unable to register cu(FFT|DNN|BLAS) factory: Attempting to register factory for plugin"
)


def import_tensorflow() -> Any:
    """``import tensorflow``, quietly: its C++ info and warning lines off
    (``TF_CPP_MIN_LOG_LEVEL=2`` unless set) and the wheels' CUDA plugin registration
    errors ("Unable to register cuFFT factory ...") dropped. Anything else the import
    prints passes through. Returns the module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no file descriptor 2
        import tensorflow

        return tensorflow
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not _IMPORT_NOISE.search(line))
            if kept:
                os.write(2, kept.encode())
    return tensorflow
