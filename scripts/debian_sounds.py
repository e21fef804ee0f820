"""A corpus of real recordings from Debian packages' sound files (game sound effects,
desktop sound themes), for self-supervised pretraining and small real-audio checks.

    python -m scripts.debian_sounds OUT [--packages P ...] [--debs FILE_OR_DIR ...]
        [--min-seconds 0.3] [--max-seconds 0] [--max-files N] [--list]

For every package: ``apt-get download`` its ``.deb`` into ``OUT/debs`` (kept, so a
second run downloads nothing; ``--debs`` takes ``.deb`` files already on disk instead),
unpack it with ``dpkg-deb -x``, and copy every audio file the readers take (wav, ogg,
oga, flac, mp3, aiff, au) that decodes and lasts at least ``--min-seconds`` to
``OUT/audio/PACKAGE/NAME`` (the path inside the package, ``/`` as ``__``; ``.oga``
becomes ``.ogg``). ``OUT/manifest.csv`` lists each kept file with its package, version,
path in the package, duration, sample rate, channels and the package's licence line;
``OUT/skipped.csv`` lists the files left out and why (too short or long, not
decodable, symbolic links: a second name of a file). Packages in ``OUT/audio`` from an
earlier run that this run does not list are left there, with a note. Files are copied
as they are (their own format and rate); the data pipeline decodes and resamples them.

Use it as a dataset (``src.data.folder``):

    python -m src.pretrain experiment=ssast data=folder data.root=OUT/audio
    python -m src.train data=folder data.root=OUT/audio data.labels_from_subdirs=true \\
        data.num_folds=5 ...            # the package as the class

The packages kept for a held-out evaluation (``HELD_OUT``) are refused.
``--list`` prints the default packages and their installed sizes (``apt-cache``) and
exits. Needs Debian's ``apt-get`` and ``dpkg-deb`` (any Debian or Ubuntu machine).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Sound effects (and some music and speech) of games, and desktop sound themes, in
# Debian's main archive (bookworm): about 0.9 GB of .deb files, 2843 files and 5.3 h of
# audio kept with the defaults. Packages whose sounds are in formats the readers do not
# take, or packed in archives (openttd-opensfx, xblast-tnt-sounds, teeworlds-data,
# triplane, neverball-data, gcompris-qt-data), are not listed.
DEFAULT_PACKAGES = (
    "sound-theme-freedesktop", "oxygen-sounds", "yaru-theme-sound", "tuxpaint-data",
    "frozen-bubble-data", "pingus-data", "lbreakout2-data", "chromium-bsu-data",
    "powermanga-data", "tecnoballz-data", "netpanzer-data", "kapman", "kbounce",
    "granatier", "kgoldrunner", "ktuberling-data", "enigma-data", "pinball-data",
    "abe-data", "extremetuxracer-data", "xmoto-data", "lincity-ng-data", "warmux-data",
    "wesnoth-1.16-data", "supertux-data", "freedroidrpg-data",
)
# Kept for a held-out evaluation: never part of a pretraining corpus built here.
HELD_OUT = frozenset({
    "hydrogen-drumkits", "hydrogen-data", "hydrogen-drumkits-effects", "sonic-pi-samples",
    "lmms-common", "bucklespring-data", "hedgewars-data",
})
AUDIO_EXTENSIONS = (".wav", ".ogg", ".oga", ".flac", ".mp3", ".aiff", ".aif", ".au")
MANIFEST_FIELDS = ("file", "package", "version", "source", "seconds", "sample_rate",
                   "channels", "license")


class CorpusError(RuntimeError):
    """A problem the user must fix (bad package name, missing tool, nothing found)."""


@dataclass
class Deb:
    package: str
    version: str
    path: Path


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise CorpusError(f"{cmd[0]} not found: this script needs Debian's apt and dpkg "
                          "(run it on Debian or Ubuntu, or pass .deb files with --debs).")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def check_packages(packages: list[str]) -> list[str]:
    """The packages, de-duplicated; raises on held-out or malformed names."""
    out = []
    for name in packages:
        if name in HELD_OUT:
            raise CorpusError(
                f"package {name!r} is kept for a held-out evaluation and is not used for "
                f"pretraining; drop it from --packages (held out: {sorted(HELD_OUT)}).")
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name):
            raise CorpusError(f"{name!r} is not a Debian package name.")
        if name not in out:
            out.append(name)
    return out


def deb_fields(path: Path) -> tuple[str, str]:
    """(package, version) from a .deb's control file."""
    res = _run(["dpkg-deb", "-f", str(path), "Package", "Version"])
    if res.returncode:
        raise CorpusError(f"{path} is not a readable .deb file: {res.stderr.strip()}")
    fields = dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line)
    return fields.get("Package", path.name), fields.get("Version", "")


