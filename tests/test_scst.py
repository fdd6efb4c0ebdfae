"""Self-critical training's pieces: sampling with gradients through the one decoding module, the
baselines, and the gradient of the loss against a plain reference implementation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attncap.config import ModelConfig
from attncap.decoding import sample, sample_n
from attncap.errors import AttncapError
from attncap.model import Captioner
from attncap.reward import CiderD
from attncap.scst import advantages, scst_loss

START, END, V = 1, 2, 11


def model_and_feats(seed=0, batch=3):
    torch.manual_seed(seed)
    model = Captioner(ModelConfig(decoder="lstm", init_from_features=True, gate=True, embed_dim=8,
                                  proj_dim=8, attention_dim=8, hidden_dim=12, fc_dim=8), V, 4)
    with torch.no_grad():
        model.fc2.bias[END] += 0.5  # captions of a few words, of different lengths
    return model, torch.randn(batch, 6, 4)


def test_samples_are_the_sampling_decoders_words_with_their_log_probabilities():
    model, feats = model_and_feats()
    s = sample_n(model, feats, START, END, n=4, max_len=8, generator=torch.Generator().manual_seed(5))
    ref = sample(model, feats.repeat_interleave(4, 0), START, END, 8, generator=torch.Generator().manual_seed(5))
    lengths = (s.tokens != 0).sum(1)
    assert len(set(lengths.tolist())) > 1  # finished samples left the batch at different steps
    for row, cap in zip(s.tokens.tolist(), ref):
        assert [w for w in row if w not in (0, END)] == cap.tokens
    # log-probabilities are checked against a plain implementation below
    assert s.logp.requires_grad and bool((s.logp <= 0).all()) and bool((s.entropy[s.tokens != 0] > 0).all())
    assert bool((s.logp[s.tokens == 0] == 0).all()) and bool((s.entropy[s.tokens == 0] == 0).all())


def reference_distributions(model, feats, tokens, n, min_len=1):
    """Plain teacher forcing of the sampled tokens: every row, every step, the masks written out.
    Returns each step's log-probabilities of the allowed words, (M, L, V)."""
    inputs = torch.cat([torch.full((len(tokens), 1), START), tokens[:, :-1]], 1)
    feats = feats.repeat_interleave(n, 0)
    memory = model.encode(feats)
    state, out = model.init_state(memory), []
    for t in range(tokens.shape[1]):
        logp, _, state = model.step(memory, state, inputs[:, t])
        masked = logp.clone()
        masked[:, [0, START]] = float("-inf")
        if t < min_len:
            masked[:, END] = float("-inf")
        out.append(F.log_softmax(masked, -1))
    return torch.stack(out, 1)


def reference_logprobs_and_entropies(model, feats, tokens, n):
    dists = reference_distributions(model, feats, tokens, n)
    lp = dists.gather(2, tokens.clamp(min=0)[..., None]).squeeze(2)
    h = -(dists.exp() * dists.masked_fill(dists == float("-inf"), 0.0)).sum(-1)
    zero = torch.zeros_like(lp)
    return torch.where(tokens != 0, lp, zero), torch.where(tokens != 0, h, zero)


@pytest.mark.parametrize("kind,entropy", [("greedy", 0.0), ("mean", 0.0), ("mean", 0.3)])
def test_the_scst_gradient_equals_a_plain_reference_implementation(kind, entropy):
    model, feats = model_and_feats(seed=1)
    n = 3
    s = sample_n(model, feats, START, END, n, max_len=7, generator=torch.Generator().manual_seed(0))
    refs = {0: ["3 4 5", "4 5 6 7"], 1: ["8 9", "9 10 3"], 2: ["5 5 6"]}
    reward = CiderD.build(refs)
    captions = [" ".join(str(w) for w in row if w > END) for row in s.tokens.tolist()]  # ids as words
    scores = reward.score(np.repeat([0, 1, 2], n), captions)
    assert scores.max() > 0
    rewards = torch.tensor(scores, dtype=torch.float32).view(3, n)
    greedy = torch.tensor([0.5, 1.0, 0.2])
    adv = advantages(rewards, kind, greedy)
    loss = scst_loss(s, adv, entropy)
    params = [p for p in model.parameters()]
    ours = torch.autograd.grad(loss, params, allow_unused=True)

    lp, h = reference_logprobs_and_entropies(model, feats, s.tokens, n)
    torch.testing.assert_close(lp, s.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, s.entropy, atol=1e-5, rtol=0)
    base = greedy[:, None].expand(3, n) if kind == "greedy" else (rewards.sum(1, keepdim=True) - rewards) / (n - 1)
    mask = (s.tokens != 0).float()
    ref_loss = -((rewards - base).reshape(-1, 1) * lp * mask).sum() / mask.sum()
    if entropy:
        ref_loss = ref_loss - entropy * (h * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    theirs = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), ours, theirs):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any()), name
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert any(a is not None and a.abs().sum() > 0 for a in ours)


def test_baselines():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    torch.testing.assert_close(advantages(rewards, "mean"), torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))
    torch.testing.assert_close(advantages(rewards, "greedy", torch.tensor([2.0, 1.0])),
                               torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 5.0]))
    with pytest.raises(AttncapError, match="greedy captions"):
        advantages(rewards, "greedy")
    with pytest.raises(AttncapError, match="at least 2 samples"):
        advantages(rewards[:, :1], "mean")
    with pytest.raises(AttncapError, match="one of greedy, mean"):
        advantages(rewards, "max")


def test_shared_noise_makes_samples_independent_of_how_the_batch_is_split():
    """Two processes' shares of a batch, sampled with SharedNoise, are the whole batch's samples."""
    from attncap.decoding import SharedNoise

    model, feats = model_and_feats(seed=2, batch=5)
    noise = lambda first: SharedNoise(torch.Generator().manual_seed(9), first, 5 * 4)
    whole = sample_n(model, feats, START, END, n=4, max_len=8, noise=noise(0))
    parts = [sample_n(model, feats[:3], START, END, n=4, max_len=8, noise=noise(0)),
             sample_n(model, feats[3:], START, END, n=4, max_len=8, noise=noise(12))]
    assert len(set((whole.tokens != 0).sum(1).tolist())) > 1
    for field in ("tokens", "logp", "entropy"):
        got = torch.cat([torch.nn.functional.pad(getattr(p, field), (0, whole.tokens.shape[1] - p.tokens.shape[1]))
                         for p in parts])
        torch.testing.assert_close(got, getattr(whole, field), atol=1e-6, rtol=0)
    # the same distribution as multinomial sampling: word frequencies of many first words agree
    many = feats[:1].expand(4000, -1, -1)
    a = sample_n(model, many, START, END, 1, 1, noise=SharedNoise(torch.Generator().manual_seed(1), 0, 4000))
    b = sample_n(model, many, START, END, 1, 1, generator=torch.Generator().manual_seed(1))
    fa, fb = (torch.bincount(x.tokens[:, 0], minlength=V).float() / 4000 for x in (a, b))
    assert float((fa - fb).abs().max()) < 0.04, (fa, fb)
