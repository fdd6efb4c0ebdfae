"""`attncap data coco2014` against a real HTTP server on 127.0.0.1: fresh, resumed, corrupt, reused."""

import hashlib
import io
import socket
import zipfile

import pytest

from attncap.cli import main
from attncap.data.coco import MARKER, download, extract, fetch_coco2014
from attncap.errors import AttncapError
from coco_fixture import ZipServer, corrupt

FAST = {"backoff": 0.0, "timeout": 10.0}
FOLDERS = ("annotations", "karpathy", "val2014", "train2014")


def fetch(root, server, **kw):
    return fetch_coco2014(root, server.url, checksums=False, progress=False, **FAST, **kw)


def assert_extracted(root, mini):
    """Every folder is marked complete and holds exactly the archive's chosen files, byte for byte."""
    for folder in FOLDERS:
        assert (root / folder / MARKER).is_file()
    for split in ("train2014", "val2014"):
        names = sorted(p.name for p in (root / split).iterdir() if p.name != MARKER)
        assert names == sorted(p.name for p in (mini.root / split).iterdir())
        sample = names[5]
        assert (root / split / sample).read_bytes() == (mini.root / split / sample).read_bytes()
    assert sorted(p.name for p in (root / "annotations").iterdir()) == [
        MARKER, "captions_train2014.json", "captions_val2014.json"]
    assert sorted(p.name for p in (root / "karpathy").iterdir()) == [MARKER, "dataset_coco.json"]
    assert not list(root.rglob("*.part")) and not list(root.glob("*.tmp-extract"))


def test_fresh_download_extracts_everything_and_a_second_run_requests_nothing(mini_coco, tmp_path):
    with ZipServer(mini_coco.zips) as server:
        paths = fetch(tmp_path, server)
        assert set(paths) == set(FOLDERS)
        assert_extracted(tmp_path, mini_coco)
        assert sorted(server.requests) == sorted((f"/{n}", None) for n in mini_coco.zips)
        for name, data in mini_coco.zips.items():
            assert (tmp_path / "downloads" / name).read_bytes() == data
        before = len(server.requests)
        fetch(tmp_path, server)
        assert len(server.requests) == before  # complete folders are reused, nothing is fetched
        # A folder without its marker (an extraction cut short) is redone from the kept zip.
        (tmp_path / "val2014" / MARKER).unlink()
        (tmp_path / "val2014" / "stray.jpg").write_bytes(b"half")
        fetch(tmp_path, server)
        assert len(server.requests) == before
        assert not (tmp_path / "val2014" / "stray.jpg").exists() and (tmp_path / "val2014" / MARKER).is_file()


def test_dropped_connection_resumes_with_a_range_request(mini_coco, tmp_path):
    data = mini_coco.zips["val2014.zip"]
    with ZipServer(mini_coco.zips) as server:
        server.drop_first = {"val2014.zip"}
        fetch(tmp_path, server, images=True)
        assert server.requested("val2014.zip") == [None, f"bytes={len(data) // 2}-"]
        assert (tmp_path / "downloads" / "val2014.zip").read_bytes() == data
        assert_extracted(tmp_path, mini_coco)


def test_server_ignoring_range_restarts_and_416_on_a_whole_part_finishes(mini_coco, tmp_path):
    data = mini_coco.zips["train2014.zip"]
    with ZipServer(mini_coco.zips) as server:
        server.drop_first = {"train2014.zip"}
        server.ignore_range = True  # answers the resume with 200 and the whole file
        out = download(f"{server.url}/train2014.zip", tmp_path / "a.zip", progress=False, **FAST)
        assert server.requested("train2014.zip") == [None, f"bytes={len(data) // 2}-"]
        assert out.read_bytes() == data
        server.ignore_range = False
        (tmp_path / "b.zip.part").write_bytes(data)  # a previous run got every byte, then died
        out = download(f"{server.url}/train2014.zip", tmp_path / "b.zip", progress=False, **FAST)
        assert server.requested("train2014.zip")[-1] == f"bytes={len(data)}-"  # answered 416
        assert out.read_bytes() == data and not (tmp_path / "b.zip.part").exists()


def test_corrupt_archive_is_an_error_leaves_nothing_marked_and_is_retried(mini_coco, tmp_path, capsys):
    files = {**mini_coco.zips, "train2014.zip": corrupt(mini_coco.zips["train2014.zip"])}
    # The archive opens and lists its members; the first member's data is damaged.
    assert zipfile.ZipFile(io.BytesIO(files["train2014.zip"])).testzip() is not None
    with ZipServer(files) as server:
        code = main(["data", "coco2014", "--root", str(tmp_path), "--mirror", server.url, "--no-checksums",
                     "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and "train2014.zip is corrupt" in err and "Traceback" not in err
        assert not (tmp_path / "train2014").exists() and not (tmp_path / "train2014.tmp-extract").exists()
        assert not (tmp_path / "downloads" / "train2014.zip").exists()
        server.files["train2014.zip"] = mini_coco.zips["train2014.zip"]
        assert main(["data", "coco2014", "--root", str(tmp_path), "--mirror", server.url, "--no-checksums",
                     "--quiet"]) == 0
        assert len(server.requested("train2014.zip")) == 2 and len(server.requested("val2014.zip")) == 1
    assert_extracted(tmp_path, mini_coco)


def test_size_and_checksum_are_verified_before_the_final_name(mini_coco, tmp_path):
    data = mini_coco.zips["caption_datasets.zip"]
    good = hashlib.sha256(data).hexdigest()
    with ZipServer(mini_coco.zips) as server:
        url = f"{server.url}/caption_datasets.zip"
        with pytest.raises(AttncapError, match="SHA-256 does not match"):
            download(url, tmp_path / "k.zip", len(data), "0" * 64, progress=False, **FAST)
        assert not (tmp_path / "k.zip").exists() and not (tmp_path / "k.zip.part").exists()
        with pytest.raises(AttncapError, match=f"{len(data)} bytes where 5 are expected"):
            download(url, tmp_path / "k.zip", 5, good, progress=False, **FAST)
        assert download(url, tmp_path / "k.zip", len(data), good, progress=False, **FAST).read_bytes() == data
        with pytest.raises(AttncapError, match="HTTP 404"):
            download(f"{server.url}/nothing.zip", tmp_path / "n.zip", progress=False, **FAST)


def test_official_checksums_apply_to_a_mirror_and_unreachable_servers_stop(mini_coco, tmp_path, capsys,
                                                                            monkeypatch):
    with ZipServer(mini_coco.zips) as server:
        monkeypatch.setenv("ATTNCAP_COCO_MIRROR", server.url)
        code = main(["data", "coco2014", "--root", str(tmp_path), "--no-images", "--quiet"])
        assert code == 2 and "pass --no-checksums" in capsys.readouterr().err
        assert main(["data", "coco2014", "--root", str(tmp_path), "--no-images", "--no-checksums",
                     "--quiet"]) == 0
        assert not server.requested("train2014.zip") and not server.requested("val2014.zip")
        assert (tmp_path / "karpathy" / "dataset_coco.json").is_file()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(AttncapError, match="failed 2 times in a row"):
        download(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", retries=1, progress=False, **FAST)


def test_extract_refuses_unsafe_member_names(tmp_path):
    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(AttncapError, match="unsafe member name"):
        extract(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "out").exists()
