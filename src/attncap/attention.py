"""Bahdanau attention over the image regions, and the memory it reads.

``score_r = v . tanh(W_k region_r + W_q h)`` (the seed's and the paper's), computed in the sigmoid
form, or ``w . relu(W_k region_r + W_q h)`` (sgrvinod's tutorial); ``alpha = softmax(score)``,
``context = sum_r alpha_r region_r``. Shapes: B rows, R regions, P projected dim, A attention dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Memory(NamedTuple):
    """What the decoder reads at every step; computed once per image batch."""

    regions: torch.Tensor  # (B, R, P) projected regions
    keys: torch.Tensor     # (B, R, A) their attention projection (the part that never changes)

    def index_select(self, index: torch.Tensor) -> "Memory":
        return Memory(*(t.index_select(0, index) for t in self))


class BahdanauAttention(nn.Module):
    """score_r = v . tanh(W_k region_r + query); alpha = softmax(score); context = sum_r alpha_r region_r.

    The query ``W_q h`` is computed by the caller, in the same matmul as the recurrent gates.
    Computed as ``tanh(x) = 2 sigmoid(2x) - 1``: the ``- v.1`` term is the same for every region
    and cancels in the softmax, so ``alpha = softmax(2v . sigmoid(2x))``, the same numbers as the
    tanh form (to float rounding) from an element-wise op that is several times faster on CPU.
    Memory keys hold ``2 (W_k region + b)``, the query enters doubled and the score is doubled.
    """

    key_scale = query_scale = score_scale = 2.0
    activation_ = staticmethod(torch.Tensor.sigmoid_)  # in place: no copy of (B, R, A)

    def __init__(self, region_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(region_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)  # a bias would cancel in the softmax

    def keys(self, regions: torch.Tensor) -> torch.Tensor:
        keys = self.key(regions)                                     # (B, R, A)
        return keys if self.key_scale == 1.0 else self.key_scale * keys

    def forward(self, memory: Memory, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if _in_blocks(memory.keys):
            scores = _scores_in_blocks(memory.keys, query, self.query_scale, self.activation_,
                                       self.score.weight)
        else:
            energy = torch.add(memory.keys, query.unsqueeze(1), alpha=self.query_scale)  # (B, R, A)
            scores = self.score(self.activation_(energy)).squeeze(-1)                     # (B, R)
        if self.score_scale != 1.0:
            scores = self.score_scale * scores
        alpha = F.softmax(scores, dim=-1)                             # (B, R)
        context = torch.bmm(alpha.unsqueeze(1), memory.regions).squeeze(1)  # (B, P)
        return context, alpha


class ReluAttention(BahdanauAttention):
    """score_r = v . relu(W_k region_r + query), as in sgrvinod's tutorial; memory keys hold
    ``W_k region + b``. (The score layer's bias, which that model has, cancels in the softmax.)"""

    key_scale = query_scale = score_scale = 1.0
    activation_ = staticmethod(torch.Tensor.relu_)


ATTENTIONS = {"tanh": BahdanauAttention, "relu": ReluAttention}

# Without autograd on a CPU (decoding, validation) the attention scores rows block by block, about
# this many bytes of (R, A) energies each: the add, the activation and the score's product then
# find them in the core's cache instead of making three trips to memory over (B, R, A). The same
# operations on the same rows, so the same numbers bit for bit (tests/test_model.py).
SCORE_BLOCK_BYTES = 1 << 20


def _block_rows(keys: torch.Tensor) -> int:
    return max(1, SCORE_BLOCK_BYTES // (keys.shape[1] * keys.shape[2] * keys.element_size()))


def _in_blocks(keys: torch.Tensor) -> bool:
    """Eager CPU float32 without autograd, more rows than one block; never while being traced or
    compiled (an exported graph keeps the one-pass form, whatever the batch it was traced with)."""
    return (not torch.is_grad_enabled() and keys.device.type == "cpu" and keys.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and len(keys) > _block_rows(keys))


def _scores_in_blocks(keys: torch.Tensor, query: torch.Tensor, scale: float, activation_,
                      weight: torch.Tensor) -> torch.Tensor:
    """``weight . activation_(keys + scale * query)`` per region, (B, R), a block of rows at a time.

    keys (B, R, A), query (B, A), weight (1, A): the score layer's. Each block is written into one
    reused buffer and scored with the same product the layer uses ((rows x R, A) @ (A, 1)).
    """
    B, R, A = keys.shape
    rows = _block_rows(keys)
    scores = keys.new_empty(B, R)
    buffer = keys.new_empty(rows, R, A)
    weight = weight.t()                                            # (A, 1)
    query = query.unsqueeze(1)                                     # (B, 1, A)
    for start in range(0, B, rows):
        n = min(rows, B - start)
        energy = torch.add(keys[start:start + n], query[start:start + n], alpha=scale, out=buffer[:n])
        activation_(energy)
        torch.mm(energy.view(n * R, A), weight, out=scores[start:start + n].view(n * R, 1))
    return scores
