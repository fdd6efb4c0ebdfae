"""`attncap import sgrvinod`: a checkpoint in exactly that repository's format, built here.

The test defines classes at the module paths ``models.Encoder``, ``models.DecoderWithAttention``
and ``models.Attention`` with that repository's attribute names (small dimensions, and a ResNet
with one Bottleneck per stage instead of ResNet-101), pickles them whole with ``torch.save`` in
both formats, then removes ``models`` so the import cannot use it. What attncap decodes is checked
against a plain re-implementation of that repository's decoding equations on those objects.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import attncap
from attncap.cli import main
from attncap.decoding import greedy, options
from attncap.errors import AttncapError
from attncap.serve import ServeLimits, background_server, create_app
from attncap.sgrvinod import read_checkpoint

WORDS = ["a", "dog", "cat", "on", "the", "grass", "red", "ball", "sits", "with"]
E, A, H, D = 12, 10, 16, 2048


# --- that repository's classes, re-typed here with its attribute names --------------------------

class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc_image_size = 14
        self.resnet = nn.Sequential(*list(ResNet(Bottleneck, [1, 1, 1, 1]).children())[:-2])
        self.adaptive_pool = nn.AdaptiveAvgPool2d((14, 14))

    def forward(self, images):
        return self.adaptive_pool(self.resnet(images)).permute(0, 2, 3, 1)  # (B, 14, 14, 2048)


class Attention(nn.Module):
    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)


class DecoderWithAttention(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.encoder_dim, self.attention_dim, self.embed_dim, self.decoder_dim = D, A, E, H
        self.vocab_size = vocab_size
        self.dropout = 0.5
        self.attention = Attention(D, H, A)
        self.embedding = nn.Embedding(vocab_size, E)
        self.dropout = nn.Dropout(p=self.dropout)
        self.decode_step = nn.LSTMCell(E + D, H, bias=True)
        self.init_h = nn.Linear(D, H)
        self.init_c = nn.Linear(D, H)
        self.f_beta = nn.Linear(H, D)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(H, vocab_size)


def word_map() -> dict[str, int]:
    """Its create_input_files: words 1..n, then <unk>, <start>, <end>; <pad> 0."""
    wm = {w: i + 1 for i, w in enumerate(WORDS)}
    for special in ("<unk>", "<start>", "<end>"):
        wm[special] = len(wm) + 1
    wm["<pad>"] = 0
    return wm


def reference_greedy(decoder, encoder_out, wm, max_len):
    """Its caption.py equations, one image, greedy; the words attncap never writes are masked
    (<pad>, <start>, <unk>; <end> as the first word, decode.min_len 1)."""
    enc = encoder_out.reshape(1, -1, D)                                         # (1, R, D)
    h, c = decoder.init_h(enc.mean(1)), decoder.init_c(enc.mean(1))
    word, words, alphas = wm["<start>"], [], []
    for t in range(max_len):
        att = decoder.attention
        scores = att.full_att(torch.relu(att.encoder_att(enc) + att.decoder_att(h)[:, None])).squeeze(2)
        alpha = torch.softmax(scores, 1)                                         # (1, R)
        awe = torch.sigmoid(decoder.f_beta(h)) * (enc * alpha[:, :, None]).sum(1)
        h, c = decoder.decode_step(torch.cat([decoder.embedding(torch.tensor([word])), awe], 1), (h, c))
        logp = torch.log_softmax(decoder.fc(h), 1)[0]
        logp[[wm["<pad>"], wm["<start>"], wm["<unk>"]]] = -float("inf")
        if t == 0:
            logp[wm["<end>"]] = -float("inf")
        word = int(logp.argmax())
        if word == wm["<end>"]:
            break
        words.append(word)
        alphas.append(alpha[0])
    return words, torch.stack(alphas) if alphas else torch.zeros(0, enc.shape[1])


def reference_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, 256, 256) -> its caption.py input: /255, ImageNet mean and std."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Both checkpoint formats and the word map on disk, and the original objects."""
    folder = tmp_path_factory.mktemp("sgrvinod")
    module = types.ModuleType("models")
    for cls in (Encoder, Attention, DecoderWithAttention):
        cls.__module__ = "models"
        setattr(module, cls.__name__, cls)
    torch.manual_seed(0)
    encoder, decoder = Encoder().eval(), DecoderWithAttention(len(word_map())).eval()
    with torch.no_grad():  # decisive scores: no near-ties for float rounding to flip
        decoder.fc.weight.mul_(8.0)
        decoder.attention.full_att.weight.mul_(4.0)
    decoder_optimizer = torch.optim.Adam(decoder.parameters(), 4e-4)
    sum(p.sum() for p in decoder.parameters()).backward()
    decoder_optimizer.step()  # Adam state keyed by the decoder's own parameters, as after training
    decoder_optimizer.zero_grad(set_to_none=True)
    state = {"epoch": 3, "epochs_since_improvement": 0, "bleu-4": 0.2315, "encoder": encoder,
             "decoder": decoder, "encoder_optimizer": torch.optim.Adam(encoder.parameters(), 1e-4),
             "decoder_optimizer": decoder_optimizer}
    sys.modules["models"] = module
    try:
        torch.save(state, folder / "zip.pth.tar")
        counters = [m._buffers.pop("num_batches_tracked") for m in encoder.modules()
                    if isinstance(m, nn.BatchNorm2d)]  # as torch 0.4.0 saved them: no counter
        torch.save(state, folder / "legacy.pth.tar", _use_new_zipfile_serialization=False)
        assert counters
    finally:
        del sys.modules["models"]
    (folder / "WORDMAP_test.json").write_text(json.dumps(word_map()))
    return folder, encoder, decoder


