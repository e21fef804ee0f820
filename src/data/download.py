"""Download, verify and unpack the public datasets the project trains on.

Three steps, each safe to interrupt and re-run:

1. :func:`download_file` fetches the archive into ``<archive>.part`` and renames it to its
   final name only once every byte is there. An interrupted transfer (dropped connection,
   timeout, a response shorter than its Content-Length) is resumed with an HTTP ``Range``
   request, both within one call (``retries``) and across calls (the ``.part`` file stays).
2. :func:`verify_archive` checks the archive before anything is unpacked: integrity (zip
   CRCs, a gzip stream read to its end), the expected number of clips and the metadata files.
3. :func:`extract_archive` unpacks into a hidden temporary folder next to the destination,
   writes the ``.download_complete`` marker as the last file of the tree and only then renames
   the tree to its final name, so a half-extracted dataset is never taken for a complete one.

:func:`ensure_dataset_downloaded` chains the three and does nothing for a tree that already
carries the marker. ``python -m scripts.download`` is the command-line front end.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import http.client
import io
import json
import logging
import os
import re
import shutil
import ssl
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from src.data.esc50 import REQUIRED_COLUMNS, DatasetError

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
    "verify_archive",
]

log = logging.getLogger(__name__)

MARKER_NAME = ".download_complete"
USER_AGENT = "audio-transformer-dataset-download/1.0"
_AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
# Text members (metadata csv, split lists) read during verification of a tar archive.
_TEXT_SUFFIXES = (".csv", ".txt")
_MAX_TEXT_BYTES = 64 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)


class DownloadError(DatasetError):
    """A download failed; the message names the URL and any partial file kept for resuming."""


class CorruptArchiveError(DatasetError):
    """The archive's bytes are damaged (bad CRC, truncated stream): download it again."""


# ------------------------------------------------------------------------- dataset specs


class ArchiveContents:
    """What a dataset's verify function sees of an archive.

    ``files`` are the regular files of the dataset, as POSIX paths relative to the dataset
    folder (the archive's top folder stripped when the dataset has one). ``read`` returns the
    bytes of a metadata member.
    """

    def __init__(
        self,
        path: Path,
        dataset: str,
        files: Sequence[str],
        reader: Callable[[str], bytes | None],
    ) -> None:
        self.path = path
        self.dataset = dataset
        self.files = tuple(files)
        self._set = frozenset(self.files)
        self._reader = reader

    def __contains__(self, rel: str) -> bool:
        return rel in self._set

    def read(self, rel: str) -> bytes:
        data = self._reader(rel) if rel in self else None
        if data is None:
            raise self.error(f"it has no {rel}")
        return data

    def error(self, what: str) -> DatasetError:
        return DatasetError(
            f"The {self.dataset} archive {self.path} is not usable: {what}. The file is "
            "damaged, incomplete or not the expected release; delete it and download again."
        )


