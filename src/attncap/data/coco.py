"""MS-COCO 2014 on disk: resumable, verified downloads and extraction that is never half done.

Layout under the root folder (``attncap data coco2014 --root ROOT``)::

    downloads/train2014.zip ...          the archives (``NAME.part`` while downloading)
    train2014/  val2014/                 the images, as the archives name them
    annotations/captions_{train,val}2014.json
    karpathy/dataset_coco.json           Karpathy's split (train 113,287 with restval / val 5k / test 5k)

A download streams to ``NAME.part``, resumes with an HTTP ``Range`` request after a dropped
connection (or a killed process), and gets its final name only once its size and checksum are
verified. An archive is extracted into ``FOLDER.tmp-extract``, renamed to ``FOLDER`` and then
marked with ``FOLDER/.complete``; a folder without the marker is extracted again, and a folder
with it is reused without downloading anything. A mirror (``--mirror URL`` or the environment
variable ``ATTNCAP_COCO_MIRROR``) serves the same file names from one base address.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from ..errors import AttncapError
from ..files import write_json

MIRROR_ENV = "ATTNCAP_COCO_MIRROR"
MARKER = ".complete"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """One file to download and the folder its (chosen) members are extracted into."""

    name: str                 # file name, also its name on a mirror
    url: str                  # official address
    folder: str               # extracted into ROOT/folder; a leading "folder/" in member names is dropped
    size: int | None = None   # bytes, when known
    sha256: str | None = None
    members: str = "*"        # glob over member names (after the prefix is dropped)
    images: bool = False      # skipped by --no-images


# Sizes and SHA-256 digests as listed by TensorFlow Datasets
# (tensorflow/datasets, tensorflow_datasets/url_checksums/coco_captions.txt). The MD5s other
# projects list (e.g. salesforce/LAVIS: train2014 0da8c0bd3d6becc4dcb32757491aca88, val2014
# a3d79f5ed8d289b7a7554ce06a5782b3) name the same files; SHA-256 is the stronger check.
TRAIN2014 = Archive("train2014.zip", "http://images.cocodataset.org/zips/train2014.zip", "train2014",
                    13_510_573_713, "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
                    images=True)
VAL2014 = Archive("val2014.zip", "http://images.cocodataset.org/zips/val2014.zip", "val2014",
                  6_645_013_297, "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
                  images=True)
ANNOTATIONS2014 = Archive(
    "annotations_trainval2014.zip", "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
    "annotations", 252_872_794, "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
    members="captions_*2014.json")
KARPATHY = Archive(
    "caption_datasets.zip", "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
    "karpathy", 36_745_453, "4cfd70132527b80933105e5829dc9034eaab9573482e2e680abbab6130244817",
    members="dataset_coco.json")
COCO2014 = (ANNOTATIONS2014, KARPATHY, VAL2014, TRAIN2014)


class _Dropped(Exception):
    """A transfer that ended early or could not connect; worth retrying."""


def archive_url(archive: Archive, mirror: str | None = None) -> str:
    """The official address, or ``MIRROR/NAME`` when a mirror is given."""
    return f"{mirror.rstrip('/')}/{archive.name}" if mirror else archive.url


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def download(url: str, dest: str | Path, size: int | None = None, sha256: str | None = None,
             retries: int = 4, backoff: float = 2.0, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming and verifying; reuse a present ``dest``.

    A dropped connection is retried ``retries`` times in a row without progress (waiting
    ``backoff * 2**k`` seconds); each retry asks only for the missing bytes. A file whose size or
    SHA-256 does not match is deleted and reported, never renamed to ``dest``.
    """
    dest = Path(dest)
    if dest.is_file():
        if size is not None and dest.stat().st_size != size:
            raise AttncapError(f"{dest} is {dest.stat().st_size} bytes where {size} are expected; "
                               "delete it to download it again")
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        before = part.stat().st_size if part.is_file() else 0
        try:
            _transfer(url, part, size, timeout, progress)
            break
        except _Dropped as exc:
            failures = 1 if part.is_file() and part.stat().st_size > before else failures + 1
            if failures > retries:
                raise AttncapError(f"download of {url} failed {failures} times in a row ({exc}); "
                                   f"run the same command again to resume from {part}") from None
            wait = backoff * 2 ** (failures - 1)
            tqdm.write(f"{dest.name}: {exc}; retrying in {wait:.0f} s")
            time.sleep(wait)
    _verify(part, url, size, sha256, progress)
    os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> int:
    """One request: append the missing bytes to ``part``; returns the full size once it is all there."""
    have = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        return _refused(exc, url, part, have)
    except OSError as exc:  # URLError, refused connection, timeout
        raise _Dropped(f"cannot connect: {getattr(exc, 'reason', exc)}") from None
    with response:
        if have and response.status == 206 and _range_start(response.headers) != have:
            part.unlink()  # a range we did not ask for: start over rather than guess
            raise _Dropped("server answered with another range; starting over")
        if response.status != 206:
            have = 0  # the server ignored Range (200): the body is the whole file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise AttncapError(f"{url} is {total} bytes where {size} are expected; if this mirror "
                               "serves other files, pass --no-checksums")
        _stream(response, part, have, total, progress)
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Dropped(f"connection closed after {got} of {total} bytes")
    return got


def _stream(response, part: Path, have: int, total: int | None, progress: bool) -> None:
    """Copy the response body into ``part`` from offset ``have`` (appending or from scratch)."""
    bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
               desc=part.name[: -len(".part")], disable=not progress, dynamic_ncols=True)
    with bar, open(part, "ab" if have else "wb") as out:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                raise _Dropped(f"connection dropped ({type(exc).__name__})") from None
            if not chunk:
                return
            out.write(chunk)  # a full disk is an OSError here, not a dropped connection
            bar.update(len(chunk))


