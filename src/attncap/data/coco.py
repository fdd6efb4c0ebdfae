"""MS-COCO 2014 on disk: resumable, verified downloads and extraction that never destroys a file.

Layout under the root folder (``attncap data coco2014 --root ROOT``)::

    downloads/train2014.zip ...          the archives (``NAME.part`` while downloading)
    train2014/  val2014/                 the images, as the archives name them
    annotations/captions_{train,val}2014.json, instances_{train,val}2014.json (object boxes)
    karpathy/dataset_coco.json           Karpathy's split (train 113,287 with restval / val 5k / test 5k)
    karpathy/dataset_flickr{8k,30k}.json  his Flickr8k and Flickr30k splits (the images: see README.md)

A download streams to ``NAME.part``, resumes with HTTP ``Range`` after a dropped connection or a
kill, and gets its final name once verified and fsynced. Extraction keeps what ``FOLDER`` already
holds (members with the zip's sizes; other files are never touched), writes each missing member
through a temporary name and marks ``FOLDER/.complete`` last; a marked folder is reused without
downloading. A mirror (``--mirror URL`` or ``ATTNCAP_COCO_MIRROR``) serves the same file names.
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
from typing import Callable, Iterable

from tqdm import tqdm

from ..errors import AttncapError
from ..files import TMP_TAG, fault_point, fsync_dir, fsync_file, write_json

MIRROR_ENV = "ATTNCAP_COCO_MIRROR"
MARKER = ".complete"
CHUNK = 1 << 20
PART_TAG = f"{TMP_TAG}part"  # ".NAME.attncap-tmp-part": a member being extracted


@dataclass(frozen=True)
class Archive:
    """One file to download and the folder its (chosen) members are extracted into."""

    name: str                 # file name, also its name on a mirror
    url: str                  # official address
    folder: str               # extracted into ROOT/folder; a leading "folder/" in member names is dropped
    size: int | None = None   # bytes, when known
    sha256: str | None = None
    members: tuple[str, ...] = ("*",)        # globs over member names (after the prefix is dropped)
    images: bool = False      # skipped by --no-images
    files: tuple[tuple[str, int], ...] = ()  # the chosen members' (name, bytes), when known without the zip


# Sizes and SHA-256 digests as listed by TensorFlow Datasets
# (tensorflow/datasets, tensorflow_datasets/url_checksums/coco_captions.txt). The MD5s other
# projects list (e.g. salesforce/LAVIS: train2014 0da8c0bd3d6becc4dcb32757491aca88, val2014
# a3d79f5ed8d289b7a7554ce06a5782b3) name the same files; SHA-256 is the stronger check. Their
# members' sizes (``files``) are published nowhere we could check, so they are left unknown.
TRAIN2014 = Archive("train2014.zip", "http://images.cocodataset.org/zips/train2014.zip", "train2014",
                    13_510_573_713, "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
                    images=True)
VAL2014 = Archive("val2014.zip", "http://images.cocodataset.org/zips/val2014.zip", "val2014",
                  6_645_013_297, "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
                  images=True)
ANNOTATIONS2014 = Archive(
    "annotations_trainval2014.zip", "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
    "annotations", 252_872_794, "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
    members=("captions_*2014.json", "instances_*2014.json"))  # instances: CHAIR and grounding boxes
KARPATHY = Archive(
    "caption_datasets.zip", "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
    "karpathy", 36_745_453, "4cfd70132527b80933105e5829dc9034eaab9573482e2e680abbab6130244817",
    members=("dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json"))
COCO2014 = (ANNOTATIONS2014, KARPATHY, VAL2014, TRAIN2014)


class _Dropped(Exception):
    """A transfer that ended early or could not connect; worth retrying."""


def archive_url(archive: Archive, mirror: str | None = None) -> str:
    """The official address, or ``MIRROR/NAME`` when a mirror is given."""
    return f"{mirror.rstrip('/')}/{archive.name}" if mirror else archive.url


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def download(url: str, dest: str | Path, size: int | None = None, sha256: str | None = None,
             retries: int = 4, backoff: float = 2.0, timeout: float = 60.0, progress: bool = True,
             is_whole: Callable[[Path], bool] | None = None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming and verifying; reuse a present ``dest``.

    A dropped connection is retried ``retries`` times in a row without progress (waiting
    ``backoff * 2**k`` seconds); each retry asks only for the missing bytes. A body shorter than
    ``size`` (or Content-Length, Content-Range), or, when no size is known, one ``is_whole`` rejects,
    counts as dropped. A file whose size or SHA-256 does not match is deleted, never renamed.
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
            total = _transfer(url, part, size, timeout, progress)
            if total is None and is_whole is not None and not is_whole(part):
                raise _Dropped("the connection closed before the end of the file")
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
    _publish(part, dest)
    return dest


def _publish(part: Path, dest: Path) -> None:
    """Give a verified download its final name, durably: data fsynced first, the folder after."""
    fsync_file(part)
    fault_point(f"downloaded {dest.name}")
    os.replace(part, dest)
    fault_point(f"rename {dest.name}")
    fsync_dir(dest.parent)


def _transfer(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> int | None:
    """One request: append the missing bytes to ``part``; returns the full size, None if nobody states it."""
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
        total = _full_size(response, have)
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise AttncapError(f"{url} is {total} bytes where {size} are expected; if this mirror "
                               "serves other files, pass --no-checksums")
        total = size if total is None else total  # no Content-Length: the known size tells a short body
        _stream(response, part, have, total, progress)
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Dropped(f"connection closed after {got} of {total} bytes")
    return total


def _full_size(response, have: int) -> int | None:
    """The whole file's size as the server states it: Content-Range's total, or offset + Content-Length."""
    if response.status == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        if total.isdigit():
            return int(total)
    length = response.headers.get("Content-Length", "")
    return have + int(length) if length.isdigit() else None


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
            out.flush()  # a kill from here on keeps this chunk: the next run resumes after it
            fault_point(f"download {part.name}")
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


def extract(archive: str | Path, folder: str | Path, members: str | tuple[str, ...] = ("*",),
            progress: bool = True) -> Path:
    """Extract the members of a zip matching the glob(s) ``members`` into ``folder``, adopting what is there.

    A member already on disk with the size the zip lists is kept; each missing one is written as
    ``.NAME.attncap-tmp-part``, fsynced and renamed, so a kill leaves whole files only. Other files
    in ``folder`` are never touched; one with a member's name and another size raises
    :class:`AttncapError` (it may be the user's). ``FOLDER/.complete`` is written last. A damaged
    archive (bad CRC, truncated) raises :class:`zipfile.BadZipFile` and removes what this call wrote.
    """
    archive, folder = Path(archive), Path(folder)
    if is_complete(folder):
        return folder
    shutil.rmtree(folder.with_name(folder.name + ".tmp-extract"), ignore_errors=True)  # attncap <= 0.1
    patterns = (members,) if isinstance(members, str) else tuple(members)
    created, done = not folder.exists(), []
    try:
        with zipfile.ZipFile(archive) as zf:
            chosen = _chosen_members(zf, folder.name, patterns, archive)
            names = [str(name) for _, name in chosen]
            missing = set(_missing(folder, [(str(n), i.file_size) for i, n in chosen], archive.name))
            _remove_temps(folder, names)
            todo = [(info, folder.joinpath(*name.parts)) for info, name in chosen if str(name) in missing]
            with tqdm(total=sum(info.file_size for info, _ in todo), unit="B", unit_scale=True,
                      unit_divisor=1024, desc=f"extract {archive.name}", disable=not progress,
                      dynamic_ncols=True) as bar:
                for info, target in todo:
                    _extract_one(zf, info, target, bar)
                    done.append(target)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        for path in done:  # only what this call wrote from the damaged archive
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise zipfile.BadZipFile(str(exc)) from None
    _mark(folder, archive.name, names)
    return folder


def _missing(folder: Path, wanted: Iterable[tuple[str, int]], source: str) -> list[str]:
    """The names of ``wanted`` ((name, bytes) pairs) not yet in ``folder``; another size there is an error."""
    missing = []
    for name, size in wanted:
        path = folder / name
        if not path.exists():
            missing.append(name)
        elif not path.is_file() or path.stat().st_size != size:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "not a file"
            raise AttncapError(f"{path} is {found} but {source} holds {size} bytes under that name; "
                               "move it away to keep it, or delete it to let attncap extract it")
    return missing


def _remove_temps(folder: Path, names: list[str]) -> None:
    """Members a killed run was writing (``.NAME.attncap-tmp-part``; the marker's are files.py's)."""
    for sub in {(folder / name).parent for name in names} | {folder}:
        for stale in sub.glob(f".*{PART_TAG}"):
            stale.unlink(missing_ok=True)


def _extract_one(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, bar) -> None:
    """One member through a temporary name: written, fsynced, renamed (its folder is fsynced by _mark)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{PART_TAG}")
    try:
        with zf.open(info) as src, open(tmp, "wb") as dst:
            while block := src.read(CHUNK):  # zipfile checks the CRC at the end
                dst.write(block)
                bar.update(len(block))
            dst.flush()
            os.fsync(dst.fileno())
        fault_point(f"extracted {target.name}")
        os.replace(tmp, target)
        fault_point(f"rename {target.name}")
    finally:
        tmp.unlink(missing_ok=True)


def _mark(folder: Path, source: str, names: list[str]) -> None:
    """Make the renames inside ``folder`` durable, then write the marker that says it is complete."""
    for sub in sorted({(folder / name).parent for name in names}):
        fsync_dir(sub)
    fault_point(f"mark {folder.name}")
    write_json(folder / MARKER, {"archive": source, "files": len(names)})


def _chosen_members(zf: zipfile.ZipFile, prefix: str, patterns: tuple[str, ...], archive: Path
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
        if any(fnmatch.fnmatch(str(name), pattern) for pattern in patterns):
            chosen.append((info, name))
    if not chosen:
        raise AttncapError(f"archive {archive} holds no member matching {' or '.join(patterns)}")
    return chosen


def _adopt(archive: Archive, folder: Path) -> bool:
    """Mark ``folder`` complete without the zip when it holds every member of ``archive.files``."""
    if not archive.files or not folder.is_dir() or _missing(folder, archive.files, archive.name):
        return False
    names = [name for name, _ in archive.files]
    _remove_temps(folder, names)
    _mark(folder, archive.name, names)
    return True


def _lacks_named_member(archive: Archive, folder: Path) -> bool:
    """Whether a member named literally (not a glob) in ``archive.members`` is missing from ``folder``."""
    return any(not (folder / name).is_file() for name in archive.members if not set(name) & set("*?["))


def fetch(archive: Archive, root: str | Path, mirror: str | None = None, checksums: bool = True,
          progress: bool = True, **download_args) -> Path:
    """Download and extract one archive under ``root`` (reusing what is complete); returns its folder.

    With ``checksums`` (the official archives), a folder already holding ``archive.files`` is
    adopted without a download; a file there of another size stops before the download.
    """
    root = Path(root)
    folder = root / archive.folder
    if is_complete(folder) and _lacks_named_member(archive, folder):
        (folder / MARKER).unlink()  # marked by an attncap that extracted fewer members: extract the rest
    if is_complete(folder) or (checksums and _adopt(archive, folder)):
        return folder
    zip_path = root / "downloads" / archive.name
    download(archive_url(archive, mirror), zip_path, archive.size if checksums else None,
             archive.sha256 if checksums else None, progress=progress, is_whole=zipfile.is_zipfile,
             **download_args)
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

