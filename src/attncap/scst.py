"""Self-critical sequence training's objective: rewards of sampled captions against a baseline.

Rennie et al. 2017 subtract the reward of the image's greedy caption; Luo 2020 ("a better
variant of self-critical sequence training") the mean reward of the image's other samples. The
loss is REINFORCE with that baseline, ``-(r - b) log p(caption)``, averaged over the sampled tokens
as self-critical.pytorch's ``RewardCriterion`` does, less an optional entropy bonus (the mean
entropy of the sampling distribution over the same tokens, times ``scst.entropy``) that keeps the
policy from settling on one phrasing before the reward has told the phrasings apart. Samples come from
:func:`attncap.decoding.sample_n`, rewards from :class:`attncap.reward.CiderD`.
"""

from __future__ import annotations

from typing import Callable

import torch

from .decoding import Samples
from .errors import AttncapError


def greedy_baseline(rewards: torch.Tensor, greedy: torch.Tensor | None) -> torch.Tensor:
    """Rennie et al.: every sample of image b is compared with b's greedy caption. (B, n), (B,) -> (B, n)."""
    if greedy is None:
        raise AttncapError("the greedy baseline needs the rewards of the greedy captions")
    return greedy[:, None].expand_as(rewards)


def mean_baseline(rewards: torch.Tensor, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """Luo 2020: each sample is compared with the mean reward of its image's other samples. (B, n) -> (B, n)."""
    n = rewards.shape[1]
    if n < 2:
        raise AttncapError("the mean-of-others baseline needs at least 2 samples per image")
    return (rewards.sum(1, keepdim=True) - rewards) / (n - 1)


BASELINES: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "greedy": greedy_baseline, "mean": mean_baseline}


def advantages(rewards: torch.Tensor, kind: str, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """Rewards (B, n) of ``n`` samples per image minus their baseline ``kind``: (B * n,), row-major."""
    if kind not in BASELINES:
        raise AttncapError(f"SCST baseline must be one of {', '.join(BASELINES)}, got {kind!r}")
    return (rewards - BASELINES[kind](rewards, greedy)).reshape(-1)


def scst_loss(samples: Samples, advantage: torch.Tensor, entropy: float = 0.0) -> torch.Tensor:
    """``-advantage * log p - entropy * H`` of every sampled token (``<end>`` included), averaged
    over the tokens; H is the entropy of the distribution the token was drawn from.

    samples: from :func:`attncap.decoding.sample_n`, (M, L); advantage: (M,), no gradient.
    """
    mask = (samples.tokens != 0).to(samples.logp.dtype)              # (M, L)
    weighted = samples.logp * (advantage.detach().to(samples.logp.dtype)[:, None] * mask)
    if entropy:
        weighted = weighted + entropy * samples.entropy * mask
    return -weighted.sum() / mask.sum().clamp(min=1)
