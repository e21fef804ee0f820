"""Download, verify and unpack the public datasets the project trains on.

Three steps, each safe to interrupt and re-run:

1. :func:`download_file` (``fetch``) fetches the archive into ``<archive>.part`` and renames
   it to its final name only once every byte is there. An interrupted transfer (dropped
   connection, timeout, a response shorter than its Content-Length) is resumed with an HTTP
   ``Range`` request, both within one call (``retries``) and across calls (the ``.part`` file
   stays).
2. :func:`verify_archive` (``verify``) checks the archive before anything is unpacked:
   integrity (zip CRCs, a gzip stream read to its end), then the dataset's layout
   (``specs``): the expected number of clips and the metadata files.
3. :func:`extract_archive` (``extract``) unpacks into a hidden temporary folder next to the
   destination, writes the ``.download_complete`` marker as the last file of the tree and only
   then renames the tree to its final name, so a half-extracted dataset is never taken for a
   complete one.

:func:`ensure_dataset_downloaded` chains the three and does nothing for a tree that already
carries the marker. ``python -m scripts.download`` is the command-line front end.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from src.data.download.extract import MARKER_NAME, _check_destination, extract_archive, is_complete
from src.data.download.fetch import DownloadError, download_file
from src.data.download.specs import DATASETS, ArchiveContents, DatasetSpec, get_spec
from src.data.download.verify import CorruptArchiveError, verify_archive

__all__ = [
    "DATASETS",
    "MARKER_NAME",
    "ArchiveContents",
    "CorruptArchiveError",
    "DatasetSpec",
    "DownloadError",
    "download_file",
    "ensure_dataset_downloaded",
    "extract_archive",
    "get_spec",
    "is_complete",
    "offline_hint",
    "verify_archive",
]

log = logging.getLogger(__name__)


def offline_hint(name: str, root: str | os.PathLike, *, url_option: str) -> str:
    """The ways to a dataset when its archive cannot be downloaded here.

    ``root`` is the dataset folder the download was meant to create; ``url_option`` is how
    the caller sets a mirror (``data.download_url=`` in the training config, ``--url `` for
    ``scripts.download``).
    """
    spec = get_spec(name)
    root = Path(root).expanduser().absolute()
    return (
        f"Without network access here: download {spec.url} elsewhere, then either copy the "
        f"archive to {root.parent / spec.filename} and run the same command again (it is "
        f"verified and unpacked from there), or unpack it yourself and point data.root= at "
        f"the unpacked {spec.folder} folder; or download from a mirror of the archive with "
        f"{url_option}<URL>."
    )


def ensure_dataset_downloaded(
    name: str,
    root: str | os.PathLike,
    *,
    url: str | None = None,
    expected_clips: int | None = None,
    keep_archive: bool = False,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Make ``root`` (the final dataset folder, e.g. ``data/ESC-50-master``) a complete copy.

    Returns at once when ``root`` carries the download marker. Otherwise downloads the archive
    to ``root.parent / spec.filename`` (resuming a ``.part`` file; an existing archive is reused
    if it verifies), verifies it, unpacks it atomically and deletes it unless
    ``keep_archive``. ``url`` replaces the official URL (mirrors, tests).
    """
    spec = get_spec(name)
    root = Path(root).expanduser().absolute()
    if is_complete(root) and not force:
        return root
    _check_destination(root, force)  # before spending time on a download
    source = url or spec.url
    archive = root.parent / spec.filename

    clips = None
    if archive.is_file():
        try:
            clips = verify_archive(archive, spec, expected_clips)
            log.info("Using the archive already downloaded at %s", archive)
        except CorruptArchiveError as err:
            # Damaged bytes: fetch a fresh copy. Other findings (clip count, metadata) are
            # raised as they are; their message says to delete the archive.
            log.warning("%s\nDownloading it again.", err)
            archive.unlink()
    if clips is None:
        log.info("Downloading %s to %s", source, archive)
        download_file(source, archive, progress=progress)
        clips = verify_archive(archive, spec, expected_clips)

    extract_archive(
        archive,
        root.parent,
        spec,
        name=root.name,
        url=source,
        clips=clips,
        force=force,
        progress=progress,
    )
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return root
