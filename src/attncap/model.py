"""The captioning network: region projection, Bahdanau attention, GRU/LSTM decoder, output layers.

Two variants share one file and one step:

* the seed's (default): regions -> FC + ReLU; attention over them from the previous hidden state;
  a GRU fed ``[embedding(previous word); context]`` from a zero state; ``fc1 -> fc2`` to the vocabulary.
* the paper's (Show, Attend and Tell): an LSTM whose initial state comes from the mean region,
  a gating scalar ``beta`` on the context, dropout, and doubly stochastic attention (``alpha_c``).

Shapes: B batch, R regions, D encoder dim, P projected dim, A attention dim, H hidden, E embedding,
V vocabulary, T caption steps, G gates per cell (3 for GRU, 4 for LSTM).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import AttncapError

DECODERS = {"gru": 3, "lstm": 4}  # gates per cell


class Memory(NamedTuple):
    """What the decoder reads at every step; computed once per image batch."""

    regions: torch.Tensor  # (B, R, P) projected regions
    keys: torch.Tensor     # (B, R, A) their attention projection (the part that never changes)

    def index_select(self, index: torch.Tensor) -> "Memory":
        return Memory(*(t.index_select(0, index) for t in self))


class State(NamedTuple):
    """Recurrent state: ``h`` always, ``c`` for the LSTM (an empty tensor for the GRU)."""

    h: torch.Tensor  # (B, H)
    c: torch.Tensor  # (B, H) or (B, 0)

    def index_select(self, index: torch.Tensor) -> "State":
        return State(*(t.index_select(0, index) for t in self))


class Output(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    alphas: torch.Tensor  # (B, T, R) attention of each step


class BahdanauAttention(nn.Module):
    """score_r = v . tanh(W_k region_r + W_q h); alpha = softmax(score); context = sum_r alpha_r region_r."""

    def __init__(self, region_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(region_dim, attention_dim)
        self.query = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, memory: Memory, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        energy = torch.tanh(memory.keys + self.query(h).unsqueeze(1))  # (B, R, A)
        alpha = F.softmax(self.score(energy).squeeze(-1), dim=-1)      # (B, R)
        context = torch.bmm(alpha.unsqueeze(1), memory.regions).squeeze(1)  # (B, P)
        return context, alpha


class Captioner(nn.Module):
    """Encoder regions -> words, one attention map per word.

    ``forward(features, inputs)`` runs teacher forcing; ``encode``/``init_state``/``step`` are the
    pieces :mod:`attncap.decoding` uses to generate.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, feature_dim: int,
                 encoder: nn.Module | None = None):
        super().__init__()
        if cfg.decoder not in DECODERS:
            raise AttncapError(f"model.decoder must be one of {', '.join(DECODERS)}, got {cfg.decoder!r}")
        self.cfg, self.vocab_size, self.feature_dim = cfg, vocab_size, feature_dim
        P, H, G = cfg.proj_dim, cfg.hidden_dim, DECODERS[cfg.decoder] * cfg.hidden_dim
        self.encoder = encoder  # trainable CNN over pixels, or None for cached features
        self.project = nn.Linear(feature_dim, P)
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=0)
        self.attention = BahdanauAttention(P, H, cfg.attention_dim)
        # The cell's input is [embedding; context]; its weight is split in two so that the
        # embedding half can be applied to every step of a caption in one matmul.
        self.word_gates = nn.Linear(cfg.embed_dim, G)
        self.context_gates = nn.Linear(P, G, bias=False)
        self.hidden_gates = nn.Linear(H, G)
        self.init_h = nn.Linear(P, H) if cfg.init_from_features else None
        self.init_c = nn.Linear(P, H) if cfg.init_from_features and cfg.decoder == "lstm" else None
        self.beta = nn.Linear(H, 1) if cfg.gate else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc1 = nn.Linear(H, cfg.fc_dim)
        self.fc2 = nn.Linear(cfg.fc_dim, vocab_size)

    # -- pieces shared by training and decoding -------------------------------------------
    def encode(self, features: torch.Tensor) -> Memory:
        """Encoder features (B, R, D) (or pixels (B, 3, S, S) with a trainable encoder) -> Memory."""
        if self.encoder is not None:
            features = self.encoder(features)                       # (B, R, D)
        regions = F.relu(self.project(features.float()))            # (B, R, P)
        return Memory(regions, self.attention.key(regions))         # keys (B, R, A)

    def init_state(self, memory: Memory) -> State:
        B, H = memory.regions.shape[0], self.cfg.hidden_dim
        zeros = memory.regions.new_zeros(B, H)
        if self.init_h is None:  # the seed: zero state
            h = zeros
        else:
            h = torch.tanh(self.init_h(memory.regions.mean(1)))     # (B, H)
        c = zeros[:, :0]
        if self.cfg.decoder == "lstm":
            c = torch.tanh(self.init_c(memory.regions.mean(1))) if self.init_c is not None else zeros
        return State(h, c)

    def cell(self, memory: Memory, state: State, word_gates: torch.Tensor
             ) -> tuple[State, torch.Tensor]:
        """One decoder step given the embedding's gate input (B, G); returns new state and alpha (B, R)."""
        context, alpha = self.attention(memory, state.h)             # (B, P), (B, R)
        if self.beta is not None:
            context = torch.sigmoid(self.beta(state.h)) * context    # gating scalar beta
        gi = word_gates + self.context_gates(context)                # (B, G)
        gh = self.hidden_gates(state.h)                              # (B, G)
        if self.cfg.decoder == "gru":  # same equations and gate order as torch.nn.GRUCell
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            return State(n + z * (state.h - n), state.c), alpha
        i, f, g, o = (gi + gh).chunk(4, 1)                           # torch.nn.LSTMCell order
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)
        return State(torch.sigmoid(o) * torch.tanh(c), c), alpha

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., H) -> vocabulary scores (..., V)."""
        return self.fc2(self.fc1(self.dropout(h)))

    def step(self, memory: Memory, state: State, words: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Previous words (B,) -> log-probabilities of the next (B, V), attention (B, R), new state."""
        state, alpha = self.cell(memory, state, self.word_gates(self.embed(words)))
        return F.log_softmax(self.logits(state.h), dim=-1), alpha, state

    # -- teacher forcing ----------------------------------------------------------------------
    def forward(self, features: torch.Tensor, inputs: torch.Tensor) -> Output:
        """Teacher forcing: ``inputs`` (B, T) are ``<start> w1 .. w_{T-1}``; returns logits for w1..w_T.

        Rows are decoded for all T steps; the loss masks the padding (batches are length-bucketed,
        so there is little of it).
        """
        memory = self.encode(features)
        state = self.init_state(memory)
        word_gates = self.word_gates(self.embed(inputs))             # (B, T, G): all steps at once
        hs, alphas = [], []
        for t in range(inputs.shape[1]):
            state, alpha = self.cell(memory, state, word_gates[:, t])
            hs.append(state.h)
            alphas.append(alpha)
        hidden = torch.stack(hs, 1)                                  # (B, T, H)
        return Output(self.logits(hidden), torch.stack(alphas, 1))  # (B, T, V), (B, T, R)


def caption_loss(output: Output, targets: torch.Tensor, alpha_c: float = 0.0,
                 denominator: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked cross-entropy over real tokens plus doubly stochastic attention regularisation.

    targets: (B, T) with 0 = padding. The summed cross-entropy is divided by ``denominator``
    (default: this batch's number of real tokens; data-parallel training passes the global count).
    Returns (loss, number of real tokens in this batch).
    """
    mask = targets != 0                                              # (B, T)
    ntok = mask.sum()
    ce = F.cross_entropy(output.logits[mask], targets[mask], reduction="sum") / (
        ntok if denominator is None else denominator)
    if alpha_c <= 0:
        return ce, ntok
    attention_total = (output.alphas * mask.unsqueeze(-1)).sum(1)   # (B, R)
    return ce + alpha_c * ((1.0 - attention_total) ** 2).mean(), ntok


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
