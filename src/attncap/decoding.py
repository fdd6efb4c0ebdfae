"""Caption generation: greedy, beam search and sampling, all built on ``Captioner.step``.

Every function decodes a batch of images at once and returns, per image, :class:`Caption` objects
holding the word ids, the attention map behind every word and the log-probability. Evaluation,
the CLI and the server all call these; there is no other decoding code. ``<end>`` cannot come
before ``min_len`` words (default 1), so no caption is ever empty; words in ``banned`` (``<unk>``
unless ``decode.allow_unk``) are never emitted, and ``block_trigrams`` forbids any word that would
repeat a trigram of its caption (self-critical.pytorch's ``block_trigrams``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .config import DecodeConfig
from .errors import AttncapError
from .model import Captioner


@dataclass
class Caption:
    tokens: list[int]     # word ids, without <start> and <end>
    alphas: np.ndarray    # (len(tokens), R) attention weights of each word
    score: float          # total log-probability, <end> included when emitted
    normalised: float     # score / length**length_penalty (what beam search ranks by)

    def attention_grid(self) -> np.ndarray:
        """The attention maps as square grids: (len(tokens), g, g)."""
        grid = math.isqrt(self.alphas.shape[-1])
        return self.alphas.reshape(len(self.tokens), grid, grid)


Chooser = Callable[[torch.Tensor], torch.Tensor]  # log-probs (B, V) -> next words (B,)

PAD = 0


def options(cfg: DecodeConfig, unk: int) -> dict[str, Any]:
    """The word rules of ``decode.*`` as keyword arguments of the functions below."""
    return {"min_len": cfg.min_len, "banned": () if cfg.allow_unk else (unk,),
            "block_trigrams": cfg.block_trigrams}


def _step(model: Captioner, memory, state, words: torch.Tensor, start: int, end: int, can_end: bool,
          banned: Sequence[int] = (), history: torch.Tensor | None = None):
    """``model.step`` with ``<pad>``, ``<start>`` and the ``banned`` words made impossible as next
    words, ``<end>`` too while ``can_end`` is False (the caption is still shorter than its minimum
    length), and, given each row's words so far ``history`` (B, t), every word that would repeat
    one of its trigrams.

    The remaining log-probabilities are left as they are (not renormalised), so scores stay the
    model's own; every emitted token is then a word or ``<end>``, one attention map each.
    """
    logp, alpha, state = model.step(memory, state, words)
    if logp.requires_grad:  # training samples: log_softmax's backward needs its output unchanged
        logp = logp.clone()
    logp[:, [PAD, start, *banned]] = float("-inf")
    if not can_end:
        logp[:, end] = float("-inf")
    if history is not None and history.shape[1] >= 3:
        logp.masked_fill_(_trigram_repeats(history, logp.shape[1]), float("-inf"))
    return logp, alpha, state


def _trigram_repeats(history: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Words so far (B, t) -> (B, V) True at the words that would complete a trigram the row has
    already written: the third word of every earlier trigram that starts with the last two words."""
    same = (history[:, :-2] == history[:, -2:-1]) & (history[:, 1:-1] == history[:, -1:])  # (B, t-2)
    hits = history.new_zeros(history.shape[0], vocab_size, dtype=torch.float)
    return hits.scatter_add_(1, history[:, 2:], same.float()) > 0


def _check_lengths(min_len: int, max_len: int) -> None:
    if max_len < 1 or not 0 <= min_len <= max_len:
        raise AttncapError(f"need 0 <= min_len <= max_len and max_len >= 1, got min_len={min_len}, "
                           f"max_len={max_len} (decode.min_len, decode.max_len)")


def _unroll(model: Captioner, memory, state, words: torch.Tensor, start: int, end: int, max_len: int,
            choose: Chooser, min_len: int, banned: Sequence[int], block_trigrams: bool):
    """Extend one caption per row word by word with ``choose`` until ``<end>``; finished rows leave
    the batch, so each step runs only over the captions still being written.

    Yields, per step: the rows still running (n,), their log-probabilities (n, V), the words chosen
    (n,) and the attention (n, R). Gradients flow when the caller enables them.
    """
    _check_lengths(min_len, max_len)
    rows = torch.arange(len(words), device=words.device)   # the rows still running
    history = words.new_empty(len(words), 0) if block_trigrams else None
    for t in range(max_len):
        logp, alpha, state = _step(model, memory, state, words, start, end, t >= min_len, banned, history)
        words = choose(logp)
        yield rows, logp, words, alpha
        if history is not None:
            history = torch.cat([history, words[:, None]], 1)
        running = words != end
        if not bool(running.all()):
            if not bool(running.any()):
                return
            keep = running.nonzero().squeeze(1)
            rows, words = rows[keep], words[keep]
            memory, state = memory.index_select(keep), state.index_select(keep)
            if history is not None:
                history = history[keep]


