"""Dataset registry: ``data.format`` -> an index of (path, label, fold) records."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from src.data.esc50 import DatasetIndex, read_esc50

# data.format -> the name of its archive in src.data.download.DATASETS
DOWNLOADABLE = {"esc50": "esc50", "speech_commands": "speech_commands",
                "urbansound8k": "urbansound8k"}


def load_index(data_cfg: DictConfig) -> DatasetIndex:
    fmt = data_cfg.format
    root = Path(str(data_cfg.root)).expanduser()
    if fmt in DOWNLOADABLE and data_cfg.get("download", False):
        from src.data.download import ensure_dataset_downloaded, is_complete

        if not is_complete(root) and not root.exists():
            ensure_dataset_downloaded(DOWNLOADABLE[fmt], root, url=data_cfg.get("download_url"))
    if fmt == "synthetic":
        from src.data.synthetic import ensure_dataset

        gen = dict(data_cfg.get("generate") or {})
        ensure_dataset(root, **gen)
        return read_esc50(root)
    if fmt == "esc50":
        return read_esc50(root, esc10_only=bool(data_cfg.get("esc10", False)))
    if fmt == "speech_commands":
        from src.data.speech_commands import read_speech_commands

        return read_speech_commands(
            root, include_background=bool(data_cfg.get("include_background", False))
        )
    if fmt == "urbansound8k":
        from src.data.urbansound8k import read_urbansound8k

        return read_urbansound8k(root)
    raise ValueError(f"unknown data.format={fmt!r}")
