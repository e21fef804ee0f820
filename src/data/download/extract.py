"""Atomic extraction: a half-extracted dataset is never taken for a complete one.

`extract_archive` unpacks into a hidden temporary folder next to the destination,
writes the ``.download_complete`` marker as the last file of the tree and only then
renames the tree to its final name; `is_complete` checks for that marker.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from src.data.download.specs import DatasetSpec, get_spec
from src.data.download.verify import (
    _corrupt,
    _relative,
    _require_files,
    _zip_listing,
    verify_archive,
)
from src.data.esc50 import DatasetError

log = logging.getLogger(__name__)

MARKER_NAME = ".download_complete"
_AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def is_complete(root: str | os.PathLike) -> bool:
    """True if ``root`` holds a finished download (its ``.download_complete`` marker)."""
    try:
        return isinstance(json.loads((Path(root) / MARKER_NAME).read_text()), dict)
    except (OSError, ValueError):
        return False


def _has_audio(root: Path) -> bool:
    for _dirpath, _dirnames, filenames in os.walk(root):
        if any(f.lower().endswith(_AUDIO_SUFFIXES) for f in filenames):
            return True
    return False


def _check_destination(root: Path, force: bool) -> None:
    """Raise unless ``root`` is absent, complete, or safe to replace."""
    if not (root.exists() or root.is_symlink()) or is_complete(root) or force:
        return
    if root.is_symlink() or not root.is_dir():
        raise DatasetError(
            f"{root} exists and is not a directory; move it away, choose another --root, or "
            "pass --force (force=True) to replace it"
        )
    if _has_audio(root):
        raise DatasetError(
            f"{root} already exists and holds audio files, but has no {MARKER_NAME} marker, so "
            "it was not produced by a finished download. If it is a complete copy of the "
            "dataset, use it as it is (point data.root at it); otherwise move it away or delete "
            "it and run the download again, or pass --force (force=True) to replace it."
        )


def _install(tree: Path, final: Path) -> None:
    """Rename ``tree`` to ``final``, replacing whatever is there (renames first, delete last)."""
    if not (final.exists() or final.is_symlink()):
        os.replace(tree, final)
        return
    if final.is_symlink() or not final.is_dir():
        final.unlink()
        os.replace(tree, final)
        return
    aside = final.with_name(f".{final.name}.stale-{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(final, aside)
    os.replace(tree, final)
    shutil.rmtree(aside, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has not started an extraction there yet
    if os.name != "posix":
        return True  # cannot probe safely: keep the folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _clean_partials(parent: Path, name: str) -> None:
    """Remove temporary folders of earlier extractions whose process is gone."""
    prefix = f".{name}.partial-"
    for leftover in parent.glob(f"{glob.escape(prefix)}*"):
        suffix = leftover.name[len(prefix) :]
        if suffix.isdigit() and _pid_alive(int(suffix)):
            continue
        log.info("Removing %s, left over from an interrupted extraction", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _write_member(src, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with src, open(target, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _extract_zip(path: Path, spec: DatasetSpec, tree: Path, progress: bool) -> None:
    with zipfile.ZipFile(path) as zf:
        files = _zip_listing(zf, spec, path)
        _require_files(len(files), spec, path)
        for rel, member in tqdm(
            files.items(), desc=f"unpack {path.name}", unit="file", disable=not progress
        ):
            _write_member(zf.open(member), tree / rel)


def _extract_tar(path: Path, spec: DatasetSpec, tree: Path, progress: bool) -> None:
    count = 0
    with (
        tarfile.open(path, "r:gz") as tf,
        tqdm(desc=f"unpack {path.name}", unit="file", disable=not progress) as bar,
    ):
        for member in tf:
            rel = _relative(member.name, spec, path)
            # Links and special files are skipped: only regular files are written.
            if rel is None or not member.isfile():
                continue
            src = tf.extractfile(member)
            if src is not None:
                _write_member(src, tree / rel)
                count += 1
                bar.update()
    _require_files(count, spec, path)


def extract_archive(
    path: str | os.PathLike,
    root_parent: str | os.PathLike,
    spec: str | DatasetSpec,
    *,
    name: str | None = None,
    url: str | None = None,
    clips: int | None = None,
    expected_clips: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Unpack the dataset in ``path`` to ``root_parent / name`` and return that folder.

    ``name`` defaults to the spec's folder (the archive's top folder). Members are written into
    ``root_parent/.<name>.partial-<pid>`` with the top folder stripped, rejecting absolute
    paths and ``..``; the marker (JSON: dataset, url, archive size, clips) is written last, then
    the tree is renamed to its final name. A final folder that is already complete is left as
    it is unless ``force``; one without marker is replaced when it holds no audio files (an
    interrupted extraction) or with ``force``, otherwise DatasetError explains what to do.
    ``clips`` is the count :func:`verify_archive` returned; without it the archive is verified
    here first (against ``expected_clips``).
    """
    spec = get_spec(spec)
    path = Path(path).absolute()
    parent = Path(root_parent).expanduser().absolute()
    final = parent / (name or spec.folder)
    if is_complete(final) and not force:
        return final
    _check_destination(final, force)
    if clips is None:
        clips = verify_archive(path, spec, expected_clips)
    parent.mkdir(parents=True, exist_ok=True)
    _clean_partials(parent, final.name)

    tmp = parent / f".{final.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tree = tmp / "tree"
    tree.mkdir(parents=True)
    try:
        if spec.archive == "zip":
            _extract_zip(path, spec, tree, progress)
        elif spec.archive == "tar.gz":
            _extract_tar(path, spec, tree, progress)
        else:
            raise DatasetError(f"Unsupported archive kind {spec.archive!r} for {spec.name}")
        marker = {
            "dataset": spec.name,
            "url": url or spec.url,
            "archive": path.name,
            "archive_size": path.stat().st_size,
            "clips": clips,
        }
        # The marker is the last file written; the rename below publishes tree and marker at
        # once, so the final folder never holds a partial extraction.
        (tree / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _install(tree, final)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError) as err:
        raise _corrupt(spec, path, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
