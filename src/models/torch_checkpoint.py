"""Read PyTorch ``state_dict`` files (``pytorch_model.bin``) into numpy, without PyTorch.

Older Hugging Face checkpoints only ship ``pytorch_model.bin``: a zip archive
(``torch.save``'s format since PyTorch 1.6) holding ``data.pkl`` (the pickled
dict) and one file per tensor storage (``data/<key>``). This module unpickles
``data.pkl`` with an allow-list: only tensors (``torch._utils._rebuild_tensor_v2``
/ ``_rebuild_parameter``), storages of known dtypes and ``OrderedDict`` are
accepted, so unlike ``torch.load`` a crafted file cannot run code. Each tensor
becomes a numpy array (bfloat16 as float32), views (offset, strides) included.
The legacy pre-1.6 (non-zip) format is refused with a message.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

import numpy as np

# torch.<Name>Storage -> numpy dtype ("bfloat16" is converted by hand).
_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchCheckpointError(ValueError):
    """A file that is not a readable ``torch.save`` state dict."""


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """``torch._utils._rebuild_tensor_v2``: a view into a storage, copied out."""
    if len(size) == 0:
        return np.array(storage[offset])
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, *unused):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(fh)
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise TorchCheckpointError(
            f"{self._path}: refusing to load {module}.{name} (only tensors and dicts of "
            "tensors are read; convert the file to model.safetensors with transformers)."
        )

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise TorchCheckpointError(f"{self._path}: unknown storage reference {pid!r}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            if storage_type.dtype == "bfloat16":
                bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                array = bits.view(np.float32)
            else:
                array = np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder("<"))
            self._storages[key] = array
        return self._storages[key]


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: array}`` from a ``torch.save``d state dict (zip format)."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise TorchCheckpointError(
            f"{path}: not a zip-format torch checkpoint (PyTorch < 1.6 wrote another format); "
            "re-save it with a recent PyTorch or convert it to model.safetensors."
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise TorchCheckpointError(f"{path}: expected one data.pkl, found {len(pickles)}.")
        prefix = pickles[0][: -len("/data.pkl")]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise TorchCheckpointError(f"{path}: big-endian checkpoints are not supported.")
        with archive.open(pickles[0]) as fh:
            try:
                state = _Unpickler(fh, archive, prefix, path).load()
            except TorchCheckpointError:
                raise
            except Exception as err:
                raise TorchCheckpointError(f"{path}: cannot read it ({err}).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise TorchCheckpointError(f"{path}: not a state dict of tensors.")
    return dict(state)
