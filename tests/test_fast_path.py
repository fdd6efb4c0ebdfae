"""The fast teacher-forcing path against a plain reference of the same equations.

The reference runs every row for every step over the padding, computes the attention query, the
gates and beta with separate matmuls, and the output layers at every position; the model skips
finished rows, shares matmuls and scores only real tokens. Logits and every gradient must agree.
"""

import pytest
import torch
import torch.nn.functional as F

from attncap.config import ModelConfig
from attncap.dataset import teacher_forcing
from attncap.model import Captioner, caption_loss

DIMS = dict(embed_dim=8, proj_dim=12, attention_dim=10, hidden_dim=16, fc_dim=9)
VARIANTS = {
    "seed_gru": dict(decoder="gru"),
    "paper_lstm": dict(decoder="lstm", init_from_features=True, gate=True, alpha_c=1.0),
    "gru_gate_positions": dict(decoder="gru", init_from_features=True, gate=True, alpha_c=0.5,
                               region_positions=True),
}


def reference_forward(m: Captioner, features, inputs):
    """Plain equations over the padded (B, T) grid; returns logits (B, T, V), alphas (B, T, R)."""
    c = m.cfg
    A, G, H = c.attention_dim, m.word_gates.out_features, c.hidden_dim
    W, b = m.hidden.weight, m.hidden.bias
    regions = features @ m.project.weight.t() + m.project.bias                  # (B, R, P)
    if c.region_positions:  # cell centres of the 2x2 grid, row by row
        xy = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
        regions = regions + xy @ m.position.weight.t()
    regions = F.relu(regions)
    keys = regions @ m.attention.key.weight.t() + m.attention.key.bias          # (B, R, A)
    mean = regions.mean(1)
    h = torch.tanh(m.init_h(mean)) if c.init_from_features else regions.new_zeros(len(inputs), H)
    cell = torch.tanh(m.init_c(mean)) if c.decoder == "lstm" and c.init_from_features else torch.zeros_like(h)
    logits, alphas = [], []
    for t in range(inputs.shape[1]):
        query = h @ W[:A].t() + b[:A]
        energy = torch.tanh(keys + query[:, None, :])
        alpha = torch.softmax((energy * m.attention.score.weight[0]).sum(-1), -1)  # (B, R)
        context = (alpha[:, :, None] * regions).sum(1)
        if c.gate:
            context = torch.sigmoid(h @ W[A + G:].t() + b[A + G:]) * context
        x = torch.cat([m.embed.weight[inputs[:, t]], context], 1)
        w_ih = torch.cat([m.word_gates.weight, m.context_gates.weight], 1)
        gi, gh = x @ w_ih.t() + m.word_gates.bias, h @ W[A:A + G].t() + b[A:A + G]
        if c.decoder == "gru":
            r = torch.sigmoid(gi[:, :H] + gh[:, :H])
            z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
            n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
            h = (1 - z) * n + z * h
        else:
            i, f, g, o = (gi + gh).split(H, 1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(cell)
        logits.append(m.fc2(m.fc1(h)))
        alphas.append(alpha)
    return torch.stack(logits, 1), torch.stack(alphas, 1)


def reference_loss(m: Captioner, features, inputs, targets):
    logits, alphas = reference_forward(m, features, inputs)
    mask = targets != 0
    loss = F.cross_entropy(logits[mask], targets[mask], reduction="sum") / mask.sum()
    if m.cfg.alpha_c > 0:
        total = (alphas * mask[..., None]).sum(1)
        loss = loss + m.cfg.alpha_c * ((1 - total) ** 2).mean()
    return loss, logits


def random_batch(B=6, T=7, R=4, D=6, V=20, seed=0):
    """Captions of different lengths, deliberately not sorted by length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 7, 1, 5, 7, 2])[:B]
    tokens = torch.zeros(B, T + 1, dtype=torch.long)
    for k, n in enumerate(lengths.tolist()):
        tokens[k, 0] = 1
        tokens[k, 1:n] = torch.randint(4, V, (n - 1,), generator=g)
        tokens[k, n] = 2
    return (torch.randn(B, R, D, generator=g), *teacher_forcing(tokens))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_path_equals_reference_logits_and_gradients(variant):
    torch.manual_seed(0)
    model = Captioner(ModelConfig(**DIMS, **VARIANTS[variant]), vocab_size=20, feature_dim=6)
    features, inputs, targets = random_batch()

    out = model(features, inputs)
    loss, ntok = caption_loss(out, targets, model.cfg.alpha_c)
    fast = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    ref_loss, ref_logits = reference_loss(model, features, inputs, targets)
    ref = torch.autograd.grad(ref_loss, list(model.parameters()), allow_unused=True)

    mask = targets != 0
    assert int(ntok) == int(mask.sum()) == len(out.logits)
    torch.testing.assert_close(out.padded(out.logits)[mask], ref_logits[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    for (name, _), a, b in zip(model.named_parameters(), fast, ref):
        if b is None:  # the padding row of the embedding and friends: unused by both
            assert a is None or not a.any(), name
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def test_row_order_does_not_change_the_result():
    torch.manual_seed(0)
    model = Captioner(ModelConfig(**DIMS), vocab_size=20, feature_dim=6)
    features, inputs, targets = random_batch()
    order = torch.argsort((inputs != 0).sum(1), descending=True, stable=True)
    a = model(features, inputs)
    b = model(features[order], inputs[order])
    torch.testing.assert_close(a.padded(a.logits)[order], b.padded(b.logits), atol=1e-6, rtol=0)
    torch.testing.assert_close(caption_loss(a, targets)[0], caption_loss(b, targets[order])[0])