@pytest.fixture(scope="module")
def imported(published, tmp_path_factory) -> dict[str, Path]:
    folder, _, _ = published
    out = tmp_path_factory.mktemp("imported")
    for fmt in ("zip", "legacy"):
        assert main(["import", "sgrvinod", str(folder / f"{fmt}.pth.tar"),
                     str(folder / "WORDMAP_test.json"), "--out", str(out / fmt)]) == 0
    return {"zip": out / "zip", "legacy": out / "legacy"}


def photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (300, 340, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_greedy_words_and_every_attention_equal_its_equations(published, imported, fmt):
    _, _, decoder = published
    cap = attncap.load(imported[fmt], device="cpu")
    wm = word_map()
    features = torch.rand(3, 196, D, generator=torch.Generator().manual_seed(1)) * 2  # (B, R, D)
    got = greedy(cap.model, features, cap.vocab.start, cap.vocab.end, 12,
                 **options(cap.cfg.decode, cap.vocab.unk))
    inverse = {w: i for i, w in enumerate(cap.vocab.words)}
    names = {i: w for w, i in wm.items()}
    order = [wm[w] for w in cap.vocab.words]  # attncap id -> its id
    lengths = []
    with torch.no_grad():
        for b in range(3):
            words, alphas = reference_greedy(decoder, features[b], wm, 12)
            assert [order[t] for t in got[b].tokens] == words
            assert [inverse[names[w]] for w in words] == got[b].tokens
            np.testing.assert_allclose(got[b].alphas, alphas.numpy(), atol=1e-5)
            lengths.append(len(words))
    assert max(lengths) >= 3  # the captions say something


def test_encoder_weights_and_preprocessing_round_trip(published, imported):
    _, encoder, decoder = published
    cap = attncap.load(imported["zip"], device="cpu")
    image = photo(0)
    pixels = cap.pixels(image)                                                   # (3, 256, 256)
    expected = torch.from_numpy(np.array(image.resize((256, 256), Image.Resampling.BILINEAR))).permute(2, 0, 1)
    assert torch.equal(pixels, expected)
    with torch.no_grad():
        reference = encoder(reference_pixels(pixels[None])).reshape(1, -1, D)    # (1, 196, 2048)
        ours = cap.features([image])
        np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-4, atol=1e-4)
        best = cap.caption(image, beam_size=1)[0][0]
        words, alphas = reference_greedy(decoder, reference, word_map(), cap.cfg.decode.max_len)
    names = {i: w for w, i in word_map().items()}
    assert best.words == [names[w] for w in words]
    np.testing.assert_allclose(best.attention, alphas.reshape(-1, 14, 14).numpy(), atol=1e-4)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("target", ["posix.system", "builtins.eval"])
