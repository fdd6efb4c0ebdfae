"""The captioning network: region projection, Bahdanau attention, GRU/LSTM decoder, output layers.

Two variants share one file and one step (the attention and its memory: ``attention.py``):

* the seed's (default): regions -> FC + ReLU; attention over them from the previous hidden state;
  a GRU fed ``[embedding(previous word); context]`` from a zero state; ``fc1 -> fc2`` to the vocabulary.
* the paper's (Show, Attend and Tell): an LSTM whose initial state comes from the mean region,
  a gating scalar ``beta`` on the context, dropout, and doubly stochastic attention (``alpha_c``).

sgrvinod's tutorial model (``attncap import sgrvinod``) is the paper's with four options:
unprojected regions (``project_regions=False``, P = D), scores ``w . relu(W_k a + W_q h)``
(``attention_score="relu"``), a sigmoid gate per context channel (``gate_vector``), one output
layer ``fc(dropout(h))`` (``output_layers=1``) and a linear initial state (``init_activation="none"``).

Shapes: B batch, R regions, D encoder dim, P projected dim, A attention dim, H hidden, E embedding,
V vocabulary, T caption steps, G gates per cell (3 for GRU, 4 for LSTM).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ATTENTIONS, Memory
from .config import ModelConfig
from .errors import AttncapError

DECODERS = {"gru": 3, "lstm": 4}  # gates per cell


class State(NamedTuple):
    """Recurrent state: ``h`` always, ``c`` for the LSTM (an empty tensor for the GRU)."""

    h: torch.Tensor  # (B, H)
    c: torch.Tensor  # (B, H) or (B, 0)

    def index_select(self, index: torch.Tensor) -> "State":
        return State(*(t.index_select(0, index) for t in self))


class Output(NamedTuple):
    """Teacher forcing's result over the real (non-pad) steps only, packed.

    Row k is step ``index[k] % T`` of caption ``index[k] // T`` of the ``(B, T)`` input.
    """

    logits: torch.Tensor  # (N, V) scores of the next word at each real step
    alphas: torch.Tensor  # (N, R) attention of each real step
    index: torch.Tensor   # (N,) flat position of each row in the (B, T) input grid
    shape: tuple[int, int]

    def padded(self, packed: torch.Tensor) -> torch.Tensor:
        """Scatter packed rows (N, ...) back to (B, T, ...), zeros at padding."""
        B, T = self.shape
        grid = packed.new_zeros(B * T, *packed.shape[1:]).index_copy(0, self.index, packed)
        return grid.view(B, T, *packed.shape[1:])


def grid_positions(regions: int, device: torch.device | None = None) -> torch.Tensor:
    """(x, y) in [-1, 1] of each cell of a square grid, row by row: (R, 2)."""
    g = math.isqrt(regions)
    if g * g != regions:
        raise AttncapError(f"model.region_positions needs a square grid of regions, got {regions}")
    axis = torch.linspace(-1.0, 1.0, g, device=device) if g > 1 else torch.zeros(1, device=device)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], 1)


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
        P = cfg.proj_dim if cfg.project_regions else feature_dim  # the regions the decoder reads
        H, A, G = cfg.hidden_dim, cfg.attention_dim, DECODERS[cfg.decoder] * cfg.hidden_dim
        self.encoder = encoder  # trainable CNN over pixels, or None for cached features
        self.project = nn.Linear(feature_dim, P) if cfg.project_regions else None
        # Where each region is: its grid cell's (x, y) in [-1, 1], projected like the features.
        # The context vector alone says what the decoder looks at, not where it is.
        self.position = nn.Linear(2, P, bias=False) if cfg.region_positions else None
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=0)
        self.attention = ATTENTIONS[cfg.attention_score](P, A)
        # The cell's input is [embedding; context]; its weight is split in two so that the
        # embedding half can be applied to every step of a batch in one matmul.
        self.word_gates = nn.Linear(cfg.embed_dim, G)
        self.context_gates = nn.Linear(P, G, bias=False)
        # Everything computed from the previous hidden state shares one matmul, in this order:
        # the attention query (A), the recurrent gates (G) and the gate: scalar beta (1, paper)
        # or one per context channel (P, sgrvinod's f_beta).
        self.hidden_split = [A, G] + ([P if cfg.gate_vector else 1] if cfg.gate else [])
        self.hidden = nn.Linear(H, sum(self.hidden_split))
        self.init_h = nn.Linear(P, H) if cfg.init_from_features else None
        self.init_c = nn.Linear(P, H) if cfg.init_from_features and cfg.decoder == "lstm" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc1 = nn.Linear(H, cfg.fc_dim) if cfg.output_layers == 2 else None
        self.fc2 = nn.Linear(cfg.fc_dim if self.fc1 is not None else H, vocab_size)

    # -- pieces shared by training and decoding -------------------------------------------
    def encode(self, features: torch.Tensor) -> Memory:
        """Encoder features (B, R, D) (or pixels (B, 3, S, S) with a trainable encoder) -> Memory."""
        if self.encoder is not None:
            features = self.encoder(features)                       # (B, R, D)
        regions = features.float()                                  # (B, R, D): P = D unprojected
        if self.project is not None:
            regions = self.project(regions)                         # (B, R, P)
            if self.position is not None:
                regions = regions + self.position(grid_positions(regions.shape[1], regions.device))
            regions = F.relu(regions)
        return Memory(regions, self.attention.keys(regions))        # keys (B, R, A)

    def init_state(self, memory: Memory) -> State:
        B, H = memory.regions.shape[0], self.cfg.hidden_dim
        zeros = memory.regions.new_zeros(B, H)
        if self.init_h is None:  # the seed: zero state
            return State(zeros, zeros if self.cfg.decoder == "lstm" else zeros[:, :0])
        mean = memory.regions.mean(1)                               # (B, P)
        act = torch.tanh if self.cfg.init_activation == "tanh" else (lambda x: x)
        h = act(self.init_h(mean))                                  # (B, H)
        c = act(self.init_c(mean)) if self.init_c is not None else zeros[:, :0]
        return State(h, c)

    def cell(self, memory: Memory, state: State, word_gates: torch.Tensor
             ) -> tuple[State, torch.Tensor]:
        """One decoder step given the embedding's gate input (B, G); returns new state and alpha (B, R)."""
        query, gh, *beta = self.hidden(state.h).split(self.hidden_split, 1)  # (B, A), (B, G)
        context, alpha = self.attention(memory, query)               # (B, P), (B, R)
        if beta:
            context = torch.sigmoid(beta[0]) * context               # gate: (B, 1) or (B, P)
        gi = word_gates + self.context_gates(context)                # (B, G)
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
        h = self.dropout(h)
        return self.fc2(self.fc1(h) if self.fc1 is not None else h)

    def step(self, memory: Memory, state: State, words: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Previous words (B,) -> log-probabilities of the next (B, V), attention (B, R), new state."""
        state, alpha = self.cell(memory, state, self.word_gates(self.embed(words)))
        return F.log_softmax(self.logits(state.h), dim=-1), alpha, state

    # -- teacher forcing and scheduled sampling --------------------------------------------------
    def forward(self, features: torch.Tensor, inputs: torch.Tensor, sample_prob: float = 0.0,
                generator: torch.Generator | None = None, images: torch.Tensor | None = None) -> Output:
        """Teacher forcing: ``inputs`` (B, T) are ``<start> w1 .. wn`` then padding (0).

        ``images`` (B,), when given, is each row's image in ``features`` (I, ...): rows that share
        an image share its encoding (self-critical.pytorch's ``seq_per_img``), computed once.

        Returns the logits of w1 .. <end> at the real steps only. With ``sample_prob`` > 0
        (scheduled sampling, Bengio et al. 2015) every input word after ``<start>`` is, with that
        probability, replaced by a word drawn from the model's own (detached) distribution at the
        previous step. Rows with no replaced word take the teacher-forcing path; the others run
        step by step. Draws come from ``generator`` (default: torch's generator of the inputs'
        device, the one checkpoints save).
        """
        if sample_prob <= 0:
            return self._teacher_forcing(features, inputs, images)
        B, T = inputs.shape
        replace = (inputs != 0) & (torch.arange(T, device=inputs.device) > 0)  # (B, T) words after <start>
        if sample_prob < 1:
            replace &= torch.rand(B, T, device=inputs.device, generator=generator) < sample_prob
        sampled = replace.any(1)                                     # (B,) rows with a drawn input
        if not bool(sampled.any()):
            return self._teacher_forcing(features, inputs, images)
        rows = sampled.nonzero().squeeze(1)
        parts = [(rows, self._scheduled(*self._rows(features, images, rows), inputs[rows], replace[rows],
                                        generator))]
        if not bool(sampled.all()):
            rows = (~sampled).nonzero().squeeze(1)
            features_of, images_of = self._rows(features, images, rows)
            parts.append((rows, self._teacher_forcing(features_of, inputs[rows], images_of)))
        index = [rows[out.index // T] * T + out.index % T for rows, out in parts]  # caller's grid
        return Output(torch.cat([out.logits for _, out in parts]), torch.cat([out.alphas for _, out in parts]),
                      torch.cat(index), (B, T))

    @staticmethod
    def _rows(features: torch.Tensor, images: torch.Tensor | None, rows: torch.Tensor):
        """(features, images) of some rows: the image index narrows, the shared features stay."""
        return (features[rows], None) if images is None else (features, images[rows])

    def _memory(self, features: torch.Tensor, images: torch.Tensor | None, order: torch.Tensor | None
                ) -> Memory:
        """Each row's memory, in ``order``: every image of ``features`` encoded once."""
        if images is None:
            return self.encode(features if order is None else features[order])
        return self.encode(features).index_select(images if order is None else images[order])

    def _teacher_forcing(self, features: torch.Tensor, inputs: torch.Tensor,
                         images: torch.Tensor | None = None) -> Output:
        """Captions are run longest first, so the rows still running at step t are a prefix of the
        batch: each step computes only those, and the word-side gates, the output layers and the
        loss run once over all real tokens. Feed rows sorted by decreasing length to skip a copy.
        """
        order, inputs, running, active = self._longest_first(inputs)
        word_gates = self.word_gates(self.embed(inputs.t()[running])).split(active)  # [(n_t, G)]
        memory = self._memory(features, images, order)
        state = self.init_state(memory)
        prefixes = {len(inputs): memory}  # one slice per distinct row count, not per step (cheap backward)
        hs, alphas = [], []
        for t, n in enumerate(active):
            if n not in prefixes:
                prefixes[n] = Memory(memory.regions[:n], memory.keys[:n])
            state = State(state.h[:n], state.c[:n])
            state, alpha = self.cell(prefixes[n], state, word_gates[t])
            hs.append(state.h)
            alphas.append(alpha)
        return self._packed(self.logits(torch.cat(hs)), torch.cat(alphas), order, running)

    def _scheduled(self, features: torch.Tensor, images: torch.Tensor | None, inputs: torch.Tensor,
                   replace: torch.Tensor, generator: torch.Generator | None) -> Output:
        """Step by step: the inputs where ``replace`` (B, T) is True are drawn from the previous
        step's distribution, so every step needs its own output layer (the cost of sampling)."""
        order, inputs, running, active = self._longest_first(inputs)
        if order is not None:
            replace = replace[order]
        memory = self._memory(features, images, order)
        state = self.init_state(memory)
        logits, alphas = [], []
        for t, n in enumerate(active):
            words = inputs[:n, t]                                    # (n,)
            if t > 0 and bool(replace[:n, t].any()):
                probs = logits[-1][:n].detach().float().softmax(-1)  # (n, V)
                drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                words = torch.where(replace[:n, t], drawn, words)
            state = State(state.h[:n], state.c[:n])
            state, alpha = self.cell(Memory(memory.regions[:n], memory.keys[:n]), state,
                                     self.word_gates(self.embed(words)))
            logits.append(self.logits(state.h))                     # (n, V)
            alphas.append(alpha)
        return self._packed(torch.cat(logits), torch.cat(alphas), order, running)

    @staticmethod
    def _longest_first(inputs: torch.Tensor):
        """The order that sorts rows by decreasing length (None when they already are), the sorted
        inputs, the (T, B) mask of real steps and the number of rows running at each step."""
        B, T = inputs.shape
        lengths = (inputs != 0).sum(1)                               # (B,)
        order = torch.argsort(lengths, descending=True, stable=True)
        if bool((order == torch.arange(B, device=order.device)).all()):
            order = None  # already longest first
        else:
            inputs, lengths = inputs[order], lengths[order]
        running = torch.arange(T, device=inputs.device)[:, None] < lengths[None, :]  # (T, B)
        active = [n for n in running.sum(1).tolist() if n > 0]       # rows running at each step
        return order, inputs, running, active

    @staticmethod
    def _packed(logits: torch.Tensor, alphas: torch.Tensor, order: torch.Tensor | None,
                running: torch.Tensor) -> Output:
        """Step-major rows of the sorted batch as an :class:`Output` indexed in the caller's order."""
        T, B = running.shape
        rows = torch.arange(B, device=running.device) if order is None else order
        index = (rows[None, :] * T + torch.arange(T, device=running.device)[:, None])[running]  # (N,)
        return Output(logits, alphas, index, (B, T))


class Loss(NamedTuple):
    """The terms of the training loss of one batch."""

    total: torch.Tensor    # what training minimises: (label-smoothed) cross-entropy + penalty
    ce: torch.Tensor       # plain cross-entropy per token: the logged train and validation loss
    penalty: torch.Tensor  # alpha_c * doubly stochastic attention penalty per caption (0 when off)
    tokens: torch.Tensor   # real tokens in this batch


def loss_terms(output: Output, targets: torch.Tensor, alpha_c: float = 0.0, label_smoothing: float = 0.0,
               tokens: float | torch.Tensor | None = None, captions: float | None = None) -> Loss:
    """Masked cross-entropy over real tokens and the doubly stochastic attention penalty.

    targets: (B, T) with 0 = padding. Cross-entropy sums over tokens and divides by ``tokens``
    (default: this batch's real tokens); label smoothing ``eps`` trains towards ``1 - eps`` on the
    target and ``eps / V`` on every word (torch's ``label_smoothing``). The penalty is Xu et al.'s
    eq. 14, ``alpha_c * sum_r (1 - sum_t alpha_tr)^2`` per caption, summed over captions and
    divided by ``captions`` (default B). Data-parallel training passes the global counts.
    """
    logits, target = output.logits, targets.reshape(-1)[output.index]  # (N, V), (N,)
    keep = target != 0
    if not bool(keep.all()):  # only when targets are shorter than the inputs' real steps
        logits, target = logits[keep], target[keep]
    ntok = keep.sum()
    denominator = ntok if tokens is None else tokens
    if label_smoothing > 0:
        logp = F.log_softmax(logits.float(), -1)                     # (N, V)
        nll = -logp.gather(1, target[:, None]).squeeze(1)            # (N,)
        ce = nll.sum() / denominator
        total = ((1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)).sum() / denominator
    else:
        ce = total = F.cross_entropy(logits, target, reduction="sum") / denominator
    if alpha_c <= 0:
        return Loss(total, ce, ce.new_zeros(()), ntok)
    B, T = output.shape
    weights = output.alphas.float() * keep.unsqueeze(-1)             # (N, R), summed in float32
    attention_total = weights.new_zeros(B, weights.shape[1]).index_add(0, output.index // T, weights)
    penalty = alpha_c * ((1.0 - attention_total) ** 2).sum() / (B if captions is None else captions)
    return Loss(total + penalty, ce, penalty, ntok)


def caption_loss(output: Output, targets: torch.Tensor, alpha_c: float = 0.0,
                 denominator: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy plus ``alpha_c`` times the attention penalty (see :func:`loss_terms`), and the
    number of real tokens in this batch."""
    terms = loss_terms(output, targets, alpha_c, tokens=denominator)
    return terms.total, terms.tokens


def count_flops(model: Captioner, regions: int, images: int, tokens: int, training: bool = True) -> int:
    """The model's own FLOPs for ``images`` images and ``tokens`` decoded words (multiply-add = 2).

    Counts the matrix products (projection, attention, gates, output layers), not element-wise work.
    Training adds the backward pass: weight gradients for every product and input gradients for
    every product but the region projection (its input, the cached features, needs none).
    """
    c = model.cfg
    P = model.context_gates.in_features  # proj_dim, or the feature size with unprojected regions
    A, H, E, V = c.attention_dim, c.hidden_dim, c.embed_dim, model.vocab_size
    G = DECODERS[c.decoder] * H
    first = regions * model.feature_dim * P if model.project is not None else 0  # region projection
    per_image = regions * P * A + (P * H * (1 + (c.decoder == "lstm")) if c.init_from_features else 0)
    output = H * c.fc_dim + c.fc_dim * V if model.fc1 is not None else H * V
    per_token = (H * A + regions * A + regions * P                        # query, scores, context
                 + (E + P + H) * G + output + H * (model.hidden_split[2:] or [0])[0])
    forward = images * (first + per_image) + tokens * per_token
    if not training:
        return 2 * forward
    return 2 * (3 * forward - images * first)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