VerifyFn = Callable[[ArchiveContents, int], int]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One downloadable dataset.

    ``top_dir`` is the single folder at the archive root that holds the dataset (``None`` when
    the files sit directly at the archive root; they are then unpacked into a folder named
    after the archive). ``verify`` checks an archive's listing against ``clips`` (or an
    override) and returns the number of clips found.
    """

    name: str
    url: str
    filename: str  # local name of the downloaded archive
    archive: str  # "zip" or "tar.gz"
    top_dir: str | None
    clips: int
    verify: VerifyFn = dataclasses.field(repr=False, compare=False)

    @property
    def folder(self) -> str:
        """Default name of the extracted dataset folder."""
        if self.top_dir is not None:
            return self.top_dir
        for suffix in (".tar.gz", ".tgz", ".zip"):
            if self.filename.endswith(suffix):
                return self.filename[: -len(suffix)]
        return self.filename


def _is_audio(rel: str) -> bool:
    name = PurePosixPath(rel).name
    return name.lower().endswith(".wav") and not name.startswith("._")


def _csv_rows(contents: ArchiveContents, rel: str, required: Iterable[str]) -> list[dict]:
    try:
        text = contents.read(rel).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise contents.error(f"{rel} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = header
    for column in required:
        if column not in header:
            raise contents.error(
                f"{rel} is missing the required column {column!r} (found columns: {header})"
            )
    return [row for row in reader if any((v or "").strip() for v in row.values() if v)]


def _check_count(contents: ArchiveContents, found: int, expected: int, where: str) -> None:
    if found != expected:
        raise contents.error(
            f"expected {expected} clips under {where}, found {found} "
            "(for a custom or partial release pass expected_clips / --expected-clips)"
        )


def _check_listed(contents: ArchiveContents, paths: Iterable[str], source: str) -> None:
    missing = sorted({p for p in paths if p not in contents})
    if missing:
        raise contents.error(
            f"{source} lists {len(missing)} clip(s) that are not in the archive "
            f"(first: {', '.join(missing[:3])})"
        )


def _verify_esc50(contents: ArchiveContents, expected: int) -> int:
    clips = [
        f for f in contents.files if f.startswith("audio/") and f.count("/") == 1 and _is_audio(f)
    ]
    _check_count(contents, len(clips), expected, "audio/")
    rows = _csv_rows(contents, "meta/esc50.csv", REQUIRED_COLUMNS)
    listed = (f"audio/{(row.get('filename') or '').strip()}" for row in rows)
    _check_listed(contents, listed, "meta/esc50.csv")
    return len(clips)


_URBANSOUND_COLUMNS = ("slice_file_name", "fold", "classID", "class")


def _verify_urbansound8k(contents: ArchiveContents, expected: int) -> int:
    clips = [
        f
        for f in contents.files
        if f.startswith("audio/fold") and f.count("/") == 2 and _is_audio(f)
    ]
    _check_count(contents, len(clips), expected, "audio/fold*/")
    rows = _csv_rows(contents, "metadata/UrbanSound8K.csv", _URBANSOUND_COLUMNS)
    listed = (
        f"audio/fold{(row.get('fold') or '').strip()}/{(row.get('slice_file_name') or '').strip()}"
        for row in rows
    )
    _check_listed(contents, listed, "metadata/UrbanSound8K.csv")
    return len(clips)


def _verify_speech_commands(contents: ArchiveContents, expected: int) -> int:
    for rel in ("validation_list.txt", "testing_list.txt"):
        if rel not in contents:
            raise contents.error(f"it has no {rel} at the archive root")
    clips = [f for f in contents.files if _is_audio(f) and not f.startswith("_background_noise_/")]
    if len(clips) < expected:
        raise contents.error(
            f"expected at least {expected} clips (*.wav outside _background_noise_/), found "
            f"{len(clips)} (for a custom or partial release pass expected_clips / "
            "--expected-clips)"
        )
    return len(clips)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # ESC-50 (Piczak 2015): 2000 five-second clips, 50 classes, 5 folds.
        DatasetSpec(
            name="esc50",
            url="https://github.com/karolpiczak/ESC-50/archive/master.zip",
            filename="ESC-50-master.zip",
            archive="zip",
            top_dir="ESC-50-master",
            clips=2000,
            verify=_verify_esc50,
        ),
        # Speech Commands v0.02 (Warden 2018): ~105k one-second utterances, 35 words.
        DatasetSpec(
            name="speech_commands",
            url="http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
            filename="speech_commands_v0.02.tar.gz",
            archive="tar.gz",
            top_dir=None,
            clips=100000,  # a minimum: the release has 105,829
            verify=_verify_speech_commands,
        ),
        # UrbanSound8K (Salamon et al. 2014): 8732 clips of up to 4 s, 10 classes, 10 folds.
        DatasetSpec(
            name="urbansound8k",
            url="https://zenodo.org/record/1203745/files/UrbanSound8K.tar.gz",
            filename="UrbanSound8K.tar.gz",
            archive="tar.gz",
            top_dir="UrbanSound8K",
            clips=8732,
            verify=_verify_urbansound8k,
        ),
    )
}


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    if isinstance(name, DatasetSpec):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(
            f"Unknown dataset {name!r}; downloadable datasets: {', '.join(sorted(DATASETS))}"
        ) from None


# ------------------------------------------------------------------------------ download


class _Interrupted(Exception):
    """The transfer stopped early; resuming from the current ``.part`` size may finish it."""


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _header_int(headers, name: str) -> int | None:
    value = headers.get(name) if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _fetch(
    url: str,
    dest: Path,
    part: Path,
    *,
    chunk_size: int,
    timeout: float,
    progress: bool,
    headers: dict | None = None,
) -> None:
    """One request; appends to (or restarts) ``part``. Raises _Interrupted if cut short."""
    offset = _size(part)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        headers, code, reason = err.headers, err.code, err.reason
        err.close()
        if code == 416 and offset:
            # Nothing left to send: the .part file may already hold the whole archive.
            match = _UNSATISFIED_RANGE.search((headers or {}).get("Content-Range", "") or "")
            total = int(match.group(1)) if match else None
            if total is None or total == offset:
                return
            log.info("%s: %d bytes on disk but the server has %d; restarting", part, offset, total)
            part.unlink()
            return _fetch(
                url, dest, part, chunk_size=chunk_size, timeout=timeout, progress=progress,
                headers=headers,
            )
        if code >= 500 or code in (408, 429):
            raise _Interrupted(f"HTTP {code} {reason}") from err
        hint = "; check the URL" if code in (401, 403, 404, 410) else ""
        raise DownloadError(_failure(url, part, f"HTTP {code} {reason}{hint}")) from None

    with response:
        status = response.status
        length = _header_int(response.headers, "Content-Length")
        total = None
        if status == 206 and offset:
            match = _CONTENT_RANGE.search(response.headers.get("Content-Range", "") or "")
            if match is None:
                raise _Interrupted("a partial response without a valid Content-Range header")
            start = int(match.group(1))
            total = None if match.group(3) == "*" else int(match.group(3))
            if start > offset:
                part.unlink()
                raise _Interrupted(f"the server resumed at byte {start}, after the {offset} kept")
            if start < offset:
                with open(part, "r+b") as fh:
                    fh.truncate(start)
            offset, mode = start, "ab"
        else:
            if offset:
                log.info("%s: the server ignored the range request; restarting", url)
            offset, mode = 0, "wb"
            total = length
        expected_end = offset + length if length is not None else total

        with (
            open(part, mode) as fh,
            tqdm(
                total=expected_end,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while True:
                chunk = response.read(chunk_size)
                if not chunk:
                    break
                fh.write(chunk)
                bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())

    received = _size(part)
    if expected_end is not None and received < expected_end:
        raise _Interrupted(f"the connection closed after {received} of {expected_end} bytes")
    if expected_end is not None and received > expected_end:
        part.unlink()
        raise _Interrupted(f"received {received} bytes, more than the {expected_end} announced")


def _failure(url: str, part: Path, reason: str) -> str:
    msg = f"Could not download {url}: {reason}."
    if part.exists():
        msg += (
            f" The partial file {part} ({_size(part)} bytes) was kept; run the same command "
            "again to resume the download from there."
        )
    return msg


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    chunk_size: int = 1 << 20,
    timeout: float = 60,
    retries: int = 3,
    progress: bool = True,
    backoff: float = 1.0,
    headers: dict | None = None,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    Bytes go to ``dest + ".part"``, which is renamed to ``dest`` (``os.replace``) once complete.
    An existing ``.part`` is resumed with ``Range: bytes=N-``: a 206 answer is appended, a 200
    (the server ignored the range) restarts from zero, a 416 means the ``.part`` is already
    complete (checked against the size in Content-Range when the server gives one). A dropped
    connection, a timeout, a 5xx answer or a body shorter than its Content-Length is retried up
    to ``retries`` times, each retry resuming from the current ``.part`` size after
    ``backoff * 2**k`` seconds. Raises :class:`DownloadError` (a :class:`DatasetError`) naming
    the URL and the ``.part`` file kept for a later resume. ``headers`` are sent with every
    request (e.g. ``Authorization``).
    """
    dest = Path(dest).expanduser().absolute()
    part = _part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        try:
            _fetch(
                url, dest, part, chunk_size=chunk_size, timeout=timeout, progress=progress,
                headers=headers,
            )
            break
        except (
            _Interrupted,
            urllib.error.URLError,
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
            ssl.SSLError,
        ) as err:
            reason = str(getattr(err, "reason", None) or err) or type(err).__name__
            if attempt >= retries:
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                raise DownloadError(_failure(url, part, f"{reason}{tries}")) from None
            attempt += 1
            log.warning(
                "Download of %s failed (%s); retrying from byte %d (retry %d of %d)",
                url,
                reason,
                _size(part),
                attempt,
                retries,
            )
            time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
        except OSError as err:
            raise DownloadError(_failure(url, part, f"could not write {part}: {err}")) from None
    os.replace(part, dest)
    return dest


# -------------------------------------------------------------------------------- verify


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


# ------------------------------------------------------------------------------- extract


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


# -------------------------------------------------------------------------------- ensure


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
