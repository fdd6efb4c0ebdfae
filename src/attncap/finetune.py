"""Fine-tuning a pretrained encoder end to end with the decoder (``encoder.fine_tune``).

With ``encoder.fine_tune`` = N the last N blocks of the backbone (see :data:`BLOCKS`; as many as
it has = all) train with the decoder at their own learning rate ``train.encoder_lr``, on the same warm-up and
cosine schedule; the other blocks stay frozen. Batch norms keep their ImageNet running statistics
(eval mode, re-asserted on every ``train()``); the affine weights of the trained blocks train.
The feature store then holds the resized pixels, as for ``small_cnn``, the captioner owns the
encoder, and its checkpoints hold the fine-tuned weights (``encoder.*`` in ``model.safetensors``).

This module imports no encoder: :mod:`attncap.encoders` calls :func:`fine_tune` from
``build_encoder``, and the training loop takes its optimizer groups from :func:`param_groups`.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import RunConfig, TrainConfig
from .errors import AttncapError


def _stem_and(stem: list[nn.Module], rest: list[nn.Module]) -> list[nn.Module]:
    return [nn.ModuleList(stem), *rest]


# The blocks of each backbone, input to output, that encoder.fine_tune counts from the top
# (config.FINE_TUNE_BLOCKS holds their numbers): a ResNet's stem and four stages (sgrvinod's
# tutorial trains the last three), Inception's stem and eleven Mixed blocks, EfficientNet-Lite's
# stem, sixteen MBConv blocks and 1x1 head. Each takes the encoder's ``backbone``.
BLOCKS = {
    "resnet101": lambda trunk: _stem_and(list(trunk)[:4], list(trunk)[4:]),
    "resnet101_sgrvinod": lambda trunk: _stem_and(list(trunk.resnet)[:4], list(trunk.resnet)[4:]),
    "inception_v3": lambda trunk: _stem_and(list(trunk.layers)[:7], list(trunk.layers)[7:]),
    "efficientnet_lite0": lambda trunk: _stem_and(
        [trunk.net._conv_stem, trunk.net._bn0],
        [*trunk.net._blocks,
         *([nn.ModuleList([trunk.net._conv_head, trunk.net._bn1])] if trunk.head else [])]),  # encoder.head
}


def trainable_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's blocks in input-to-output order (see :data:`BLOCKS`), through ColourStats."""
    inner = getattr(encoder, "inner", encoder)  # ColourStats wraps the CNN; its histogram has no weights
    if inner.spec.name not in BLOCKS:
        raise AttncapError(f"encoder {inner.spec.name} has no pretrained blocks to fine-tune; "
                           "leave encoder.fine_tune at 0")
    return BLOCKS[inner.spec.name](inner.backbone)


def fine_tune(encoder: nn.Module, blocks: int) -> nn.Module:
    """Make an encoder trainable end to end: its last ``blocks`` blocks get gradients, the others
    stay frozen, and every batch norm keeps its running statistics. Returns it in train mode (its
    batch norms in eval mode)."""
    chosen = trainable_blocks(encoder)
    if not 1 <= blocks <= len(chosen):
        raise AttncapError(f"encoder.fine_tune must be from 1 to {len(chosen)} with encoder "
                           f"{encoder.spec.name} to fine-tune it, got {blocks}")
    encoder.requires_grad_(False)
    for block in chosen[-blocks:]:
        block.requires_grad_(True)
    for module in {id(m): m for m in (encoder, getattr(encoder, "inner", encoder))}.values():
        module.spec = dataclasses.replace(module.spec, trainable=True)  # the store holds pixels
        module.fine_tune, module.frozen_batchnorm = blocks, True
    return encoder.train()


def fine_tuned(model: nn.Module) -> bool:
    """Whether the captioner holds a pretrained encoder whose blocks train (not ``small_cnn``)."""
    return getattr(model.encoder, "fine_tune", 0) != 0


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Adam's parameter groups: the decoder (and ``small_cnn``) at the optimizer's own rate
    (``train.lr``), then, when fine-tuning, the encoder's trained blocks at ``train.encoder_lr``.
    One group only otherwise, so a frozen or ``small_cnn`` run's optimizer is the one it was."""
    if not fine_tuned(model):
        return [{"params": list(model.parameters())}]
    encoder = {id(p) for p in model.encoder.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in encoder]},
            {"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": cfg.encoder_lr}]


def check_store(cfg: RunConfig, info: dict, store: str) -> None:
    """Refuse to train with an ``encoder.fine_tune`` or ``encoder.image_size`` other than the one
    the feature store was made for: frozen features, pixels and other sizes are different stores."""
    made = info.get("fine_tune", 0)  # stores of frozen encoders do not record it
    if cfg.encoder.fine_tune != made:
        raise AttncapError(f"encoder.fine_tune is {cfg.encoder.fine_tune} but the feature store {store} "
                           f"was made with {made}: run `attncap features` with this config first")
    if cfg.encoder.head != info.get("head", True):
        raise AttncapError(f"encoder.head is {str(cfg.encoder.head).lower()} but the feature store {store} "
                           "was made otherwise: run `attncap features` with this config first")
    size = cfg.encoder.image_size
    if size and size != info.get("image_size"):
        raise AttncapError(f"encoder.image_size is {size} but the feature store {store} was made at "
                           f"{info.get('image_size')} px: run `attncap features` with this config first")
