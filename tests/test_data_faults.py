"""Kill `attncap data coco2014` (SIGKILL) at every fault point and at random moments: the next run
finishes and leaves exactly what an uninterrupted run leaves, and a user's own files untouched.

The process is a real ``python -m attncap.cli`` against the local server (tests/coco_fixture.py);
``ATTNCAP_FAULT_AT=N`` makes it kill itself at its Nth ``files.fault_point`` (see src/attncap/files.py).
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from attncap.files import FAULT_AT_ENV, FAULT_TRACE_ENV
from coco_fixture import ZipServer

PAD = 1_200_000  # an incompressible member: train2014.zip then downloads in 2 chunks (coco.CHUNK)


def padded(train_zip: bytes) -> bytes:
    """``train_zip`` plus a stored random member, so kills also land between download chunks."""
    buffer = io.BytesIO(train_zip)
    member = zipfile.ZipInfo("train2014/COCO_train2014_padding.jpg", date_time=(2014, 1, 1, 0, 0, 0))
    with zipfile.ZipFile(buffer, "a", zipfile.ZIP_STORED) as zf:
        zf.writestr(member, random.Random(0).randbytes(PAD))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def zips(mini_coco) -> dict[str, bytes]:
    return {**mini_coco.zips, "train2014.zip": padded(mini_coco.zips["train2014.zip"])}


@pytest.fixture(scope="module")
def server(zips):
    with ZipServer(zips) as srv:
        yield srv


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items()
            if k not in (FAULT_AT_ENV, FAULT_TRACE_ENV, "ATTNCAP_COCO_MIRROR")}
    return {**base, **{k: str(v) for k, v in extra.items()}}


def command(root: Path, url: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "attncap.cli", "data", "coco2014", "--root", str(root), "--mirror", url,
            "--no-checksums", "--quiet", *flags]


def run(cmd: list[str], **extra) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=60)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (archives, extracted folders, markers) by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def reference(root: Path, url: str, *flags: str) -> tuple[dict[str, bytes], list[str]]:
    """An uninterrupted run: its files and the labels of the fault points it passed."""
    trace = root.with_name(root.name + ".trace")
    done = run(command(root, url, *flags), **{FAULT_TRACE_ENV: trace})
    assert done.returncode == 0, done.stderr
    labels = [line.split(" ", 1)[1] for line in trace.read_text().splitlines()]
    files = snapshot(root)
    assert not [n for n in files if n.endswith((".part", ".tmp")) or "attncap-tmp" in n]
    return files, labels


@pytest.fixture(scope="module")
def expected(server, tmp_path_factory):
    return reference(tmp_path_factory.mktemp("reference") / "root", server.url)


def kill_and_rerun(root: Path, cmd: list[str], at: int) -> None:
    killed = run(cmd, **{FAULT_AT_ENV: at})
    assert killed.returncode == -signal.SIGKILL, (at, killed.returncode, killed.stderr)
    again = run(cmd)
    assert again.returncode == 0, (at, again.stderr)


def test_a_kill_at_every_fault_point_then_a_rerun_equals_an_uninterrupted_run(server, expected, tmp_path):
    files, labels = expected
    kinds = {label.split(" ")[0] for label in labels}
    assert {"download", "downloaded", "rename", "extracted", "mark", "write"} <= kinds
    assert labels.count("download train2014.zip.part") == 2  # kills between chunks, too
    for at in range(1, len(labels) + 1):
        root = tmp_path / f"k{at}"
        kill_and_rerun(root, command(root, server.url), at)
        assert snapshot(root) == files, f"after a kill at point {at} ({labels[at - 1]})"


def user_folder(root: Path, mini) -> dict[str, bytes]:
    """A user's annotations/: COCO's train captions (adopted), and files that are no member of the zip."""
    folder = root / "annotations"
    folder.mkdir(parents=True)
    (folder / "captions_train2014.json").write_bytes(
        (mini.root / "annotations" / "captions_train2014.json").read_bytes())
    (folder / "person_keypoints_train2014.json").write_text('{"annotations": [1, 2, 3]}')
    (folder / "captions_train2017.json").write_text('{"images": []}')
    (folder / "notes").mkdir()
    (folder / "notes" / "README.txt").write_text("mine")
    return snapshot(folder)


def test_kills_with_a_users_annotations_folder_leave_the_users_files_byte_identical(server, mini_coco,
                                                                                   tmp_path):
    ref = tmp_path / "ref"
    mine = user_folder(ref, mini_coco)
    files, labels = reference(ref, server.url, "--no-images")
    assert {n: b for n, b in snapshot(ref / "annotations").items() if n in mine} == mine
    assert sorted(snapshot(ref / "annotations")) == sorted(
        [*mine, ".complete", "captions_val2014.json", "instances_train2014.json", "instances_val2014.json"])
    assert "extracted captions_train2014.json" not in labels  # adopted, not written again
    for at in range(1, len(labels) + 1):
        root = tmp_path / f"k{at}"
        user_folder(root, mini_coco)
        kill_and_rerun(root, command(root, server.url, "--no-images"), at)
        assert snapshot(root) == files, f"after a kill at point {at} ({labels[at - 1]})"


def test_kills_at_random_moments_then_a_rerun_equals_an_uninterrupted_run(zips, expected, tmp_path):
    files, _ = expected
    rng = random.Random(20240611)
    with ZipServer(zips) as slow:
        slow.throttle = 0.003  # about 0.5 s for train2014.zip: kills land in transfers
        start = time.monotonic()
        assert run(command(tmp_path / "timed", slow.url)).returncode == 0
        took = time.monotonic() - start
        killed = 0
        for k in range(4):
            root = tmp_path / f"r{k}"
            proc = subprocess.Popen(command(root, slow.url), env=env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.1, 0.7) * took)
            proc.send_signal(signal.SIGKILL)
            killed += proc.wait(timeout=60) == -signal.SIGKILL
            assert run(command(root, slow.url)).returncode == 0
            assert snapshot(root) == files, f"after a kill in random run {k}"
    assert killed >= 3  # the rest finished before their kill: still checked above