@torch.inference_mode()
def _sequential(model: Captioner, features: torch.Tensor, start: int, end: int, max_len: int,
                choose: Chooser, min_len: int, banned: Sequence[int], block_trigrams: bool) -> list[Caption]:
    """One hypothesis per image, extended with ``choose`` (see :func:`_unroll`)."""
    memory = model.encode(features)
    state = model.init_state(memory)
    B, R, dev = features.shape[0], memory.regions.shape[1], features.device
    words = torch.full((B,), start, dtype=torch.long, device=dev)
    score = torch.zeros(B, device=dev)
    steps, alphas = [], []
    for rows, logp, chosen, alpha in _unroll(model, memory, state, words, start, end, max_len, choose,
                                             min_len, banned, block_trigrams):
        score[rows] += logp.gather(1, chosen[:, None]).squeeze(1)
        steps.append(torch.full((B,), end, device=dev).index_copy(0, rows, chosen))
        alphas.append(alpha.new_zeros(B, R).index_copy(0, rows, alpha))
    tokens = torch.stack(steps, 1).cpu().numpy()            # (B, L)
    maps = torch.stack(alphas, 1).float().cpu().numpy()     # (B, L, R)
    out = []
    for b in range(B):
        ends = np.flatnonzero(tokens[b] == end)
        n = int(ends[0]) if len(ends) else tokens.shape[1]
        s = float(score[b])
        out.append(Caption(tokens[b, :n].tolist(), maps[b, :n], s, s))
    return out


def greedy(model: Captioner, features: torch.Tensor, start: int, end: int, max_len: int = 30,
           min_len: int = 1, banned: Sequence[int] = (), block_trigrams: bool = False) -> list[Caption]:
    """The most likely next word at every step."""
    return _sequential(model, features, start, end, max_len, lambda logp: logp.argmax(-1), min_len,
                       banned, block_trigrams)


def sample(model: Captioner, features: torch.Tensor, start: int, end: int, max_len: int = 30,
           temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
           min_len: int = 1, banned: Sequence[int] = (), block_trigrams: bool = False) -> list[Caption]:
    """Draw each word from the (temperature-scaled, optionally top-k truncated) distribution."""
    if temperature <= 0:
        raise AttncapError(f"temperature must be positive, got {temperature}")

    def choose(logp: torch.Tensor) -> torch.Tensor:
        logits = logp / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)

    return _sequential(model, features, start, end, max_len, choose, min_len, banned, block_trigrams)


class Samples(NamedTuple):
    """``n`` sampled captions per image: rows ``b * n`` to ``b * n + n - 1`` are image ``b``'s."""

    tokens: torch.Tensor   # (M, L) word ids, <end> included where drawn, 0 after it
    logp: torch.Tensor     # (M, L) log-probability of each token under the sampling distribution, 0 after
    entropy: torch.Tensor  # (M, L) entropy of that distribution at each step (with gradient), 0 after


class SharedNoise(NamedTuple):
    """Gumbel noise that makes samples independent of how a batch is split between processes.

    Every process draws the same (``total``, V) uniforms from ``generator`` for each word and uses
    rows ``first`` to ``first + M - 1`` of them (M = its own samples), so a sample's words depend
    only on its row of the whole batch (data-parallel self-critical training).
    """

    generator: torch.Generator
    first: int
    total: int


def _gumbel_max(logp: torch.Tensor, noise: SharedNoise, alive: torch.Tensor) -> torch.Tensor:
    """A word per row ``alive`` drawn from softmax(logp) as argmax(logp + Gumbel noise). (n, V) -> (n,)"""
    uniform = torch.rand(noise.total, logp.shape[-1], generator=noise.generator,
                         device=noise.generator.device)[noise.first + alive.to(noise.generator.device)]
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))          # (n, V)
    return (logp.detach().float() + gumbel.to(logp.device)).argmax(-1)  # -inf stays impossible


