import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attncap.config import ModelConfig
from attncap import attention as attention_lib
from attncap.errors import AttncapError
from attncap.model import Captioner, Output, caption_loss, loss_terms

SMALL = dict(embed_dim=8, proj_dim=12, attention_dim=10, hidden_dim=16, fc_dim=9)


def make(decoder="gru", **kw) -> Captioner:
    torch.manual_seed(0)
    return Captioner(ModelConfig(decoder=decoder, **SMALL, **kw), vocab_size=20, feature_dim=6)


def copy_weights(model: Captioner, ref: nn.Module) -> None:
    """Our input weight is [word | context] split in two Linear layers; the recurrent weight is
    the gate rows of the shared hidden-state matmul [query | gates | beta]."""
    A, G = model.cfg.attention_dim, model.word_gates.out_features
    with torch.no_grad():
        ref.weight_ih.copy_(torch.cat([model.word_gates.weight, model.context_gates.weight], 1))
        ref.bias_ih.copy_(model.word_gates.bias)
        ref.weight_hh.copy_(model.hidden.weight[A:A + G])
        ref.bias_hh.copy_(model.hidden.bias[A:A + G])


def test_gru_cell_matches_torch_gru_cell():
    model = make("gru")
    H = model.cfg.hidden_dim
    ref = nn.GRUCell(model.cfg.embed_dim + model.cfg.proj_dim, H)
    copy_weights(model, ref)
    memory = model.encode(torch.randn(3, 5, 6))
    state = model.init_state(memory)._replace(h=torch.randn(3, H))
    emb = torch.randn(3, model.cfg.embed_dim)
    new, alpha = model.cell(memory, state, model.word_gates(emb))
    context = torch.bmm(alpha.unsqueeze(1), memory.regions).squeeze(1)
    expected = ref(torch.cat([emb, context], 1), state.h)
    torch.testing.assert_close(new.h, expected, atol=1e-6, rtol=1e-5)


