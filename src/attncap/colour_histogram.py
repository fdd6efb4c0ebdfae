"""Per-cell colour histograms of uint8 images: what :class:`attncap.encoders.ColourStats` appends
to each region (docs/design.md, "Colour histograms for the shapes world").

Each pixel falls in one of 8 hue bins where it is saturated, or a ninth bin otherwise; a cell's
histogram is the share of its pixels in each bin. The demo's 9,000 images go through this once
each, so it is written for speed without changing a bit (docs/performance.md): a pixel's bin is
read from a table of all 2**24 colours, built once per process from the same formula, and the
shares are counts of (image, cell, bin) triples instead of pooled one-hot planes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

BINS = 9
TABLE_AFTER = 8 * 224 * 224            # pixels in a batch that make building the table pay
_tables: dict[str, torch.Tensor] = {}  # device -> the bin of every 24-bit colour (16 MiB)


def shares(images: torch.Tensor, grid: int) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> each cell's share of pixels per bin: (B, 9, g, g)."""
    B, _, S, _ = images.shape
    cell = S // grid
    if S % grid or cell & (cell - 1) or torch.jit.is_tracing() or torch.compiler.is_compiling():
        # uneven or non-power-of-two cells (inception's 299 px), or a traced or exported graph
        # (ONNX: no 16 MiB table in it): pool one-hots
        onehot = nn.functional.one_hot(colour_bins(images), BINS).permute(0, 3, 1, 2).float()
        return nn.functional.adaptive_avg_pool2d(onehot, grid)               # (B, 9, g, g)
    # Count (image, cell, bin) triples: the same shares as pooling the one-hots (a count over a
    # power-of-two number of pixels divides exactly), several times faster.
    bins = _bins_of(images)                                                  # (B, S, S)
    cells = torch.arange(S, device=images.device) // cell                    # (S,)
    key = (cells[:, None] * grid + cells[None, :]) * BINS                    # (S, S)
    key = key + (torch.arange(B, device=images.device) * (grid * grid * BINS)).view(B, 1, 1)
    counts = torch.bincount((key + bins).flatten(), minlength=B * grid * grid * BINS)
    return counts.view(B, grid, grid, BINS).permute(0, 3, 1, 2).float() / (cell * cell)


def colour_bins(images: torch.Tensor) -> torch.Tensor:
    """Each pixel's bin: 0-7 by hue where saturated, 8 otherwise. uint8 (..., 3, H, W) -> (..., H, W)."""
    x = images.float() / 255.0                                               # (B, 3, S, S)
    top, _ = x.max(-3)
    low, _ = x.min(-3)
    chroma = top - low
    saturated = (chroma > 0.25) & (top > 0.2)                                # (B, S, S)
    r, g, b = x.unbind(-3)
    hue = torch.atan2(1.7320508 * (g - b), 2 * r - g - b)                    # (-pi, pi]
    hue_bin = ((hue + np.pi) / (2 * np.pi) * 8).long().clamp(0, 7)
    return torch.where(saturated, hue_bin, torch.full_like(hue_bin, 8))


def colour_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The bin of every colour ``(r << 16) | (g << 8) | b``: uint8 (2**24,)."""
    code = torch.arange(1 << 24, device=device, dtype=torch.int32)
    rgb = torch.stack([code >> 16, (code >> 8) & 255, code & 255]).to(torch.uint8)  # (3, 2**24)
    return torch.cat([colour_bins(part.unsqueeze(-1)).flatten()
                      for part in rgb.split(1 << 20, 1)]).to(torch.uint8)


def _bins_of(images: torch.Tensor) -> torch.Tensor:
    """:func:`colour_bins` by table lookup (the same bins) for batches large enough to pay for
    building the table (about 1 s, once per process and device)."""
    device = str(images.device)
    if device not in _tables and images[:, 0].numel() < TABLE_AFTER:
        return colour_bins(images)
    if device not in _tables:
        _tables[device] = colour_table(images.device)
    rgb = images.int()
    return _tables[device][(rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]].long()