def sample_n(model: Captioner, features: torch.Tensor, start: int, end: int, n: int, max_len: int = 30,
             generator: torch.Generator | None = None, min_len: int = 1, banned: Sequence[int] = (),
             block_trigrams: bool = False, noise: SharedNoise | None = None) -> Samples:
    """Draw ``n`` captions per image with gradients through their log-probabilities (self-critical
    training). Images are encoded once; all samples run as one batch through :func:`_unroll`,
    finished ones leaving it, and each word is drawn as :func:`sample` draws it (temperature 1,
    the masks of the other decoders renormalised away), so with the same generator the words are
    :func:`sample`'s on the images repeated ``n`` times. With ``noise``, words are drawn from the
    same distribution by :class:`SharedNoise` instead (``generator`` is then unused).
    """
    if n < 1:
        raise AttncapError(f"need at least one sample per image, got {n}")
    B, dev = features.shape[0], features.device
    memory = model.encode(features).index_select(torch.arange(B, device=dev).repeat_interleave(n))
    M = B * n
    words = torch.full((M,), start, dtype=torch.long, device=dev)
    alive = torch.arange(M, device=dev)  # the rows still running, as _unroll keeps them

    def choose(logp: torch.Tensor) -> torch.Tensor:
        if noise is not None:
            return _gumbel_max(logp, noise, alive)
        return torch.multinomial(torch.softmax(logp.detach(), -1), 1, generator=generator).squeeze(1)

    tokens, logps, entropies = [], [], []
    for rows, logp, chosen, _ in _unroll(model, memory, model.init_state(memory), words, start, end,
                                         max_len, choose, min_len, banned, block_trigrams):
        alive = rows[chosen != end]
        norm = torch.log_softmax(logp, -1)                             # (n_t, V) over the allowed words
        tokens.append(words.new_zeros(M).index_copy(0, rows, chosen))
        logps.append(norm.new_zeros(M).index_copy(0, rows, norm.gather(1, chosen[:, None]).squeeze(1)))
        p = norm.exp()
        entropy = -(p * norm.masked_fill(p == 0, 0.0)).sum(-1)        # (n_t,)
        entropies.append(norm.new_zeros(M).index_copy(0, rows, entropy))
    return Samples(torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(entropies, 1))


@dataclass
class _Beams:
    """Alive hypotheses of B images x K beams, flattened to B*K rows."""

    scores: torch.Tensor   # (B, K) total log-probabilities
    tokens: torch.Tensor   # (B*K, t) words so far
    alphas: torch.Tensor   # (B*K, t, R) their attention