def _refused(exc: urllib.error.HTTPError, url: str, part: Path, have: int) -> int:
    """An HTTP error status: 416 on a whole part is success; 5xx is retried; others are fatal."""
    if exc.code == 416 and have:
        total = exc.headers.get("Content-Range", "").rpartition("/")[2]
        if total.isdigit() and int(total) == have:
            return have  # the previous run had received every byte
        part.unlink()
        raise _Dropped("the partial file is longer than the server's; starting over")
    if exc.code >= 500 or exc.code == 429:
        raise _Dropped(f"HTTP {exc.code} {exc.reason}")
    raise AttncapError(f"cannot download {url}: HTTP {exc.code} {exc.reason}; check the address "
                       f"(or the --mirror / {MIRROR_ENV} base)") from None


def _range_start(headers) -> int | None:
    """The first byte of a ``Content-Range: bytes START-END/TOTAL`` header."""
    value = headers.get("Content-Range", "")
    start = value.removeprefix("bytes ").partition("-")[0]
    return int(start) if start.isdigit() else None


def _verify(part: Path, url: str, size: int | None, sha256: str | None, progress: bool) -> None:
    """Check the finished ``part`` against the known size and digest; delete it when wrong."""
    got = part.stat().st_size
    problem = None
    if size is not None and got != size:
        problem = f"it is {got} bytes where {size} are expected"
    elif sha256 is not None and _sha256(part, progress) != sha256:
        problem = "its SHA-256 does not match the published one"
    if problem:
        part.unlink()
        raise AttncapError(f"the download of {url} is damaged ({problem}); it was deleted, run the "
                           "same command again to download it again")


def _sha256(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     unit_divisor=1024, desc=f"verify {path.name}",
                                     disable=not progress, dynamic_ncols=True) as bar:
        while block := f.read(CHUNK * 8):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def extract(archive: str | Path, folder: str | Path, members: str = "*", progress: bool = True) -> Path:
    """Extract the members of a zip matching ``members`` into ``folder``, all or nothing.

    Works in ``FOLDER.tmp-extract`` and renames it; ``FOLDER/.complete`` is written last. A
    damaged archive (bad CRC, truncated) raises :class:`zipfile.BadZipFile` and leaves no folder.
    """
    archive, folder = Path(archive), Path(folder)
    if is_complete(folder):
        return folder
    tmp = folder.with_name(folder.name + ".tmp-extract")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)  # no marker: an interrupted earlier attempt
    try:
        with zipfile.ZipFile(archive) as zf:
            chosen = _chosen_members(zf, folder.name, members, archive)
            bar = tqdm(total=sum(info.file_size for info, _ in chosen), unit="B", unit_scale=True,
                       unit_divisor=1024, desc=f"extract {archive.name}", disable=not progress,
                       dynamic_ncols=True)
            with bar:
                for info, name in chosen:
                    target = tmp.joinpath(*name.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        while block := src.read(CHUNK):  # zipfile checks the CRC at the end
                            dst.write(block)
                            bar.update(len(block))
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise zipfile.BadZipFile(str(exc)) from None
    os.replace(tmp, folder)
    write_json(folder / MARKER, {"archive": archive.name, "files": len(chosen)})
    return folder


def _chosen_members(zf: zipfile.ZipFile, prefix: str, pattern: str, archive: Path
                    ) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """(member, relative path) pairs to extract, leading ``prefix/`` dropped; unsafe names refused."""
    chosen = []
    for info in zf.infolist():
        if info.is_dir():
            continue
        name = PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts:
            raise AttncapError(f"archive {archive} has an unsafe member name {info.filename!r}; "
                               "it is not a COCO archive")
        if name.parts[0] == prefix and len(name.parts) > 1:
            name = PurePosixPath(*name.parts[1:])
        if fnmatch.fnmatch(str(name), pattern):
            chosen.append((info, name))
    if not chosen:
        raise AttncapError(f"archive {archive} holds no member matching {pattern!r}")
    return chosen


def fetch(archive: Archive, root: str | Path, mirror: str | None = None, checksums: bool = True,
          progress: bool = True, **download_args) -> Path:
    """Download and extract one archive under ``root`` (reusing what is complete); returns its folder."""
    root = Path(root)
    folder = root / archive.folder
    if is_complete(folder):
        return folder
    zip_path = root / "downloads" / archive.name
    download(archive_url(archive, mirror), zip_path, archive.size if checksums else None,
             archive.sha256 if checksums else None, progress=progress, **download_args)
    try:
        return extract(zip_path, folder, archive.members, progress)
    except zipfile.BadZipFile as exc:
        zip_path.unlink()
        raise AttncapError(f"archive {zip_path} is corrupt ({exc}); it was deleted, run the same "
                           "command again to download it again") from None


def fetch_coco2014(root: str | Path, mirror: str | None = None, images: bool = True,
                   karpathy: bool = True, checksums: bool = True, progress: bool = True,
                   **download_args) -> dict[str, Path]:
    """Everything COCO 2014 captioning needs under ``root``; returns ``{folder name: path}``.

    ``mirror`` (default: the ``ATTNCAP_COCO_MIRROR`` environment variable) replaces the official
    addresses; ``checksums=False`` skips the published sizes and digests (for a mirror serving
    other files: the download is then checked against its Content-Length and the zip CRCs).
    """
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    out = {}
    for archive in COCO2014:
        if (archive.images and not images) or (archive is KARPATHY and not karpathy):
            continue
        out[archive.folder] = fetch(archive, root, mirror, checksums, progress, **download_args)
    return out