def download(packages: list[str], debs_dir: Path, log=print) -> list[Deb]:
    """``apt-get download`` each package into ``debs_dir`` unless a .deb of it is there."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    found = []
    for name in packages:
        have = sorted(debs_dir.glob(f"{name}_*.deb"))
        if not have:
            log(f"downloading {name} ...")
            res = _run(["apt-get", "download", name], cwd=debs_dir)
            if res.returncode:
                raise CorpusError(
                    f"apt-get download {name} failed: {res.stderr.strip() or res.stdout.strip()}"
                    "\nCheck the name (apt-cache search NAME) and that apt's package lists "
                    "are current (apt-get update).")
            have = sorted(debs_dir.glob(f"{name}_*.deb"))
            if not have:
                raise CorpusError(f"apt-get download {name} wrote no {name}_*.deb file.")
        package, version = deb_fields(have[-1])
        found.append(Deb(package, version, have[-1]))
    return found


def local_debs(paths: list[str]) -> list[Deb]:
    """The .deb files named (files, or folders of them)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.deb"))
        elif p.is_file():
            files.append(p)
        else:
            raise CorpusError(f"--debs {p}: no such file or folder.")
    if not files:
        raise CorpusError(f"--debs {paths}: no .deb files there.")
    debs = []
    for f in files:
        package, version = deb_fields(f)
        check_packages([package])
        debs.append(Deb(package, version, f))
    return debs


def _license(tree: Path, package: str) -> str:
    copyright_file = tree / "usr/share/doc" / package / "copyright"
    if not copyright_file.is_file():
        return ""
    for line in copyright_file.read_text(errors="replace").splitlines():
        if line.startswith("License:"):
            return line.split(":", 1)[1].strip()
    return ""


def _target_name(rel: str) -> str:
    name = rel.replace("/", "__")
    return name[:-4] + ".ogg" if name.lower().endswith(".oga") else name


def extract(deb: Deb, audio_dir: Path, min_seconds: float, max_seconds: float,
            max_files: int) -> tuple[list[dict], list[dict]]:
    """Unpack one .deb and copy its audio files; returns (kept rows, skipped rows)."""
    import soundfile as sf

    kept, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        res = _run(["dpkg-deb", "-x", str(deb.path), str(tree)])
        if res.returncode:
            raise CorpusError(f"dpkg-deb -x {deb.path} failed: {res.stderr.strip()}")
        license_line = _license(tree, deb.package)
        files = sorted(p for p in tree.rglob("*")
                       if p.suffix.lower() in AUDIO_EXTENSIONS and not p.is_dir())
        out_dir = audio_dir / deb.package
        for path in files:
            rel = path.relative_to(tree).as_posix()
            if path.is_symlink():  # usually another file of the package under a 2nd name
                skipped.append(dict(package=deb.package, source=rel,
                                    reason=f"symbolic link to {os.readlink(path)}"))
                continue
            try:
                info = sf.info(str(path))
                seconds = float(info.frames) / float(info.samplerate)
            except Exception as err:  # noqa: BLE001 - any decoder error: skip, listed
                skipped.append(dict(package=deb.package, source=rel,
                                    reason=f"unreadable: {err}".replace("\n", " ")))
                continue
            if seconds < min_seconds:
                skipped.append(dict(package=deb.package, source=rel,
                                    reason=f"{seconds:.3f} s < --min-seconds {min_seconds}"))
                continue
            if max_seconds and seconds > max_seconds:
                skipped.append(dict(package=deb.package, source=rel,
                                    reason=f"{seconds:.1f} s > --max-seconds {max_seconds}"))
                continue
            if max_files and len(kept) >= max_files:
                skipped.append(dict(package=deb.package, source=rel,
                                    reason=f"over --max-files {max_files}"))
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            target = out_dir / _target_name(rel)
            shutil.copyfile(path, target)
            kept.append(dict(
                file=target.relative_to(audio_dir).as_posix(), package=deb.package,
                version=deb.version, source=rel, seconds=round(seconds, 3),
                sample_rate=info.samplerate, channels=info.channels,
                license=license_line))
    return kept, skipped