@torch.inference_mode()
def beam_search(model: Captioner, features: torch.Tensor, start: int, end: int, beam_size: int = 3,
                max_len: int = 30, length_penalty: float = 0.0, n_best: int = 1, min_len: int = 1,
                banned: Sequence[int] = (), block_trigrams: bool = False) -> list[list[Caption]]:
    """Batched beam search over all images at once; returns the ``n_best`` captions per image.

    Hypotheses are ranked by ``score / length**length_penalty`` (length counts ``<end>``). An image
    stops collecting once it holds ``beam_size`` finished hypotheses; the batch stops when every
    image has, or at ``max_len`` (then unfinished beams count as finished).
    """
    if beam_size < 1 or n_best < 1 or n_best > beam_size:
        raise AttncapError(f"need 1 <= n_best <= beam_size, got n_best={n_best}, beam_size={beam_size}")
    _check_lengths(min_len, max_len)
    B, K, dev = features.shape[0], beam_size, features.device
    memory = model.encode(features)
    R = memory.regions.shape[1]
    memory = memory.index_select(torch.arange(B, device=dev).repeat_interleave(K))  # (B*K, ...)
    state = model.init_state(memory)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0                                               # all beams start identical
    beams = _Beams(scores, torch.empty(B * K, 0, dtype=torch.long, device=dev),
                   torch.empty(B * K, 0, R, device=dev))
    words = torch.full((B * K,), start, dtype=torch.long, device=dev)
    finished: list[list[Caption]] = [[] for _ in range(B)]
    images = list(range(B))  # the image of each row block still searching
    for t in range(max_len):
        # (n*K, V), (n*K, R)
        logp, alpha, state = _step(model, memory, state, words, start, end, t >= min_len, banned,
                                   beams.tokens if block_trigrams else None)
        n, V = len(images), logp.shape[-1]
        total = logp.view(n, K, V).add_(beams.scores.unsqueeze(-1)).view(n, K * V)  # logp is not read again
        top, idx = total.topk(2 * K, dim=1)                          # (n, 2K): at most K end here
        origin = (idx // V) + (torch.arange(n, device=dev) * K).unsqueeze(1)  # (n, 2K) flat beam
        word = idx % V
        is_end = word == end
        # Like fairseq: a hypothesis ending here counts only if it ranks among the top K.
        _collect(finished, images, top[:, :K], origin, is_end[:, :K], beams, t + 1, length_penalty, K)
        keep_scores, keep = top.masked_fill(is_end, float("-inf")).topk(K, dim=1)  # (n, K)
        src = origin.gather(1, keep).view(-1)                        # (n*K,)
        words = word.gather(1, keep).view(-1)
        beams = _Beams(keep_scores, torch.cat([beams.tokens[src], words[:, None]], 1),
                       torch.cat([beams.alphas[src], alpha[src].unsqueeze(1)], 1))
        state = state.index_select(src)
        searching = [k for k, b in enumerate(images) if len(finished[b]) < K]
        if not searching:
            break
        if len(searching) < n:  # images with K finished hypotheses leave the batch
            blocks = torch.tensor(searching, device=dev)
            rows = (blocks[:, None] * K + torch.arange(K, device=dev)).view(-1)
            images = [images[k] for k in searching]
            words, state, memory = words[rows], state.index_select(rows), memory.index_select(rows)
            beams = _Beams(beams.scores[blocks], beams.tokens[rows], beams.alphas[rows])
    else:
        _flush_alive(finished, images, beams, length_penalty, K)
    return [sorted(f, key=lambda c: -c.normalised)[:n_best] for f in finished]


def _collect(finished, images, top, origin, is_end, beams: _Beams, length, penalty, K) -> None:
    """Move hypotheses that just emitted ``<end>`` into ``finished`` (at most K per image).

    Every candidate's score, words and attention are read at once (one copy, not one per
    hypothesis: on a GPU each read waits for the device).
    """
    where = is_end.nonzero()                                         # (E, 2): image block, rank
    if len(where) == 0:
        return
    rows = origin[where[:, 0], where[:, 1]]                          # (E,) flat beam of each
    scores = top[where[:, 0], where[:, 1]].tolist()
    tokens = beams.tokens[rows].tolist()
    alphas = beams.alphas[rows].float().cpu().numpy()                # (E, length - 1, R)
    for (k, _), score, words, alpha in zip(where.tolist(), scores, tokens, alphas):
        b = images[k]
        if len(finished[b]) >= K or score == float("-inf"):
            continue
        finished[b].append(Caption(words, alpha, score, score / (length ** penalty)))


def _flush_alive(finished, images, beams: _Beams, penalty, K) -> None:
    """At max_len, unfinished beams fill the images that still lack K finished hypotheses."""
    length = beams.tokens.shape[1]
    scores, tokens = beams.scores.tolist(), beams.tokens.tolist()   # (n, K), (n*K, length)
    alphas = beams.alphas.float().cpu().numpy()                      # (n*K, length, R)
    for row, b in enumerate(images):
        for k in range(K):
            score, o = scores[row][k], row * K + k
            if len(finished[b]) >= K or score == float("-inf"):
                continue
            finished[b].append(Caption(tokens[o], alphas[o], score, score / (length ** penalty)))


def decode(model: Captioner, features: torch.Tensor, start: int, end: int, beam_size: int = 1,
           max_len: int = 30, length_penalty: float = 0.0, min_len: int = 1, banned: Sequence[int] = (),
           block_trigrams: bool = False) -> list[Caption]:
    """The best caption per image: greedy for ``beam_size == 1``, beam search otherwise."""
    if beam_size == 1:
        return greedy(model, features, start, end, max_len, min_len, banned, block_trigrams)
    return [c[0] for c in beam_search(model, features, start, end, beam_size, max_len, length_penalty,
                                      n_best=1, min_len=min_len, banned=banned, block_trigrams=block_trigrams)]


def decode_split(model: Captioner, split, vocab, beam_size: int, max_len: int, length_penalty: float,
                 batch_size: int, device, progress: bool = True, min_len: int = 1, banned: Sequence[int] = (),
                 block_trigrams: bool = False) -> dict[int, dict]:
    """Caption every image of a :class:`~attncap.dataset.CaptionSplit` (``decode.*`` settings).

    Returns ``{image id: {"caption": str, "words": [str], "attention": (n_words, g, g)}}``.
    """
    out = {}
    bar = tqdm(total=len(split), unit="img", desc=f"decode (beam {beam_size})",
               disable=not progress, dynamic_ncols=True, leave=False)
    for ids, feats in split.image_batches(batch_size):
        caps = decode(model, feats.to(device), vocab.start, vocab.end, beam_size, max_len, length_penalty,
                      min_len, banned, block_trigrams)
        for image_id, cap in zip(ids, caps):
            words = vocab.decode(cap.tokens)
            out[image_id] = {"caption": " ".join(words), "words": words,
                             "attention": cap.attention_grid()}
        bar.update(len(ids))
    bar.close()
    return out


def diagnose_captions(captions: Sequence[str]) -> str | None:
    """What looks degenerate about a split's decoded captions, in a few words; None if nothing does.

    An undertrained model, or one trained on broken data, writes empty captions, one caption for
    most images, or captions made almost only of its few most frequent words ("a a a the").
    """
    n = len(captions)
    empty = sum(not c.strip() for c in captions)
    if empty:
        return f"{empty} of {n} captions are empty"
    if n >= 4:
        text, same = Counter(captions).most_common(1)[0]
        if same >= n / 2:
            return f"{same} of {n} captions are the same caption {text!r}"
    words = Counter(w for c in captions for w in c.split())
    top = words.most_common(3)
    covered = sum(k for _, k in top) / max(1, sum(words.values()))
    if sum(words.values()) >= 20 and covered >= 0.9:
        return f"{covered:.0%} of all caption words are {', '.join(repr(w) for w, _ in top)}"
    return None
