"""The downloadable datasets: where each archive lives and how its layout is checked.

A `DatasetSpec` names a release (URL, archive kind, top folder, clip count) and its
``verify`` function, which sees the archive's listing as an `ArchiveContents` and
checks the clip count and the metadata files before anything is unpacked.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

from src.data.esc50 import REQUIRED_COLUMNS, DatasetError


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