def test_a_foreign_global_is_refused_and_nothing_runs(published, tmp_path, fmt, target):
    _, encoder, decoder = published
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            if target == "posix.system":
                import os
                return os.system, (f"touch {marker}",)
            return eval, (f"open({str(marker)!r}, 'w').close()",)

    module = types.ModuleType("models")
    module.Encoder, module.DecoderWithAttention, module.Attention = Encoder, DecoderWithAttention, Attention
    sys.modules["models"] = module
    try:
        path = tmp_path / "evil.pth.tar"
        torch.save({"encoder": encoder, "decoder": decoder, "note": Payload()}, path,
                   _use_new_zipfile_serialization=fmt == "zip")
        torch.load(path, weights_only=False)  # what plain unpickling does: the payload runs
    finally:
        del sys.modules["models"]
    assert marker.exists()
    marker.unlink()
    with pytest.raises(AttncapError, match=f"names {target}, which is") as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value) and not marker.exists()
    word_map_file = published[0] / "WORDMAP_test.json"
    assert main(["import", "sgrvinod", str(path), str(word_map_file), "--out", str(tmp_path / "o")]) == 2
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_wrong_word_map_and_non_checkpoints_are_one_line_errors(published, tmp_path):
    folder = published[0]
    small = tmp_path / "wm.json"
    small.write_text(json.dumps({"<pad>": 0, "a": 1, "<unk>": 2, "<start>": 3, "<end>": 4}))
    with pytest.raises(AttncapError, match="word map has 5 words but the checkpoint's embedding 14"):
        attncap.sgrvinod.import_checkpoint(folder / "zip.pth.tar", small, tmp_path / "o")
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(AttncapError, match="cannot be read as a torch.save file"):
        read_checkpoint(junk)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(AttncapError, match="is not sgrvinod's"):
        read_checkpoint(tmp_path / "plain.pt")


def test_caption_export_onnx_and_serve_use_the_imported_folder(published, imported, tmp_path, capsys):
    model_dir = imported["legacy"]
    image_path = tmp_path / "photo.png"
    photo(3).save(image_path)
    cap = attncap.load(model_dir, device="cpu")
    expected = cap.caption(image_path, beam_size=1)[0][0].caption
    capsys.readouterr()
    assert main(["caption", str(image_path), "--run", str(model_dir), "--beam", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"{image_path}: {expected}"

    assert main(["export", str(model_dir), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    encode, step = (ort.InferenceSession(str(tmp_path / "onnx" / n), providers=["CPUExecutionProvider"])
                    for n in ("encode.onnx", "step.onnx"))
    features = cap.features([photo(3)])                                          # (1, 196, 2048)
    regions, keys, h, c = encode.run(None, {"features": features.numpy()})
    words = np.full((1,), cap.vocab.start, dtype=np.int64)
    logp, alpha, _, _ = step.run(None, {"words": words, "h": h, "c": c, "regions": regions, "keys": keys})
    with torch.no_grad():
        memory = cap.model.encode(features)
        ref_logp, ref_alpha, _ = cap.model.step(memory, cap.model.init_state(memory), torch.from_numpy(words))
    np.testing.assert_allclose(logp, ref_logp.numpy(), atol=1e-4)
    np.testing.assert_allclose(alpha, ref_alpha.numpy(), atol=1e-5)

    assert main(["export", str(model_dir), "--format", "folder", "--out", str(tmp_path / "folder")]) == 0
    again = attncap.load(tmp_path / "folder", device="cpu")
    assert again.caption(image_path, beam_size=1)[0][0].caption == expected

    with background_server(create_app(cap, ServeLimits(max_wait_ms=5))) as url:
        r = httpx.post(f"{url}/caption", params={"beam_size": 1}, content=image_path.read_bytes(),
                       headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["caption"] == expected and r.json()["grid"] == 14
        assert httpx.get(f"{url}/").status_code == 200
