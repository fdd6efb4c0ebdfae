"""EfficientNet-Lite for inference: batch norm folded into the convolutions, ReLU6 in place.

The frozen encoder is the largest stage of the demo on a CPU without bfloat16 (issue 11). In the
package's eager module only about a third of the time is convolution: every convolution is
followed by a separate batch-norm pass, ReLU6 allocates a new tensor, and each "same" padding
copies its input into a larger zero tensor, even where the padding is symmetric and the
convolution could pad by itself. Here each ``conv -> BN`` pair becomes one convolution with
``w * gamma / sqrt(var + eps)`` and a bias, symmetric padding moves into the convolution, and the
activations are clamped in place, so the same network reads and writes each activation about a
third as often. The result equals the package's forward pass to float rounding (about 1e-5 of
the largest activation; ``tests/test_encoders.py``).

Only frozen, eval-mode use goes through it: a trained or fine-tuned network keeps its own modules,
and the folded copy is rebuilt whenever weights are loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FoldedConv(nn.Module):
    """``bn(conv(x))`` as one convolution, optionally followed by ReLU6 in place."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)          # (C_out,)
        weight = conv.weight * scale.view(-1, 1, 1, 1)                   # (C_out, C_in/g, k, k)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        self.register_buffer("weight", weight.detach().clone(), persistent=False)
        self.register_buffer("bias", bias.detach().clone(), persistent=False)
        self.stride, self.groups = tuple(conv.stride), conv.groups
        pad = getattr(conv, "static_padding", None)                      # TensorFlow "same" padding
        left, right, top, bottom = tuple(pad.padding) if isinstance(pad, nn.ZeroPad2d) else (0,) * 4
        symmetric = left == right and top == bottom
        self.pre_pad = None if symmetric else (left, right, top, bottom)  # stride 2: one more at the end
        self.padding = (top, left) if symmetric else (0, 0)

    def forward(self, x: torch.Tensor, relu6: bool = True) -> torch.Tensor:
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad)
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return x.clamp_(0.0, 6.0) if relu6 else x


class FoldedBlock(nn.Module):
    """One MBConv block (expand, depthwise, project, skip) of EfficientNet-Lite, folded."""

    def __init__(self, block: nn.Module):
        super().__init__()
        args = block._block_args
        if block.has_se:
            raise ValueError("EfficientNet-Lite blocks have no squeeze-and-excitation; cannot fold this one")
        self.expand = FoldedConv(block._expand_conv, block._bn0) if args.expand_ratio != 1 else None
        self.depthwise = FoldedConv(block._depthwise_conv, block._bn1)
        self.project = FoldedConv(block._project_conv, block._bn2)
        self.skip = block.id_skip and args.stride == 1 and args.input_filters == args.output_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y), relu6=False)
        return y.add_(x) if self.skip else y


class FoldedLite(nn.Module):
    """The package's ``EfficientNet.extract_features`` (stem, blocks, head), folded: (B, 3, S, S)
    normalised images -> (B, 1280, S/32, S/32); without the head, the last block's (B, 320, ...)."""

    def __init__(self, net: nn.Module, head: bool = True):
        super().__init__()
        self.stem = FoldedConv(net._conv_stem, net._bn0)
        self.blocks = nn.ModuleList(FoldedBlock(b) for b in net._blocks)
        self.head = FoldedConv(net._conv_head, net._bn1) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x) if self.head is not None else x


@torch.no_grad()
def fold_lite(net: nn.Module, head: bool = True) -> FoldedLite:
    """A folded copy of an EfficientNet-Lite network in eval mode, on its device, channels-last."""
    return FoldedLite(net, head).eval().to(memory_format=torch.channels_last)
