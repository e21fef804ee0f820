"""Download, verify and unpack a public dataset.

    python -m scripts.download {esc50,speech_commands,urbansound8k} [--root DIR] [--url URL]
                               [--keep-archive] [--expected-clips N] [--force]

The default ``--root`` is ``$AUDIO_DATA_DIR/<folder>`` (``AUDIO_DATA_DIR`` defaults to
``data``, as in ``conf/paths/default.yaml``), e.g. ``data/ESC-50-master``, which is where
``experiment=esc50`` looks. An interrupted download resumes when the command is run again.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import shlex
import sys
import urllib.error
from pathlib import Path

from src.data.download import DATASETS, DownloadError, ensure_dataset_downloaded, offline_hint
from src.data.esc50 import DatasetError

# Training experiment that reads each dataset, with the config's default root folder.
_EXPERIMENTS = {"esc50": "esc50"}


def data_dir() -> Path:
    """The data directory of the Hydra config: ``${oc.env:AUDIO_DATA_DIR,data}``."""
    return Path(os.environ.get("AUDIO_DATA_DIR") or "data")


def train_hint(dataset: str, root: Path) -> str:
    experiment = _EXPERIMENTS.get(dataset)
    if experiment is None:
        return f"No training experiment reads {dataset} yet; the data is at {root}"
    command = f"python -m src.train experiment={experiment}"
    default_root = (data_dir() / DATASETS[dataset].folder).absolute()
    if root.absolute() != default_root:
        command += " " + shlex.quote(f"data.root={root}")
    return f"Train with: {command}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.download", description=__doc__.split("\n")[0]
    )
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument(
        "--root",
        default=None,
        help="final dataset folder (default: $AUDIO_DATA_DIR/<folder>, e.g. data/ESC-50-master)",
    )
    parser.add_argument("--url", default=None, help="download from this URL instead (a mirror)")
    parser.add_argument(
        "--keep-archive", action="store_true", help="keep the archive after unpacking it"
    )
    parser.add_argument(
        "--expected-clips",
        type=int,
        default=None,
        help="number of clips the archive must hold (default: the official release's)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing folder at --root that was not produced by this command",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = DATASETS[args.dataset]
    root = Path(args.root) if args.root else data_dir() / spec.folder
    root = root.expanduser().absolute()
    try:
        root = ensure_dataset_downloaded(
            args.dataset,
            root,
            url=args.url,
            expected_clips=args.expected_clips,
            keep_archive=args.keep_archive,
            progress=not args.no_progress,
            force=args.force,
        )
    except DownloadError as err:
        hint = "" if err.local else " " + offline_hint(args.dataset, root, url_option="--url ")
        print(f"error: {err}{hint}", file=sys.stderr, flush=True)
        return 2
    except (DatasetError, urllib.error.URLError, http.client.HTTPException, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted; run the same command again to resume the download",
            file=sys.stderr,
            flush=True,
        )
        return 130
    print(f"{args.dataset} is ready at {root}", flush=True)
    print(train_hint(args.dataset, root), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
