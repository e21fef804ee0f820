"""Dataset registry: ``data.format`` -> an index of (path, label, fold) records."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from src.data.esc50 import DatasetError, DatasetIndex, read_esc50

log = logging.getLogger(__name__)

# data.format -> the name of its archive in src.data.download.DATASETS
DOWNLOADABLE = {"esc50": "esc50", "speech_commands": "speech_commands",
                "urbansound8k": "urbansound8k"}
# Formats whose data cannot be fetched by scripts.download, with what to do instead.
NOT_DOWNLOADABLE = {
    "audioset": "AudioSet audio is not distributed; point data.root at your copy",
    "fsd50k": "download FSD50K from https://zenodo.org/record/4060432 and set data.root",
    "folder": "point data.root at your folder of audio files",
}


def _folds_used(data_cfg: DictConfig) -> set[int]:
    used = set()
    for key in ("folds", "train_folds", "val_folds"):
        value = data_cfg.get(key)
        if value is not None:
            used.update(int(f) for f in ([value] if isinstance(value, int) else value))
    return used


def _load_audioset(data_cfg: DictConfig, root: Path) -> DatasetIndex:
    from src.data.audioset import DEFAULT_SPLITS, FOLD_NAMES, check_splits, read_audioset

    splits = data_cfg.get("splits", DEFAULT_SPLITS)
    read = check_splits(splits)
    unread = sorted(f for f in _folds_used(data_cfg) if FOLD_NAMES.get(f) not in read)
    if unread:
        raise DatasetError(
            f"data.folds/train_folds/val_folds use fold(s) {unread} "
            f"({', '.join(FOLD_NAMES.get(f, 'no such split') for f in unread)}), but "
            f"data.splits={read} does not read them; AudioSet folds are "
            f"{FOLD_NAMES}: add the split to data.splits or change the folds"
        )
    pattern = data_cfg.get("file_pattern")
    if isinstance(pattern, DictConfig):
        pattern = {str(k): str(v) for k, v in pattern.items()}
    return read_audioset(
        root,
        splits=read,
        csv_dir=data_cfg.get("csv_dir"),
        file_pattern=pattern,
        max_missing_fraction=data_cfg.get("max_missing_fraction"),
    )


def load_index(data_cfg: DictConfig) -> DatasetIndex:
    fmt = data_cfg.format
    root = Path(str(data_cfg.root)).expanduser()
    if fmt in DOWNLOADABLE and data_cfg.get("download", False):
        from src.data.download import (
            DownloadError,
            ensure_dataset_downloaded,
            is_complete,
            offline_hint,
        )

        if not is_complete(root) and not root.exists():
            try:
                ensure_dataset_downloaded(
                    DOWNLOADABLE[fmt], root, url=data_cfg.get("download_url")
                )
            except DownloadError as err:
                if err.local:
                    raise
                hint = offline_hint(DOWNLOADABLE[fmt], root, url_option="data.download_url=")
                raise DownloadError(f"{err} {hint}") from None
    if fmt in NOT_DOWNLOADABLE and data_cfg.get("download", False):
        raise DatasetError(
            f"data.download=true, but data.format={fmt} has no archive to download: "
            f"{NOT_DOWNLOADABLE[fmt]} and set data.download=false"
        )
    if fmt == "synthetic":
        from src.data.synthetic import ensure_dataset

        gen = dict(data_cfg.get("generate") or {})
        ensure_dataset(root, **gen)
        return read_esc50(root)
    if fmt == "esc50":
        return read_esc50(root, csv_path=data_cfg.get("csv_path"),
                          audio_dir=data_cfg.get("audio_dir"),
                          esc10_only=bool(data_cfg.get("esc10", False)))
    if fmt == "speech_commands":
        from src.data.speech_commands import read_speech_commands

        background = bool(data_cfg.get("include_background", False))
        if background and not data_cfg.get("variable_length", False):
            log.warning(
                "data.include_background=true: each _background_noise_ recording (about a "
                "minute) gives its first data.clip_seconds only; set "
                "data.variable_length=true to train on a random crop of it every epoch.")
        return read_speech_commands(root, include_background=background)
    if fmt == "urbansound8k":
        from src.data.urbansound8k import read_urbansound8k

        return read_urbansound8k(root)
    if fmt == "audioset":
        return _load_audioset(data_cfg, root)
    if fmt == "fsd50k":
        from src.data.fsd50k import read_fsd50k

        return read_fsd50k(
            root,
            ground_truth_dir=data_cfg.get("ground_truth_dir"),
            dev_audio_dir=data_cfg.get("dev_audio_dir"),
            eval_audio_dir=data_cfg.get("eval_audio_dir"),
            max_missing_fraction=float(data_cfg.get("max_missing_fraction") or 0.0),
        )
    if fmt == "folder":
        from src.data.folder import read_folder

        extensions = data_cfg.get("extensions")
        return read_folder(
            root,
            extensions=extensions if extensions is None or isinstance(extensions, str)
            else [str(e) for e in extensions],
            labels_from_subdirs=bool(data_cfg.get("labels_from_subdirs", False)),
            num_folds=int(data_cfg.get("num_folds") or 1),
            source_pattern=data_cfg.get("source_pattern"),
        )
    if fmt == "synthetic_tagging":
        from src.data.audioset import read_audioset
        from src.data.synthetic_tagging import (
            CSV_DIR,
            FILE_PATTERN,
            SPLIT_NAMES,
            ensure_tagging_dataset,
        )

        gen = dict(data_cfg.get("generate") or {})
        ensure_tagging_dataset(root, **gen)
        return read_audioset(
            root, splits=SPLIT_NAMES, csv_dir=CSV_DIR, file_pattern=FILE_PATTERN,
            max_missing_fraction=0.0, dataset="synthetic tagging set",
        )
    raise ValueError(f"unknown data.format={fmt!r}")
