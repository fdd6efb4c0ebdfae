"""CIDEr-D as a reward against pycocoevalcap's Cider: hand-made and random cases, batches with
several samples per image, the cached document frequencies."""

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from attncap.errors import AttncapError
from attncap.reward import CiderD


def coco(references: dict[int, list[str]], candidates: dict[int, str]) -> dict[int, float]:
    """pycocoevalcap's per-image CIDEr-D, document frequencies from these references."""
    ids = sorted(references)
    _, scores = Cider().compute_score({i: references[i] for i in ids}, {i: [candidates[i]] for i in ids})
    return dict(zip(ids, scores.tolist()))


HAND = {
    1: ["a red circle above a blue square", "a red circle", "the circle is red and the square is blue"],
    2: ["two green stars", "two small green stars side by side"],
    3: ["a yellow box", "a yellow box next to a yellow box", "one box", "a box that is yellow",
        "yellow"],
    4: ["a purple disk"],
}


@pytest.mark.parametrize("candidates", [
    {1: "a red circle above a blue square", 2: "two green stars", 3: "a yellow box", 4: "a purple disk"},
    {1: "a red circle a red circle a red circle", 2: "stars", 3: "", 4: "a zebra on a purple disk"},
    {1: "circle", 2: "two two two two", 3: "yellow yellow box box", 4: "unseen words only here"},
    {1: "the square is blue", 2: "green", 3: "a box that is yellow and a yellow box", 4: "disk purple a"},
])
def test_hand_made_cases_equal_pycocoevalcap(candidates):
    ours = CiderD.build(HAND).score(list(candidates), list(candidates.values()))
    np.testing.assert_allclose(ours, list(coco(HAND, candidates).values()), atol=1e-6, rtol=0)


def random_corpus(rng, images=60, words=25):
    vocab = [f"w{k}" for k in range(words)]
    sentence = lambda lo, hi: " ".join(rng.choice(vocab, rng.integers(lo, hi + 1)))
    refs = {int(i): [sentence(1, 14) for _ in range(rng.integers(1, 7))]
            for i in rng.choice(10_000, images, replace=False)}
    return refs, lambda: sentence(0, 16)


@pytest.mark.parametrize("seed", range(5))
def test_random_cases_equal_pycocoevalcap(seed):
    rng = np.random.default_rng(seed)
    refs, sentence = random_corpus(rng, words=[8, 25, 200, 25, 60][seed])
    reward = CiderD.build(refs)
    for _ in range(3):
        candidates = {i: sentence() for i in refs}
        expected = coco(refs, candidates)
        ours = reward.score(list(candidates), list(candidates.values()))
        np.testing.assert_allclose(ours, [expected[i] for i in candidates], atol=1e-6, rtol=0)


def test_a_batch_of_samples_uses_the_training_document_frequencies():
    """n samples of a few images in one call: each equals pycocoevalcap over the whole training set
    (document frequencies depend on the references only, not on the other candidates)."""
    rng = np.random.default_rng(9)
    refs, sentence = random_corpus(rng)
    reward = CiderD.build(refs)
    batch = [int(i) for i in rng.choice(sorted(refs), 8, replace=False)]
    samples = [[sentence() for _ in batch] for _ in range(5)]
    ids = [i for _ in samples for i in batch]
    ours = reward.score(ids, [c for s in samples for c in s])          # 40 captions in one call
    expected = []
    for s in samples:
        full = coco(refs, {**{i: "" for i in refs}, **dict(zip(batch, s))})
        expected += [full[i] for i in batch]
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_word_ids_from_a_model_vocabulary_score_like_text():
    refs = HAND
    reward = CiderD.build(refs)
    vocabulary = ["<pad>", "<start>", "<end>", "<unk>", "a", "red", "circle", "zebra", "box", "yellow"]
    tokens = np.array([[4, 5, 6, 0, 0], [4, 9, 8, 3, 7], [9, 0, 0, 0, 0]])  # 0 = padding
    words = np.where(tokens > 0, reward.word_ids(vocabulary)[tokens], -1)
    text = [" ".join(vocabulary[t] for t in row if t) for row in tokens]
    np.testing.assert_array_equal(reward.score_ids([1, 3, 3], words), reward.score([1, 3, 3], text))
    with pytest.raises(AttncapError, match="no references for image 99"):
        reward.score([99], ["a box"])


def test_document_frequencies_are_computed_once_and_cached(tmp_path, monkeypatch):
    refs, _ = random_corpus(np.random.default_rng(3))
    path = tmp_path / "cider_df.npz"
    first = CiderD.cached(path, refs)
    assert path.is_file()
    built = []
    original = CiderD.build.__func__
    monkeypatch.setattr(CiderD, "build", classmethod(lambda cls, r: built.append(1) or original(cls, r)))
    again = CiderD.cached(path, refs)
    assert built == []  # loaded, not recomputed
    ids, caps = sorted(refs)[:5], ["w1 w2 w3", "w4", "", "w5 w5 w5", "w0 w1"]
    np.testing.assert_array_equal(first.score(ids, caps), again.score(ids, caps))
    changed = {**refs, ids[0]: ["w9 w9"]}
    rebuilt = CiderD.cached(path, changed)
    assert built == [1] and rebuilt.fingerprint != first.fingerprint
    np.testing.assert_allclose(rebuilt.score([ids[0]], ["w9 w9"]),
                               [coco(changed, {i: "w9 w9" for i in changed})[ids[0]]], atol=1e-6)
    path.write_bytes(b"torn")
    assert CiderD.cached(path, refs).fingerprint == first.fingerprint  # a damaged cache is rebuilt