def test_lstm_cell_matches_torch_lstm_cell():
    model = make("lstm", init_from_features=True)
    H = model.cfg.hidden_dim
    ref = nn.LSTMCell(model.cfg.embed_dim + model.cfg.proj_dim, H)
    copy_weights(model, ref)
    memory = model.encode(torch.randn(2, 4, 6))
    state = model.init_state(memory)
    assert state.c.shape == (2, H) and state.h.abs().sum() > 0  # initialised from the mean region
    emb = torch.randn(2, model.cfg.embed_dim)
    new, alpha = model.cell(memory, state, model.word_gates(emb))
    context = torch.bmm(alpha.unsqueeze(1), memory.regions).squeeze(1)
    h, c = ref(torch.cat([emb, context], 1), (state.h, state.c))
    torch.testing.assert_close(new.h, h, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(new.c, c, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("decoder,extra", [("gru", {}), ("lstm", dict(init_from_features=True, gate=True,
                                                                        dropout=0.5, alpha_c=1.0))])
def test_forward_shapes_attention_and_step_agree(decoder, extra):
    model = make(decoder, **extra).eval()
    feats = torch.randn(3, 7, 6)
    inputs = torch.randint(1, 20, (3, 5))
    out = model(feats, inputs)
    assert out.logits.shape == (15, 20) and out.alphas.shape == (15, 7)
    logits, alphas = out.padded(out.logits), out.padded(out.alphas)  # (3, 5, 20), (3, 5, 7)
    torch.testing.assert_close(alphas.sum(-1), torch.ones(3, 5))
    # Teacher forcing and the decoding step are the same computation.
    memory = model.encode(feats)
    state = model.init_state(memory)
    for t in range(5):
        logp, alpha, state = model.step(memory, state, inputs[:, t])
        torch.testing.assert_close(logp, logits[:, t].log_softmax(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alpha, alphas[:, t], atol=1e-6, rtol=1e-5)


def test_loss_ignores_padding_and_regularises_attention():
    model = make("gru")
    feats, inputs = torch.randn(2, 4, 6), torch.randint(1, 20, (2, 6))
    targets = torch.randint(1, 20, (2, 6))
    targets[1, 3:] = 0
    out = model(feats, inputs)
    loss, ntok = caption_loss(out, targets)
    assert int(ntok) == 9
    tampered = out._replace(logits=out.logits.clone())
    tampered.logits[out.index == 1 * 6 + 4] += 100.0  # scores at padded positions must not matter
    assert torch.allclose(caption_loss(tampered, targets)[0], loss)
    reg, _ = caption_loss(out, targets, alpha_c=1.0)
    assert float(reg.detach()) > float(loss.detach())
    reg.backward()
    assert all(p.grad is not None for n, p in model.named_parameters()
               if p.requires_grad and not n.startswith(("init_", "beta")))


def test_unknown_decoder_is_a_clear_error():
    with pytest.raises(AttncapError, match="model.decoder"):
        Captioner(ModelConfig(decoder="transformer"), 10, 4)


def test_region_positions_say_where_each_cell_is():
    from attncap.model import grid_positions
    xy = grid_positions(9)
    assert xy.shape == (9, 2)
    assert xy[0].tolist() == [-1.0, -1.0] and xy[2].tolist() == [1.0, -1.0] and xy[8].tolist() == [1.0, 1.0]
    model = make("gru", region_positions=True)
    feats = torch.zeros(1, 9, 6)  # identical content everywhere: only the position tells cells apart
    regions = model.encode(feats).regions[0]
    assert not torch.allclose(regions[0], regions[8])
    with pytest.raises(AttncapError, match="square grid"):
        model.encode(torch.zeros(1, 7, 6))


def hand_made_output():
    """Two captions (3 and 2 real steps) over V = 4 words and R = 3 regions, in a (2, 3) grid."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 1.0, -1.0],
                           [0.0, 3.0, 0.0, 0.0], [-2.0, 0.0, 2.0, 1.0]])
    alphas = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0],
                           [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    index = torch.tensor([0, 1, 2, 3, 4])  # caption 0: steps 0..2; caption 1: steps 0..1
    targets = torch.tensor([[1, 3, 2], [1, 2, 0]])
    return Output(logits, alphas, index, (2, 3)), targets


def test_label_smoothing_equals_the_hand_computed_loss():
    out, targets = hand_made_output()
    eps, V = 0.1, 4
    real = [(0, 1), (1, 3), (2, 2), (3, 1), (4, 2)]  # (row, target) of each real token
    expected = 0.0
    for row, y in real:
        logp = out.logits[row].log_softmax(-1)
        q = torch.full((V,), eps / V)
        q[y] += 1 - eps                                  # 1 - eps on the target, eps / V everywhere
        expected += float(-(q * logp).sum())
    terms = loss_terms(out, targets, label_smoothing=eps)
    assert abs(float(terms.total) - expected / 5) < 1e-6
    plain = sum(float(-out.logits[row].log_softmax(-1)[y]) for row, y in real) / 5
    assert abs(float(terms.ce) - plain) < 1e-6  # the logged loss stays plain cross-entropy
    flat = targets.reshape(-1)[out.index]
    torch.testing.assert_close(terms.total, F.cross_entropy(out.logits, flat, label_smoothing=eps))
    assert int(terms.tokens) == 5 and float(terms.penalty) == 0.0


def test_attention_penalty_is_eq_14_summed_over_regions_per_caption():
    out, targets = hand_made_output()
    # caption 0 attends 0.5+0.2+1.0, 0.25+0.2+0.0, 0.25+0.6+0.0; caption 1: 0.4, 1.1, 0.5
    per_caption = [(1 - 1.7) ** 2 + (1 - 0.45) ** 2 + (1 - 0.85) ** 2,
                   (1 - 0.4) ** 2 + (1 - 1.1) ** 2 + (1 - 0.5) ** 2]
    terms = loss_terms(out, targets, alpha_c=2.0)
    assert abs(float(terms.penalty) - 2.0 * sum(per_caption) / 2) < 1e-6  # mean over captions, sum over R
    assert abs(float(terms.total) - float(terms.ce) - float(terms.penalty)) < 1e-6
    shared = loss_terms(out, targets, alpha_c=2.0, captions=8)  # data-parallel: the global count
    assert abs(float(shared.penalty) - 2.0 * sum(per_caption) / 8) < 1e-6
    total, ntok = caption_loss(out, targets, alpha_c=2.0)
    assert float(total) == float(terms.total) and int(ntok) == 5


@pytest.mark.parametrize("score", ["tanh", "relu"])
def test_attention_without_autograd_scores_in_blocks_with_the_same_bits(score, monkeypatch):
    """Decoding scores the regions a block of rows at a time (cache-sized); training does not.
    Both give the same numbers to the last bit, a ragged last block included."""
    torch.manual_seed(1)
    attention = attention_lib.ATTENTIONS[score](region_dim=12, attention_dim=40)
    regions, query = torch.randn(23, 9, 12), torch.randn(23, 40)
    memory = attention_lib.Memory(regions, attention.keys(regions).detach())
    plain_context, plain_alpha = attention(memory, query)            # autograd on: one pass
    assert not attention_lib._in_blocks(memory.keys)
    rows = 4                                                         # 23 rows: 5 blocks of 4 and one of 3
    monkeypatch.setattr(attention_lib, "SCORE_BLOCK_BYTES", rows * 9 * 40 * 4)
    with torch.no_grad():
        assert attention_lib._block_rows(memory.keys) == rows and attention_lib._in_blocks(memory.keys)
        context, alpha = attention(memory, query)
        monkeypatch.setattr(attention_lib, "SCORE_BLOCK_BYTES", 1 << 30)  # one block: the plain path
        assert not attention_lib._in_blocks(memory.keys)
        one_context, one_alpha = attention(memory, query)
    assert torch.equal(alpha, plain_alpha) and torch.equal(context, plain_context)
    assert torch.equal(alpha, one_alpha) and torch.equal(context, one_context)
    # and the blocks are really scored: the scores are not softmax of zeros or of one block's copy
    assert alpha.std(1).min() > 0 and not torch.equal(alpha[:4], alpha[4:8])
