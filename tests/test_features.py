import json

import numpy as np
import pytest
import torch
from PIL import Image

from attncap import features as features_lib
from attncap.encoders import build_encoder
from attncap.errors import AttncapError
from attncap.features import FeatureStore, ImageItem, extract_features, verify_store
from attncap.images import load_image
from attncap.prepare import load_split


def items_of(run, split="val"):
    return [ImageItem(r["id"], r["file"]) for r in load_split(run / "data", split)]


def test_cached_features_equal_on_the_fly_features(prepared_run):
    store = FeatureStore.open(prepared_run / "features", "val")
    enc = store.encoder
    assert enc["name"] == "efficientnet_lite0" and enc["pretrained"] and store.array.dtype == np.float16
    encoder = build_encoder(enc["name"], enc["pretrained"], enc["colour_stats"], precision=enc["precision"])
    records = load_split(prepared_run / "data", "val")[:3]
    with torch.inference_mode():
        live = encoder(torch.stack([encoder.preprocess(load_image(r["file"])) for r in records]))
    cached = torch.from_numpy(np.stack([store[r["id"]] for r in records])).float()
    assert cached.shape == live.shape == (3, 49, 1280)
    torch.testing.assert_close(cached, live, atol=2e-2, rtol=1e-2)  # float16 storage


def test_small_store_is_reused_not_recomputed(prepared_run):
    path = prepared_run / "features" / "val.npy"
    before = path.stat().st_mtime_ns
    encoder = build_encoder("efficientnet_lite0", precision="auto")
    extract_features(encoder, items_of(prepared_run), prepared_run / "features", "val",
                     batch_size=16, workers=0, progress=False)
    assert path.stat().st_mtime_ns == before


def _bad_images(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    trunc = tmp_path / "trunc.jpg"
    Image.new("RGB", (64, 64), (0, 90, 200)).save(tmp_path / "full.jpg", quality=95)
    trunc.write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    return [ImageItem(1, str(good)), ImageItem(2, str(text)), ImageItem(3, str(tmp_path / "gone.jpg")),
            ImageItem(4, str(trunc)), ImageItem(5, str(tmp_path / "full.jpg"))]


def test_unreadable_images_are_skipped_listed_and_rows_kept(tmp_path, capsys):
    encoder = build_encoder("small_cnn")  # trainable: the store keeps resized pixels
    store = extract_features(encoder, _bad_images(tmp_path), tmp_path / "f", "x", batch_size=2,
                             workers=0, progress=False)
    failed = {f["image_id"]: f["reason"] for f in store.manifest["failed"]}
    assert set(failed) == {2, 3, 4}
    assert "notes.jpg" in failed[2] and "gone.jpg" in failed[3] and "trunc.jpg" in failed[4]
    assert store.array.shape == (5, 3, 128, 128) and store.array.dtype == np.uint8
    assert store[1][0].mean() > 150 and store[5][2].mean() > 150  # red image, blue image
    assert store[2].max() == 0
    assert "skipped 3 unreadable" in capsys.readouterr().out
    assert verify_store(tmp_path / "f", "x") == [
        f"image listed in the manifest is gone: {tmp_path / 'gone.jpg'}"]


def test_interrupted_extraction_resumes_to_the_same_store(prepared_run, tmp_path, monkeypatch):
    items = items_of(prepared_run)
    encoder = build_encoder("efficientnet_lite0", precision="auto")
    reference = extract_features(encoder, items, tmp_path / "ref", "val", batch_size=4, workers=0,
                                 progress=False)
    real_forward, calls = type(encoder).forward, {"n": 0}

    def failing_forward(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the third batch
        return real_forward(self, images)

    monkeypatch.setattr(type(encoder), "forward", failing_forward)
    with pytest.raises(KeyboardInterrupt):
        extract_features(encoder, items, tmp_path / "cut", "val", batch_size=4, workers=0, progress=False)
    state = json.loads((tmp_path / "cut" / "val.partial.json").read_text())
    assert state["batches"] == [0, 1] and not (tmp_path / "cut" / "val.npy").exists()
    monkeypatch.setattr(type(encoder), "forward", real_forward)
    real_loader, seen = features_lib.image_loader, []

    def loader(*args, batches=None, **kwargs):
        seen.append(list(batches))
        return real_loader(*args, batches=batches, **kwargs)
    monkeypatch.setattr(features_lib, "image_loader", loader)
    resumed = extract_features(encoder, items, tmp_path / "cut", "val", batch_size=4, workers=0,
                               progress=False)
    assert seen == [[2]]  # only the missing rows (8..11, the last batch) were encoded again
    np.testing.assert_array_equal(np.asarray(resumed.array), np.asarray(reference.array))
    assert not (tmp_path / "cut" / "val.partial.json").exists()


def test_damaged_store_is_a_clear_error(run_copy):
    (run_copy / "features" / "val.json").write_text("{oops")
    with pytest.raises(AttncapError, match="val.json"):
        FeatureStore.open(run_copy / "features", "val")
    (run_copy / "features" / "test.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(AttncapError, match="test.npy"):
        FeatureStore.open(run_copy / "features", "test")
