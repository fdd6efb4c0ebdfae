import numpy as np
import pytest
import torch

from attncap.config import ModelConfig
from attncap.decoding import beam_search, decode, diagnose_captions, greedy, sample
from attncap.errors import AttncapError
from attncap.evaluate import warn_degenerate
from attncap.model import Captioner

START, END = 1, 2


def model_and_feats(seed=0, batch=5):
    torch.manual_seed(seed)
    model = Captioner(ModelConfig(embed_dim=8, proj_dim=8, attention_dim=8, hidden_dim=12, fc_dim=8),
                      vocab_size=11, feature_dim=4).eval()
    with torch.no_grad():
        model.fc2.bias[END] += 1.0  # make captions end within a few words
    return model, torch.randn(batch, 6, 4)


@torch.no_grad()
def teacher_forced_logprob(model, feats, tokens, ended: bool) -> float:
    seq = [START, *tokens] + ([END] if ended else [])
    inputs = torch.tensor([seq[:-1]])
    logp = model(feats[None], inputs).logits.log_softmax(-1)  # (T, V): one caption, no padding
    return float(sum(logp[t, w] for t, w in enumerate(seq[1:])))


def test_beam_size_one_equals_greedy():
    model, feats = model_and_feats()
    g = greedy(model, feats, START, END, max_len=8)
    b = beam_search(model, feats, START, END, beam_size=1, max_len=8)
    assert [c.tokens for c in g] == [c[0].tokens for c in b]
    for x, y in zip(g, b):
        assert abs(x.score - y[0].score) < 1e-4
        assert x.alphas.shape == y[0].alphas.shape == (len(x.tokens), 6)


