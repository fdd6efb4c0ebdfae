import pytest
import torch
from PIL import Image

from attncap.encoders import ColourStats, build_encoder
from attncap.errors import AttncapError


def test_inception_without_cached_weights_says_which_file_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(AttncapError) as err:
        build_encoder("inception_v3", pretrained=True, allow_download=False)
    msg = str(err.value)
    assert "inception_v3_google" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "--no-pretrained" in msg and "\n" not in msg


@pytest.mark.parametrize("name,size,grid,dim", [("inception_v3", 299, 8, 2048), ("resnet101", 224, 7, 2048),
                                                ("small_cnn", 128, 8, 256)])
def test_random_init_encoders_have_their_grid_and_are_reproducible(name, size, grid, dim):
    a = build_encoder(name, pretrained=False)
    b = build_encoder(name, pretrained=False)
    pixels = a.preprocess(Image.new("RGB", (50, 80), (10, 200, 30))).unsqueeze(0)
    assert pixels.shape == (1, 3, size, size) and pixels.dtype == torch.uint8
    a.eval(), b.eval()
    with torch.inference_mode():
        out = a(pixels)
        assert out.shape == (1, grid * grid, dim)
        torch.testing.assert_close(out, b(pixels))  # seeded: same weights when rebuilt


def test_unknown_encoder_and_precision():
    with pytest.raises(AttncapError, match="choose one of"):
        build_encoder("vgg")
    with pytest.raises(AttncapError, match="precision"):
        build_encoder("efficientnet_lite0", precision="fp8")


def test_colour_histogram_finds_the_red_quarter():
    image = Image.new("RGB", (224, 224), (128, 128, 128))
    image.paste((230, 20, 20), (0, 0, 112, 112))  # top-left quarter is saturated red
    enc = build_encoder("efficientnet_lite0", colour_stats=True)
    assert isinstance(enc, ColourStats) and enc.spec.dim == 1289
    hist = enc.histogram(enc.preprocess(image).unsqueeze(0), 2)[0] / ColourStats.SCALE  # (9, 2, 2)
    torch.testing.assert_close(hist.sum(0), torch.ones(2, 2))
    assert hist[8, 1, 1] == 1.0 and hist[8, 0, 0] == 0.0  # grey cell: all unsaturated
    assert hist[:8, 0, 0].max() == 1.0  # red cell: one hue bin holds every pixel


def test_frozen_efficientnet_runs_folded_and_equals_the_package_network():
    """Batch norm folded into the convolutions (attncap.folding) is the same network: outputs
    equal the package's own forward pass to float rounding, for pretrained weights, and weights
    loaded afterwards are folded afresh."""
    encoder = build_encoder("efficientnet_lite0", pretrained=True)
    trunk = encoder.backbone
    pixels = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        folded = encoder(pixels)                                             # (3, 49, 1280)
        assert len(trunk._folded) == 1                                       # the folded copy ran
        reference = trunk.net.extract_features(
            ((pixels.float() / 255.0 - 127.0 / 255.0) / (128.0 / 255.0)).contiguous(
                memory_format=torch.channels_last))                          # (3, 1280, 7, 7)
    reference = reference.flatten(2).transpose(1, 2)
    assert folded.shape == reference.shape == (3, 49, 1280)
    assert (folded - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert "_folded" not in "".join(encoder.state_dict())                    # never saved

    random = build_encoder("efficientnet_lite0", pretrained=False)
    with torch.inference_mode():
        before = random(pixels)
        random.load_state_dict(encoder.state_dict())
        assert not random.backbone._folded                                   # dropped on load
        after = random(pixels)
    assert not torch.allclose(before, after)
    assert torch.equal(after, folded)


def test_image_size_changes_the_input_and_the_grid_and_bad_sizes_are_refused():
    """encoder.image_size: a fully convolutional encoder at 192 px reads 192 px pixels and gives a
    6x6 grid (36 regions), the colour histogram pooled to the same grid; sizes that are not a
    multiple of the stride, and encoders with a fixed input, are one-line config errors."""
    from attncap.config import EncoderConfig

    enc = build_encoder("efficientnet_lite0", colour_stats=True, image_size=192)
    assert (enc.spec.image_size, enc.spec.grid, enc.spec.dim) == (192, 6, 1289)
    pixels = enc.preprocess(Image.new("RGB", (300, 200), (230, 20, 20))).unsqueeze(0)
    assert pixels.shape == (1, 3, 192, 192)
    with torch.inference_mode():
        assert enc(pixels).shape == (1, 36, 1289)
    assert build_encoder("small_cnn", image_size=96).spec.grid == 6
    assert EncoderConfig(image_size=192).image_size == 192
    for name, size, allowed in [("efficientnet_lite0", 200, "a multiple of 32"),
                                ("inception_v3", 320, "its input size is fixed")]:
        with pytest.raises(AttncapError, match=allowed) as err:
            EncoderConfig(name=name, image_size=size)
        assert str(err.value).startswith("encoder.image_size must be") and "\n" not in str(err.value)
        with pytest.raises(AttncapError, match=allowed):
            build_encoder(name, pretrained=False, image_size=size)
