"""Export: ONNX graphs that match PyTorch and decode the same captions; a model folder that loads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

import attncap
from attncap.cli import main
from attncap.decoding import greedy
from attncap.errors import AttncapError
from attncap.images import load_image
from attncap.model import Memory, State
from attncap.predict import Predictor


@pytest.fixture(scope="module")
def predictor(trained_run) -> Predictor:
    return Predictor.from_run(trained_run, "best")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    for fmt in ("onnx", "folder"):
        assert main(["export", str(trained_run), "--format", fmt, "--out", str(out / fmt)]) == 0
    return {"onnx": out / "onnx", "folder": out / "folder"}


@pytest.fixture(scope="module")
def sessions(exported):
    return [ort.InferenceSession(str(exported["onnx"] / name), providers=["CPUExecutionProvider"])
            for name in ("encode.onnx", "step.onnx")]


@pytest.fixture(scope="module")
def images(trained_run):
    return [load_image(p) for p in sorted((trained_run / "dataset" / "images").glob("*.jpg"))[:5]]


def test_onnx_graphs_equal_pytorch_within_1e_4(predictor, sessions):
    encode, step = sessions
    model = predictor.model
    gen = torch.Generator().manual_seed(0)
    features = torch.rand(3, 49, model.feature_dim, generator=gen) * 4  # batch 3: export used 2
    ours = encode.run(None, {"features": features.numpy()})
    with torch.no_grad():
        memory = model.encode(features)
        state = model.init_state(memory)
        expected = [*memory, *state]
        for got, want in zip(ours, expected):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
        words = torch.randint(4, model.vocab_size, (3,), generator=gen)
        log_probs, alpha, new = model.step(Memory(*expected[:2]), State(*expected[2:]), words)
    regions, keys, h, c = ours
    got = step.run(None, {"words": words.numpy(), "h": h, "c": c, "regions": regions, "keys": keys})
    for a, b in zip(got, [log_probs, alpha, new.h, new.c]):
        assert a.shape == tuple(b.shape)
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=0)


def ort_greedy(sessions, features: np.ndarray, interface: dict, max_len: int) -> list[list[int]]:
    """Greedy decoding with ONNX Runtime and numpy only, as the export's README describes it."""
    encode, step = sessions
    ids = interface["special_ids"]
    regions, keys, h, c = encode.run(None, {"features": features})
    words = np.full(len(features), ids["start"], dtype=np.int64)
    out, done = [[] for _ in features], np.zeros(len(features), bool)
    for _ in range(max_len):
        log_probs, _, h, c = step.run(None, {"words": words, "h": h, "c": c, "regions": regions, "keys": keys})
        log_probs[:, [ids[name] for name in interface["mask_before_choosing"]]] = -np.inf
        if interface["mask_unk"]:
            log_probs[:, ids["unk"]] = -np.inf
        words = log_probs.argmax(1)
        for b in np.flatnonzero(~done):
            if words[b] != ids["end"]:
                out[b].append(int(words[b]))
        done |= words == ids["end"]
        if done.all():
            break
    return out


def test_onnx_greedy_loop_gives_the_captions_of_attncap_greedy(predictor, sessions, exported, images):
    interface = json.loads((exported["onnx"] / "onnx.json").read_text())
    features = predictor.features(images)  # (B, R, D) from the real encoder
    vocab = predictor.vocab
    assert interface["mask_unk"] and "trigram" in interface["block_trigrams"]  # decode.allow_unk false
    expected = greedy(predictor.model, features, vocab.start, vocab.end, max_len=12, banned=(vocab.unk,))
    got = ort_greedy(sessions, features.numpy(), interface, max_len=12)
    assert got == [c.tokens for c in expected]
    assert all(len(t) > 0 for t in got)
    names = json.loads((exported["onnx"] / "vocab.json").read_text())["words"]
    assert [" ".join(names[i] for i in t) for t in got] == [" ".join(vocab.decode(c.tokens)) for c in expected]


def test_model_folder_loads_back_and_captions_the_same(trained_run, exported, predictor, images):
    folder = exported["folder"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "attncap-export.json", "config.json",
                                                      "encoder.safetensors",
                                                      "model.safetensors", "vocab.json"]  # no pickles
    original = load_file(str(trained_run / "checkpoints" / "best" / "model.safetensors"))
    copied = load_file(str(folder / "model.safetensors"))
    assert original.keys() == copied.keys() and all(torch.equal(original[k], copied[k]) for k in original)
    card = (folder / "README.md").read_text()
    assert "attncap.load" in card and "efficientnet_lite0" in card
    loaded = attncap.load(folder)
    assert isinstance(loaded, Predictor)
    torch.testing.assert_close(loaded.features(images), predictor.features(images), atol=0, rtol=0)
    expected = [p[0].caption for p in predictor.caption(images)]
    assert [p[0].caption for p in loaded.caption(images)] == expected
    for source in (trained_run, trained_run / "checkpoints" / "latest"):
        assert attncap.load(source).vocab == predictor.vocab


def test_load_and_export_errors_name_the_file(exported, tmp_path, trained_run):
    with pytest.raises(AttncapError, match="no model in .*nowhere"):
        attncap.load(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in exported["folder"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "encoder.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AttncapError, match="encoder.safetensors"):
        attncap.load(broken)
    assert main(["export", str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
