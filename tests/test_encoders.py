import pytest
import torch
from PIL import Image

from attncap import colour_histogram
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


@pytest.mark.parametrize("size,grid", [(224, 7), (192, 6), (128, 8), (299, 8)])
def test_colour_histogram_by_counts_and_table_equals_pooled_one_hots(size, grid, monkeypatch):
    """The histogram counts (image, cell, bin) triples and reads each pixel's bin from a table of
    every colour; both give exactly the one-hots' average pool of the formula (the features, and
    the demo's scores, do not change); uneven cells (299 px) pool the one-hots."""
    pixels = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    pixels[0, :, : size // 2] = torch.tensor([230, 20, 20], dtype=torch.uint8).view(3, 1, 1)
    onehot = torch.nn.functional.one_hot(colour_histogram.colour_bins(pixels), ColourStats.BINS)
    expected = torch.nn.functional.adaptive_avg_pool2d(onehot.permute(0, 3, 1, 2).float(), grid) * ColourStats.SCALE
    stats = ColourStats(build_encoder("small_cnn"))
    assert torch.equal(stats.histogram(pixels, grid), expected)               # formula, counted
    monkeypatch.setattr(colour_histogram, "TABLE_AFTER", 0)
    assert torch.equal(stats.histogram(pixels, grid), expected)               # table, counted
    counted = size % grid == 0 and (size // grid) & (size // grid - 1) == 0  # power-of-two cells
    assert ("cpu" in colour_histogram._tables) or not counted


def test_the_colour_table_holds_the_formulas_bin_for_every_colour():
    """All 2**24 colours, binned as images of another shape (other vector and tail splits than
    the table's own chunks), give the table's bins."""
    table = colour_histogram.colour_table()
    code = torch.arange(1 << 24, dtype=torch.int32)
    rgb = torch.stack([code >> 16, (code >> 8) & 255, code & 255]).to(torch.uint8)  # (3, 2**24)
    for lo in range(0, 1 << 24, 1 << 21):
        part = rgb[:, lo:lo + (1 << 21)].reshape(3, 1 << 11, 1 << 10)           # a 2048 x 1024 image
        assert torch.equal(colour_histogram.colour_bins(part).flatten(), table[lo:lo + (1 << 21)].long())


def test_an_exported_histogram_pools_one_hots_with_no_table_and_gives_the_same_shares():
    """torch.export (what the ONNX export runs) takes the one-hot path: no 2**24 table in the graph."""
    stats = ColourStats(build_encoder("small_cnn")).eval()
    pixels = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)

    class Histogram(torch.nn.Module):
        def forward(self, x):
            return stats.histogram(x, 8)

    program = torch.export.export(Histogram(), (pixels,))
    assert not any("bincount" in str(node.target) for node in program.graph.nodes)
    assert torch.equal(program.module()(pixels), stats.histogram(pixels, 8))


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


def test_a_headless_efficientnet_gives_its_last_block_folded_or_not_and_others_refuse():
    """encoder.head = false: EfficientNet-Lite0 stops before its 1x1 head convolution, 320
    channels (plus the histogram) instead of 1280; the folded copy and the trainable path give the
    package's last-block output; the head's weights are neither used nor saved; encoders without
    a head refuse the setting in one line."""
    from attncap.config import EncoderConfig

    encoder = build_encoder("efficientnet_lite0", colour_stats=True, head=False)
    assert (encoder.spec.grid, encoder.spec.dim, encoder.spec.head) == (7, 329, False)
    assert not any(".net._conv_head." in k or ".net._bn1." in k for k in encoder.state_dict())
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    net = build_encoder("efficientnet_lite0").backbone.net                   # the whole package network
    x = ((pixels.float() / 255.0 - 127.0 / 255.0) / (128.0 / 255.0)).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        folded = encoder(pixels)[:, :, :320]                                 # (2, 49, 320)
        unfolded = encoder.inner.backbone._extract(x).flatten(2).transpose(1, 2)
        y = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            y = block(y)
    reference = y.flatten(2).transpose(1, 2)                                 # (2, 49, 320)
    assert reference.min() < 0                                               # linear: not clipped like the head's
    assert (folded - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert torch.equal(unfolded, reference)
    with pytest.raises(AttncapError, match="encoder.head must be true with encoder resnet101") as err:
        EncoderConfig(name="resnet101", head=False)
    assert "\n" not in str(err.value)
    with pytest.raises(AttncapError, match="no head convolution"):
        build_encoder("small_cnn", head=False)
    from attncap.config import RunConfig
    from attncap.finetune import check_store, trainable_blocks

    assert len(trainable_blocks(encoder)) == 17                              # stem and 16 blocks, no head
    cfg = RunConfig()
    with pytest.raises(AttncapError, match="encoder.head is true but the feature store S was made otherwise"):
        check_store(cfg, {"head": False}, "S")
    check_store(cfg, {}, "S")                                                # stores with a head never say so
