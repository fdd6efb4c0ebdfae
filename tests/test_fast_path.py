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
    # sgrvinod's tutorial model (attncap import sgrvinod)
    "sgrvinod": dict(decoder="lstm", init_from_features=True, init_activation="none", gate=True,
                     gate_vector=True, project_regions=False, attention_score="relu", output_layers=1,
                     alpha_c=1.0),
}


def reference_forward(m: Captioner, features, inputs):
    """Plain equations over the padded (B, T) grid; returns logits (B, T, V), alphas (B, T, R)."""
    c = m.cfg
    A, G, H = c.attention_dim, m.word_gates.out_features, c.hidden_dim
    W, b = m.hidden.weight, m.hidden.bias
    regions = features                                                          # (B, R, D) unprojected
    if c.project_regions:
        regions = features @ m.project.weight.t() + m.project.bias              # (B, R, P)
        if c.region_positions:  # cell centres of the 2x2 grid, row by row
            xy = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
            regions = regions + xy @ m.position.weight.t()
        regions = F.relu(regions)
    keys = regions @ m.attention.key.weight.t() + m.attention.key.bias          # (B, R, A)
    mean = regions.mean(1)
    act = torch.tanh if c.init_activation == "tanh" else (lambda x: x)
    h = act(m.init_h(mean)) if c.init_from_features else regions.new_zeros(len(inputs), H)
    cell = act(m.init_c(mean)) if c.decoder == "lstm" and c.init_from_features else torch.zeros_like(h)
    logits, alphas = [], []
    for t in range(inputs.shape[1]):
        query = h @ W[:A].t() + b[:A]
        energy = (torch.tanh if c.attention_score == "tanh" else torch.relu)(keys + query[:, None, :])
        alpha = torch.softmax((energy * m.attention.score.weight[0]).sum(-1), -1)  # (B, R)
        context = (alpha[:, :, None] * regions).sum(1)
        if c.gate:  # a scalar (B, 1), or one per channel (B, P) with gate_vector
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
        logits.append(m.fc2(m.fc1(h)) if c.output_layers == 2 else m.fc2(h))
        alphas.append(alpha)
    return torch.stack(logits, 1), torch.stack(alphas, 1)


def reference_loss(m: Captioner, features, inputs, targets):
    logits, alphas = reference_forward(m, features, inputs)
    mask = targets != 0
    loss = F.cross_entropy(logits[mask], targets[mask], reduction="sum") / mask.sum()
    if m.cfg.alpha_c > 0:
        total = (alphas * mask[..., None]).sum(1)                            # (B, R)
        loss = loss + m.cfg.alpha_c * ((1 - total) ** 2).sum(1).mean()       # Xu et al. eq. 14
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


# -- scheduled sampling ----------------------------------------------------------------------------

def paper_model():
    torch.manual_seed(0)
    return Captioner(ModelConfig(**DIMS, **VARIANTS["paper_lstm"]), vocab_size=20, feature_dim=6)


def count_stepwise(monkeypatch) -> list[int]:
    """Record the rows of every call of the step-wise path."""
    calls, original = [], Captioner._scheduled

    def counted(self, features, images, inputs, replace, generator):
        calls.append(len(inputs))
        return original(self, features, images, inputs, replace, generator)
    monkeypatch.setattr(Captioner, "_scheduled", counted)
    return calls


def test_probability_zero_is_the_fast_teacher_forcing_path_exactly(monkeypatch):
    model = paper_model()
    features, inputs, targets = random_batch()
    calls = count_stepwise(monkeypatch)
    plain = model(features, inputs)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    off = model(features, inputs, sample_prob=0.0)
    assert calls == [] and torch.equal(torch.get_rng_state(), state)  # no draws either
    assert torch.equal(off.logits, plain.logits) and torch.equal(off.index, plain.index)
    torch.testing.assert_close(caption_loss(off, targets, 1.0)[0], caption_loss(plain, targets, 1.0)[0],
                               atol=0, rtol=0)


