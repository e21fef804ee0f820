"""Resumable HTTP download with a progress bar.

`download_file` fetches into ``<dest>.part`` and renames it to ``dest`` only once every
byte is there. An interrupted transfer (dropped connection, timeout, a response shorter
than its Content-Length) is resumed with an HTTP ``Range`` request, both within one
call (``retries``) and across calls (the ``.part`` file stays).
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from src.data.esc50 import DatasetError

log = logging.getLogger(__name__)

USER_AGENT = "audio-transformer-dataset-download/1.0"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)


class DownloadError(DatasetError):
    """A download failed; the message names the URL and any partial file kept for resuming.

    ``local`` is true when the transfer worked but the file could not be written here (a full
    disk, no permission), so fetching the data from elsewhere would not help.
    """

    def __init__(self, message: str, *, local: bool = False) -> None:
        super().__init__(message)
        self.local = local


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
        reply, code, reason = err.headers, err.code, err.reason
        err.close()
        if code == 416 and offset:
            # Nothing left to send: the .part file may already hold the whole archive.
            match = _UNSATISFIED_RANGE.search((reply or {}).get("Content-Range", "") or "")
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
            raise DownloadError(
                _failure(url, part, f"could not write {part}: {err}"), local=True
            ) from None
    os.replace(part, dest)
    return dest