def _write_csv(path: Path, rows: list[dict], fields) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def build_corpus(out: Path, debs: list[Deb], min_seconds=0.3, max_seconds=0.0,
                 max_files=0, progress=True, log=print) -> dict:
    """Copy the audio of ``debs`` to ``out/audio``; write the manifests; return a summary."""
    from tqdm.auto import tqdm

    audio_dir = out / "audio"
    kept_all, skipped_all = [], []
    for deb in tqdm(debs, desc="packages", unit="deb", disable=not progress):
        shutil.rmtree(audio_dir / deb.package, ignore_errors=True)  # a rerun starts clean
        kept, skipped = extract(deb, audio_dir, min_seconds, max_seconds, max_files)
        kept_all += kept
        skipped_all += skipped
        if not kept:
            log(f"{deb.package}: no audio file kept ({len(skipped)} skipped)")
    listed = {deb.package for deb in debs}
    others = sorted(p.name for p in audio_dir.glob("*/") if p.name not in listed)
    if others:
        log(f"note: {audio_dir} also holds {', '.join(others)} from an earlier run; they are "
            "not in this manifest, and a data=folder run reads them too (delete them to "
            "leave them out)")
    if not kept_all:
        raise CorpusError(f"no audio file of at least {min_seconds} s in {len(debs)} "
                          f"package(s); see {out / 'skipped.csv'}.")
    _write_csv(out / "manifest.csv", kept_all, MANIFEST_FIELDS)
    _write_csv(out / "skipped.csv", skipped_all, ("package", "source", "reason"))
    per = {}
    for row in kept_all:
        n, s = per.get(row["package"], (0, 0.0))
        per[row["package"]] = (n + 1, s + row["seconds"])
    return dict(files=len(kept_all), skipped=len(skipped_all),
                hours=sum(r["seconds"] for r in kept_all) / 3600, packages=per)


def list_packages() -> None:
    for name in DEFAULT_PACKAGES:
        res = _run(["apt-cache", "show", name])
        size = re.search(r"^Installed-Size: (\d+)", res.stdout, re.M)
        print(f"{name:28s} {int(size.group(1)) / 1024:8.1f} MB installed" if size
              else f"{name:28s} not in apt's package lists")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, nargs="?", help="output folder")
    p.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES),
                   help="Debian packages to download (default: %(default)s)")
    p.add_argument("--debs", nargs="+", help=".deb files or folders of them, instead of "
                                              "downloading")
    p.add_argument("--min-seconds", type=float, default=0.3,
                   help="leave out shorter files (default 0.3: 30 frames at a 10 ms hop, "
                        "about two patches)")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="leave out longer files, e.g. music (0: keep all)")
    p.add_argument("--max-files", type=int, default=0,
                   help="at most this many files per package (0: all)")
    p.add_argument("--list", action="store_true", help="print the default packages' sizes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.list:
            list_packages()
            return 0
        if args.out is None:
            p.error("OUT is required")
        if args.debs:
            debs = local_debs(args.debs)
        else:
            debs = download(check_packages(args.packages), args.out / "debs")
        summary = build_corpus(args.out, debs, args.min_seconds, args.max_seconds,
                               args.max_files, progress=not args.no_progress)
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, (n, s) in sorted(summary["packages"].items()):
        print(f"{name:28s} {n:5d} files {s / 60:7.1f} min")
    print(f"{summary['files']} files, {summary['hours']:.2f} h of audio in "
          f"{args.out / 'audio'} ({summary['skipped']} left out: {args.out / 'skipped.csv'}); "
          f"manifest: {args.out / 'manifest.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
