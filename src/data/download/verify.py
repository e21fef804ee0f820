"""Archive checks before anything is unpacked: integrity, then the dataset's layout.

zip: every member's CRC; tar.gz: the whole gzip stream read to its end. Then the
spec's own checks (clip count, metadata files) on the archive's listing. Member
paths are made relative to the dataset folder, rejecting absolute paths and ``..``.
"""

from __future__ import annotations

import gzip
import os
import re
import tarfile
import zipfile
import zlib
from pathlib import Path

from src.data.download.specs import ArchiveContents, DatasetSpec, get_spec
from src.data.esc50 import DatasetError

# Text members (metadata csv, split lists) read during verification of a tar archive.
_TEXT_SUFFIXES = (".csv", ".txt")
_MAX_TEXT_BYTES = 64 << 20


class CorruptArchiveError(DatasetError):
    """The archive's bytes are damaged (bad CRC, truncated stream): download it again."""


def _relative(name: str, spec: DatasetSpec, archive: Path) -> str | None:
    """Member path relative to the dataset folder; None for members outside it.

    Raises DatasetError for absolute paths and ``..`` components (path traversal).
    """
    raw = name.replace("\\", "/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise DatasetError(
            f"The archive {archive} has a member with an absolute path ({name!r}); refusing "
            "to unpack it. Delete it and download again from the official URL."
        )
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DatasetError(
            f"The archive {archive} has a member that points outside its folder ({name!r}); "
            "refusing to unpack it. Delete it and download again from the official URL."
        )
    if spec.top_dir is not None:
        if not parts or parts[0] != spec.top_dir:
            return None
        parts = parts[1:]
    return "/".join(parts) or None


def _zip_listing(zf: zipfile.ZipFile, spec: DatasetSpec, path: Path) -> dict[str, str]:
    """Dataset-relative path -> zip member name, for regular files."""
    files: dict[str, str] = {}
    for info in zf.infolist():
        rel = _relative(info.filename, spec, path)
        if rel is not None and not info.is_dir():
            files[rel] = info.filename
    return files


def _require_files(count: int, spec: DatasetSpec, path: Path) -> None:
    if not count:
        where = f"under a top folder {spec.top_dir}/" if spec.top_dir else ""
        raise DatasetError(
            f"The {spec.name} archive {path} contains no files {where}; it is not the "
            f"{spec.name} release or it is damaged. Delete it and download again."
        )


def _corrupt(spec: DatasetSpec, path: Path, err: BaseException) -> DatasetError:
    return CorruptArchiveError(
        f"The {spec.name} archive {path} is corrupt or truncated ({type(err).__name__}: "
        f"{err}); delete it and download again."
    )


def _verify_zip(path: Path, spec: DatasetSpec, expected: int) -> int:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise CorruptArchiveError(
                    f"The {spec.name} archive {path} is corrupt: member {bad!r} fails its CRC "
                    "check; delete it and download again."
                )
            files = _zip_listing(zf, spec, path)
            _require_files(len(files), spec, path)
            contents = ArchiveContents(
                path, spec.name, list(files), lambda rel: zf.read(files[rel])
            )
            return spec.verify(contents, expected)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise _corrupt(spec, path, err) from None


def _verify_tar(path: Path, spec: DatasetSpec, expected: int) -> int:
    files: list[str] = []
    texts: dict[str, bytes] = {}
    try:
        # One pass over the gzip stream: headers, the small text members, then the rest of the
        # stream so gzip checks its CRC and length trailer.
        with tarfile.open(path, "r:gz") as tf:
            for member in tf:
                rel = _relative(member.name, spec, path)
                if rel is None or not member.isfile():
                    continue
                files.append(rel)
                if rel.lower().endswith(_TEXT_SUFFIXES) and member.size <= _MAX_TEXT_BYTES:
                    fh = tf.extractfile(member)
                    if fh is not None:
                        texts[rel] = fh.read()
            while tf.fileobj.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise _corrupt(spec, path, err) from None
    _require_files(len(files), spec, path)
    return spec.verify(ArchiveContents(path, spec.name, files, texts.get), expected)


def verify_archive(
    path: str | os.PathLike, spec: str | DatasetSpec, expected_clips: int | None = None
) -> int:
    """Check a downloaded archive and return the number of clips it holds.

    zip: every member's CRC (``testzip``); tar.gz: the whole gzip stream. Then the dataset's
    own checks: clip count (``expected_clips``, default the spec's count) and metadata files.
    Raises DatasetError saying what is wrong, with the archive path.
    """
    spec = get_spec(spec)
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"The {spec.name} archive {path} does not exist")
    expected = spec.clips if expected_clips is None else int(expected_clips)
    if spec.archive == "zip":
        return _verify_zip(path, spec, expected)
    if spec.archive == "tar.gz":
        return _verify_tar(path, spec, expected)
    raise DatasetError(f"Unsupported archive kind {spec.archive!r} for {spec.name}")
