"""`attncap data coco2014` against a real HTTP server on 127.0.0.1: fresh, resumed, corrupt, reused."""

import dataclasses
import hashlib
import io
import json
import socket
import zipfile

import pytest

from attncap.cli import main
from attncap.data.coco import ANNOTATIONS2014, MARKER, download, extract, fetch_coco2014
from attncap.data.coco import fetch as fetch_one
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
        MARKER, "captions_train2014.json", "captions_val2014.json", "instances_train2014.json",
        "instances_val2014.json"]
    karpathy = ["dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json"]  # not readme.txt
    assert sorted(p.name for p in (root / "karpathy").iterdir()) == [MARKER, *karpathy]
    for name in karpathy:
        assert (root / "karpathy" / name).read_bytes() == (mini.root / "karpathy" / name).read_bytes()
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
        # A folder without its marker is checked against the kept zip; files not in it stay.
        (tmp_path / "val2014" / MARKER).unlink()
        (tmp_path / "val2014" / "stray.jpg").write_bytes(b"half")
        fetch(tmp_path, server)
        assert len(server.requests) == before
        assert (tmp_path / "val2014" / "stray.jpg").read_bytes() == b"half"
        assert (tmp_path / "val2014" / MARKER).is_file()


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


def user_annotations(root, mini):
    """An annotations/ folder as a user may have it: COCO's train captions, keypoints and 2017 files."""
    folder = root / "annotations"
    folder.mkdir(parents=True)
    (folder / "captions_train2014.json").write_bytes(
        (mini.root / "annotations" / "captions_train2014.json").read_bytes())
    (folder / "person_keypoints_train2014.json").write_text(json.dumps({"annotations": [1, 2, 3]}))
    (folder / "captions_train2017.json").write_text('{"images": []}')
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_folder_without_marker_is_adopted_user_files_stay_and_only_missing_members_are_extracted(
        mini_coco, tmp_path):
    mine = user_annotations(tmp_path, mini_coco)
    kept = tmp_path / "annotations" / "captions_train2014.json"
    kept.touch()
    stamp = kept.stat().st_mtime_ns
    with ZipServer(mini_coco.zips) as server:
        fetch(tmp_path, server, images=False)
    folder = tmp_path / "annotations"
    assert {n: (folder / n).read_bytes() for n in mine} == mine  # the old code deleted the folder
    assert kept.stat().st_mtime_ns == stamp  # adopted as it was, not extracted again
    assert (folder / "captions_val2014.json").read_bytes() == (
        mini_coco.root / "annotations" / "captions_val2014.json").read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*mine, "captions_val2014.json", "instances_train2014.json", "instances_val2014.json", MARKER])


def test_a_member_name_with_another_size_is_an_error_and_the_file_is_left_alone(mini_coco, tmp_path, capsys):
    folder = tmp_path / "annotations"
    folder.mkdir()
    (folder / "captions_val2014.json").write_text('{"mine": true}')
    with ZipServer(mini_coco.zips) as server:
        code = main(["data", "coco2014", "--root", str(tmp_path), "--mirror", server.url, "--no-checksums",
                     "--no-images", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{folder / 'captions_val2014.json'} is 14 bytes" in err and "move it away" in err
    assert (folder / "captions_val2014.json").read_text() == '{"mine": true}'
    assert not (folder / MARKER).exists() and not (folder / "captions_train2014.json").exists()


def test_folder_holding_every_member_of_known_size_is_adopted_without_a_download(mini_coco, tmp_path):
    sizes = tuple((f"{kind}_{s}.json", (mini_coco.root / "annotations" / f"{kind}_{s}.json").stat().st_size)
                  for kind in ("captions", "instances") for s in ("train2014", "val2014"))
    known = dataclasses.replace(ANNOTATIONS2014, size=None, sha256=None, files=sizes)
    mine = user_annotations(tmp_path, mini_coco)
    val = tmp_path / "annotations" / "captions_val2014.json"
    val.write_text("{}")
    with ZipServer(mini_coco.zips) as server:
        with pytest.raises(AttncapError, match=f"{val} is 2 bytes but annotations_trainval2014.zip holds"):
            fetch_one(known, tmp_path, server.url, progress=False, **FAST)
        assert server.requests == [] and val.read_text() == "{}"  # a conflict stops before the download
        for name in ("captions_val2014.json", "instances_train2014.json", "instances_val2014.json"):
            (tmp_path / "annotations" / name).write_bytes((mini_coco.root / "annotations" / name).read_bytes())
        assert fetch_one(known, tmp_path, server.url, progress=False, **FAST) == tmp_path / "annotations"
        assert server.requests == []
    assert (tmp_path / "annotations" / MARKER).is_file() and not (tmp_path / "downloads").exists()
    assert all((tmp_path / "annotations" / n).read_bytes() == b for n, b in mine.items())


def test_server_without_content_length_is_resumed_not_deleted(mini_coco, tmp_path):
    data = mini_coco.zips["val2014.zip"]
    with ZipServer(mini_coco.zips) as server:
        server.no_length = True  # HTTP/1.0 bodies that end when the connection closes
        server.drop_first = {"val2014.zip", "train2014.zip"}
        # The known size tells a short body from a whole one: resumed with Range, the 206 appended.
        out = download(f"{server.url}/val2014.zip", tmp_path / "v.zip", len(data), progress=False, **FAST)
        assert server.requested("val2014.zip") == [None, f"bytes={len(data) // 2}-"]
        assert out.read_bytes() == data
        # Without a known size (--no-checksums) a zip cut short lacks its end record: resumed too.
        fetch(tmp_path / "root", server)
        train = mini_coco.zips["train2014.zip"]
        assert server.requested("train2014.zip") == [None, f"bytes={len(train) // 2}-"]
        assert_extracted(tmp_path / "root", mini_coco)
        # A part left by a killed run is completed from where it stops.
        (tmp_path / "k.zip.part").write_bytes(data[:1000])
        download(f"{server.url}/val2014.zip", tmp_path / "k.zip", len(data), progress=False, **FAST)
        assert server.requested("val2014.zip")[-1] == "bytes=1000-"
        assert (tmp_path / "k.zip").read_bytes() == data and not (tmp_path / "k.zip.part").exists()


def test_karpathy_folder_marked_by_an_older_attncap_gets_the_flickr_files(mini_coco, tmp_path):
    """A karpathy/ marked complete with dataset_coco.json only (attncap before Flickr support):
    the next run extracts the two Flickr files from the kept zip and leaves the rest alone."""
    with ZipServer(mini_coco.zips) as server:
        fetch(tmp_path, server, images=False)
        folder = tmp_path / "karpathy"
        for name in ("dataset_flickr8k.json", "dataset_flickr30k.json"):
            (folder / name).unlink()
        (folder / "dataset_coco.json").write_bytes(b"kept")  # were it re-extracted, its size would differ
        before = len(server.requests)
        with pytest.raises(AttncapError, match="dataset_coco.json is 4 bytes"):
            fetch(tmp_path, server, images=False)  # a file of another size is never overwritten
        (folder / "dataset_coco.json").write_bytes((mini_coco.root / "karpathy" / "dataset_coco.json").read_bytes())
        fetch(tmp_path, server, images=False)
        assert len(server.requests) == before  # the zip in downloads/ is reused
        assert (folder / MARKER).is_file()
        for name in ("dataset_flickr8k.json", "dataset_flickr30k.json"):
            assert (folder / name).read_bytes() == (mini_coco.root / "karpathy" / name).read_bytes()