def test_beam_scores_are_true_log_probabilities_and_sorted():
    model, feats = model_and_feats(seed=1)
    results = beam_search(model, feats, START, END, beam_size=4, max_len=10, n_best=3)
    for b, hyps in enumerate(results):
        assert len(hyps) == 3
        assert [h.normalised for h in hyps] == sorted((h.normalised for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 3  # distinct hypotheses
        for h in hyps:
            ended = len(h.tokens) < 10
            assert abs(h.score - teacher_forced_logprob(model, feats[b], h.tokens, ended)) < 1e-4
            assert END not in h.tokens and START not in h.tokens


def test_beam_is_at_least_as_likely_as_greedy_and_batching_changes_nothing():
    """Images of one batch finish at different steps and leave it; nobody else's result changes."""
    model, feats = model_and_feats(seed=2, batch=6)
    feats = feats * 10  # features that matter: captions of different lengths
    with torch.no_grad():
        model.fc2.bias[END] -= 0.5
    g = greedy(model, feats, START, END, max_len=10)
    batched = beam_search(model, feats, START, END, beam_size=3, max_len=10, n_best=3)
    assert len({len(c.tokens) for c in g}) > 1 and len({len(h[0].tokens) for h in batched}) > 1
    for i in range(6):
        alone = beam_search(model, feats[i:i + 1], START, END, beam_size=3, max_len=10, n_best=3)[0]
        for a, b in zip(alone, batched[i], strict=True):
            assert a.tokens == b.tokens and abs(a.score - b.score) < 1e-4
            np.testing.assert_allclose(a.alphas, b.alphas, atol=1e-5)
        assert batched[i][0].score >= g[i].score - 1e-4
        g_alone = greedy(model, feats[i:i + 1], START, END, max_len=10)[0]
        assert g_alone.tokens == g[i].tokens and abs(g_alone.score - g[i].score) < 1e-4
        np.testing.assert_allclose(g_alone.alphas, g[i].alphas, atol=1e-5)


def test_length_penalty_prefers_longer_captions():
    model, feats = model_and_feats(seed=3, batch=8)
    raw = decode(model, feats, START, END, beam_size=4, max_len=12, length_penalty=0.0)
    norm = decode(model, feats, START, END, beam_size=4, max_len=12, length_penalty=2.0)
    assert sum(len(c.tokens) for c in norm) >= sum(len(c.tokens) for c in raw)


def test_sampling_top_k_one_is_greedy_and_seeded_sampling_repeats():
    model, feats = model_and_feats(seed=4)
    g = greedy(model, feats, START, END, max_len=8)
    s = sample(model, feats, START, END, max_len=8, top_k=1)
    assert [c.tokens for c in g] == [c.tokens for c in s]
    a = sample(model, feats, START, END, 8, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = sample(model, feats, START, END, 8, temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert [c.tokens for c in a] == [c.tokens for c in b]
    for c in a:
        assert c.alphas.shape == (len(c.tokens), 6)


def eager_to_end(seed=5, batch=4):
    """A model for which <end> is by far the most likely word at every step, the first included."""
    model, feats = model_and_feats(seed, batch)
    with torch.no_grad():
        model.fc2.bias[END] += 20.0
    assert all(not c.tokens for c in greedy(model, feats, START, END, max_len=8, min_len=0))
    return model, feats


def test_end_cannot_come_before_min_len_in_greedy_beam_and_sampling():
    model, feats = eager_to_end()
    rng = torch.Generator().manual_seed(0)
    for min_len in (1, 3):
        results = {
            "greedy": greedy(model, feats, START, END, max_len=8, min_len=min_len),
            "beam": [h[0] for h in beam_search(model, feats, START, END, 3, 8, min_len=min_len)],
            "decode": decode(model, feats, START, END, beam_size=2, max_len=8, min_len=min_len),
            "sample": sample(model, feats, START, END, 8, generator=rng, min_len=min_len),
        }
        for name, caps in results.items():
            assert [len(c.tokens) for c in caps] == [min_len] * len(feats), name  # then <end>, as forced
            for b, c in enumerate(caps):
                assert END not in c.tokens and START not in c.tokens and c.alphas.shape == (min_len, 6)
                # the score is the model's own log-probability of the words and <end>, not renormalised
                assert abs(c.score - teacher_forced_logprob(model, feats[b], c.tokens, True)) < 1e-3, name


def test_default_min_len_is_one_and_beam_one_still_equals_greedy():
    model, feats = eager_to_end()
    assert all(len(c.tokens) == 1 for c in greedy(model, feats, START, END, max_len=8))
    assert all(len(h[0].tokens) == 1 for h in beam_search(model, feats, START, END, 4, 8))
    for min_len in (1, 4):
        g = greedy(model, feats, START, END, max_len=8, min_len=min_len)
        b = beam_search(model, feats, START, END, beam_size=1, max_len=8, min_len=min_len)
        assert [c.tokens for c in g] == [h[0].tokens for h in b]
        assert all(abs(x.score - y[0].score) < 1e-4 for x, y in zip(g, b))
    forced = greedy(model, feats, START, END, max_len=5, min_len=5)  # never ends: exactly max_len
    assert all(len(c.tokens) == 5 for c in forced)


def test_min_len_beyond_max_len_is_a_clear_error():
    model, feats = model_and_feats()
    for call in (lambda: greedy(model, feats, START, END, max_len=3, min_len=4),
                 lambda: beam_search(model, feats, START, END, 2, max_len=3, min_len=4),
                 lambda: sample(model, feats, START, END, 0)):
        with pytest.raises(AttncapError, match="min_len"):
            call()


HEALTHY = ["a red circle to the left of a blue square", "two green stars", "a small yellow box",
           "from top to bottom a purple disk and a big orange diamond", "a tiny blue circle",
           "three shapes a red star a green box and a blue disk"]


@pytest.mark.parametrize("captions, expected", [
    (HEALTHY, None),
    (["two green stars"] * 3, None),                      # 3 images: too few to call them identical
    (["", "a red circle", "", "a blue box"], "2 of 4 captions are empty"),
    (HEALTHY[:2] + ["a red circle"] * 4, "4 of 6 captions are the same caption 'a red circle'"),
    (["a a a a", "a red a a a", "a a red the", "the a a a a", "a a", "a the a red"] * 2,
     "of all caption words are 'a', "),
])
def test_diagnose_captions(captions, expected):
    found = diagnose_captions(captions)
    assert (found is None) if expected is None else (expected in found), found


def test_evaluate_warns_in_one_line_what_it_saw_and_what_to_do(capsys):
    warn_degenerate({i: {"caption": "a red circle"} for i in range(5)}, "test")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: test captions") and "5 of 5" in err[0]
    assert "train longer" in err[0] and "check the data" in err[0]
    warn_degenerate({i: {"caption": c} for i, c in enumerate(HEALTHY)}, "test")
    assert capsys.readouterr().err == ""


UNK = 3


def trigrams_repeat(tokens: list[int]) -> bool:
    grams = list(zip(tokens, tokens[1:], tokens[2:]))
    return len(grams) != len(set(grams))


def all_decoders(model, feats, max_len=10, **rules) -> dict[str, list[list[int]]]:
    """Every caption of greedy, beam search (all n-best), decode and sampling, as token lists."""
    return {
        "greedy": [c.tokens for c in greedy(model, feats, START, END, max_len, **rules)],
        "beam": [h.tokens for hyps in beam_search(model, feats, START, END, 3, max_len, n_best=3, **rules)
                 for h in hyps],
        "decode": [c.tokens for c in decode(model, feats, START, END, 2, max_len, **rules)],
        "sample": [c.tokens for c in sample(model, feats, START, END, max_len,
                                            generator=torch.Generator().manual_seed(0), **rules)],
    }


def test_banned_unk_never_appears_even_from_a_model_biased_to_it():
    model, feats = model_and_feats(seed=6)
    with torch.no_grad():
        model.fc2.bias[UNK] += 6.0
    assert all(UNK in caps[0] for caps in all_decoders(model, feats).values())  # it would write <unk>
    for name, caps in all_decoders(model, feats, banned=(UNK,)).items():
        assert all(UNK not in c and c for c in caps), name
    g = greedy(model, feats, START, END, 10, banned=(UNK,))
    for b, c in enumerate(g):  # the score is still the model's own log-probability
        assert abs(c.score - teacher_forced_logprob(model, feats[b], c.tokens, len(c.tokens) < 10)) < 1e-4


def repeater(seed=7):
    """A model that writes one word over and over: every caption repeats a trigram."""
    model, feats = model_and_feats(seed)
    with torch.no_grad():
        model.fc2.bias[5] += 4.0
        model.fc2.bias[END] -= 3.0
    return model, feats


def test_block_trigrams_leaves_no_repeated_trigram_in_greedy_beam_and_sampling():
    model, feats = repeater()
    assert all(trigrams_repeat(c) for c in all_decoders(model, feats)["greedy"])
    for name, caps in all_decoders(model, feats, block_trigrams=True, banned=(UNK,)).items():
        assert not any(trigrams_repeat(c) for c in caps), name
        assert all(UNK not in c for c in caps), name
    b = beam_search(model, feats, START, END, beam_size=1, max_len=10, block_trigrams=True, banned=(UNK,))
    g = greedy(model, feats, START, END, 10, block_trigrams=True, banned=(UNK,))
    assert [c.tokens for c in g] == [h[0].tokens for h in b]  # beam size 1 is still greedy
    assert all(abs(x.score - y[0].score) < 1e-4 for x, y in zip(g, b))


def test_block_trigrams_changes_nothing_when_no_trigram_would_repeat():
    model, feats = model_and_feats(seed=2, batch=6)
    plain = all_decoders(model, feats * 10)
    assert not any(trigrams_repeat(c) for caps in plain.values() for c in caps)
    assert max(len(c) for caps in plain.values() for c in caps) >= 4  # long enough to have trigrams
    assert all_decoders(model, feats * 10, block_trigrams=True) == plain


def test_repeated_trigrams_are_found_at_every_position():
    from attncap.decoding import _trigram_repeats

    history = torch.tensor([[4, 5, 6, 4, 5], [4, 5, 6, 7, 8], [4, 4, 4, 4, 4], [5, 6, 7, 5, 6]])
    banned = _trigram_repeats(history, 10)
    assert [row.nonzero().squeeze(1).tolist() for row in banned] == [[6], [], [4], [7]]


def first_repeat(tokens: list[int]) -> int | None:
    """The position of the first word that completes a trigram already written, or None."""
    for i in range(3, len(tokens)):
        if tuple(tokens[i - 2:i + 1]) in set(zip(tokens[:i - 1], tokens[1:i], tokens[2:i])):
            return i
    return None


def test_block_trigrams_changes_a_greedy_caption_only_from_its_first_repeat_on():
    model, feats = model_and_feats(seed=2, batch=6)
    with torch.no_grad():
        model.fc2.bias[END] -= 1.5  # long captions that loop
    plain = greedy(model, feats * 10, START, END, 12)
    blocked = greedy(model, feats * 10, START, END, 12, block_trigrams=True)
    assert any(first_repeat(c.tokens) is not None for c in plain)
    for a, b in zip(plain, blocked):
        i = first_repeat(a.tokens)
        if i is None:
            assert b.tokens == a.tokens
        else:
            assert b.tokens[:i] == a.tokens[:i] and b.tokens[i:i + 1] != a.tokens[i:i + 1]
            assert first_repeat(b.tokens) is None
