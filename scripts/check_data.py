"""Check every audio file of the configured dataset before training.

    python -m scripts.check_data data=esc50 [data.root=...] [--workers 8] [--no-cache]

Arguments other than the options below are Hydra overrides of the training config
(``conf/train.yaml``), so the dataset, sample rate and clip length are exactly those a
training run with the same overrides would use. Nothing is written except the check cache
under ``paths.cache_dir`` (disable it with ``--no-cache``).

Prints the report; exit status 0 when every file can be decoded, 1 when some cannot,
2 when the dataset or the config cannot be loaded at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.check_data",
        description="Check the audio files of a dataset before training.",
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. data=esc50 data.root=/data/ESC-50"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 2),
        help="files checked in parallel (default: CPU cores, at most 8)",
    )
    parser.add_argument("--no-cache", action="store_true", help="re-check every file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--max-files", type=int, default=20, help="files listed per kind of problem"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)

    from src.config import unknown_override_keys

    unknown = unknown_override_keys(args.overrides, "train")
    if unknown:
        print(f"error: {unknown}", file=sys.stderr)
        return 2

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from src.data.datasets import load_index
    from src.data.esc50 import DatasetError

    try:
        with initialize_config_dir(
            config_dir=str(CONF), version_base="1.3", job_name="check_data"
        ):
            cfg = compose(config_name="train", overrides=list(args.overrides))
        data = cfg.data
        sample_rate = int(data.sample_rate)
        clip_samples = int(round(float(data.clip_seconds) * sample_rate))
        variable_length = bool(data.get("variable_length", False))
        cache_dir = None if args.no_cache else Path(str(cfg.paths.cache_dir))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        print(f"error: invalid config: {err}", file=sys.stderr)
        return 2
    if sample_rate <= 0 or clip_samples <= 0:
        print(
            f"error: data.sample_rate={data.sample_rate} and data.clip_seconds="
            f"{data.clip_seconds} must be positive",
            file=sys.stderr,
        )
        return 2

    try:
        index = load_index(data)
    except (DatasetError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from src import import_tensorflow

    import_tensorflow()
    from src.data.check import check_records

    # As the feature store reads the files (src/data/store.py): cropped / padded to the
    # clip length, or, for data.variable_length, whole, with one analysis window of the
    # frontend as the shortest usable clip.
    min_samples = 0
    if variable_length:
        from src.models.build import build_frontend

        try:
            min_samples = int(getattr(build_frontend(cfg.frontend), "win_samples", 0) or 0)
        except (ValueError, TypeError) as err:
            print(f"error: invalid frontend config: {err}", file=sys.stderr)
            return 2
        how = (f"each file at its own length (data.variable_length; at least "
               f"{min_samples} samples)")
    else:
        how = f"{clip_samples} samples per clip"
    print(
        f"dataset {data.get('name', data.format)} ({data.format}) at {index.root}: "
        f"{len(index.records)} records, {index.num_classes} classes; checking at "
        f"{sample_rate} Hz, {how}",
        flush=True,
    )
    report = check_records(
        index.records,
        sample_rate=sample_rate,
        clip_samples=None if variable_length else clip_samples,
        min_samples=min_samples,
        cache_dir=cache_dir,
        progress=not args.no_progress,
        workers=args.workers,
    )
    sources = {r.path: r.source for r in index.records if r.source}
    if sources:  # AudioSet / FSD50K: each file with its csv row, as training names it
        import dataclasses

        report = dataclasses.replace(report, problems=[
            dataclasses.replace(p, message=f"{p.message} ({sources[p.path]})")
            if p.path in sources else p for p in report.problems])
    print(report.summary(max_files=args.max_files))
    return 1 if report.fatal() else 0


if __name__ == "__main__":
    sys.exit(main())