def test_stepwise_path_without_replacements_equals_teacher_forcing_logits_and_gradients():
    model = paper_model()
    features, inputs, targets = random_batch()
    fast = model(features, inputs)
    slow = model._scheduled(features, None, inputs, torch.zeros_like(inputs, dtype=torch.bool), None)
    assert torch.equal(fast.index, slow.index)
    torch.testing.assert_close(slow.logits, fast.logits, atol=1e-6, rtol=0)
    params = list(model.parameters())
    a = torch.autograd.grad(caption_loss(fast, targets, 1.0)[0], params, allow_unused=True)
    b = torch.autograd.grad(caption_loss(slow, targets, 1.0)[0], params, allow_unused=True)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_probability_one_equals_free_running_sampling_with_the_same_random_numbers():
    model = paper_model().eval()  # no dropout: the draws are the only randomness
    B, T = 4, 6
    features = torch.randn(B, 4, 6, generator=torch.Generator().manual_seed(1))
    inputs = torch.randint(4, 20, (B, T), generator=torch.Generator().manual_seed(2))
    inputs[:, 0] = 1  # <start>, then T - 1 words that must all be replaced
    out = model(features, inputs, sample_prob=1.0, generator=torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # free running: feed back a draw from every step's output
    memory = model.encode(features)
    state, words, logits = model.init_state(memory), inputs[:, 0], []
    for _ in range(T):
        state, _ = model.cell(memory, state, model.word_gates(model.embed(words)))
        logits.append(model.logits(state.h))
        words = torch.multinomial(logits[-1].softmax(-1), 1, generator=g).squeeze(1)
    torch.testing.assert_close(out.padded(out.logits), torch.stack(logits, 1), atol=1e-6, rtol=0)
    teacher = model(features, inputs).logits
    assert not torch.allclose(out.logits, teacher, atol=1e-3)  # it did not feed the given words


def test_only_rows_with_a_sampled_input_take_the_stepwise_path(monkeypatch):
    model = paper_model()
    features, inputs, targets = random_batch()
    calls = count_stepwise(monkeypatch)
    torch.manual_seed(0)
    mixed = model(features, inputs, sample_prob=0.3)
    torch.manual_seed(0)
    replace = (inputs != 0) & (torch.arange(inputs.shape[1]) > 0)
    replace &= torch.rand(inputs.shape) < 0.3  # the same draw as the model's
    sampled = replace.any(1)
    assert 0 < int(sampled.sum()) < len(inputs) and calls == [int(sampled.sum())]
    teacher = model(features, inputs)
    grid, ref = mixed.padded(mixed.logits), teacher.padded(teacher.logits)
    real = targets != 0
    torch.testing.assert_close(grid[~sampled][real[~sampled]], ref[~sampled][real[~sampled]], atol=1e-6, rtol=0)
    first = replace.float().argmax(1)  # up to its first drawn input a sampled row is teacher-forced too
    for b in sampled.nonzero().squeeze(1).tolist():
        torch.testing.assert_close(grid[b, :first[b]], ref[b, :first[b]], atol=1e-6, rtol=0)
    assert int(caption_loss(mixed, targets)[1]) == int(real.sum())


@pytest.mark.parametrize("variant", ["seed_gru", "paper_lstm"])
@pytest.mark.parametrize("sample_prob", [0.0, 0.5])
def test_rows_sharing_an_image_equal_the_image_repeated_logits_and_gradients(variant, sample_prob):
    """``images`` encodes each image once; the result is that of every row carrying its own copy."""
    torch.manual_seed(0)
    model = Captioner(ModelConfig(**DIMS, **VARIANTS[variant]), vocab_size=20, feature_dim=6)
    features, inputs, targets = random_batch()
    unique = features[:3]
    images = torch.tensor([2, 0, 1, 0, 2, 1])                        # 6 rows over 3 images, unsorted
    params = list(model.parameters())
    results = []
    for args in ((unique[images], inputs), (unique, inputs, sample_prob, None, images)):
        torch.manual_seed(5)                                          # the same draws for both
        out = model(*args) if len(args) > 2 else model(*args, sample_prob=sample_prob)
        loss = caption_loss(out, targets, model.cfg.alpha_c)[0]
        results.append((out, loss, torch.autograd.grad(loss, params, allow_unused=True)))
    (a, loss_a, grad_a), (b, loss_b, grad_b) = results
    assert torch.equal(a.index, b.index)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    for x, y in zip(grad_a, grad_b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
