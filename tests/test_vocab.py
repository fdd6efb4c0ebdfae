import pytest

from attncap.errors import AttncapError
from attncap.vocab import SPECIALS, Vocab, build_vocab, pad_batch, tokenize


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("A dog, running!  Fast.") == ["a", "dog", "running", "fast"]
    assert tokenize("Crème brûlée's café") == ["crème", "brûlée", "s", "café"]
    assert tokenize("   \t ") == []


def test_build_vocab_top_k_min_count_and_ties():
    caps = ["b a", "a c", "a b", "d"]
    v = build_vocab(caps, top_k=2)
    assert v.words[:4] == SPECIALS and v.words[4:] == ("a", "b")  # a=3, b=2, then c=d=1
    v = build_vocab(caps, top_k=10, min_count=2)
    assert v.words[4:] == ("a", "b")
    v = build_vocab(["z y", "y z"], top_k=10)
    assert v.words[4:] == ("y", "z")  # equal counts: alphabetical, independent of order


def test_encode_decode_round_trip_and_unknown_words():
    v = build_vocab(["a red circle", "a blue square"])
    ids = v.encode("A red square!")
    assert ids[0] == v.start and ids[-1] == v.end
    assert v.decode(ids) == ["a", "red", "square"]
    assert v.encode("a purple star")[2:4] == [v.unk, v.unk]
    assert v.encode("a red circle", max_words=2) == [v.start, v.id("a"), v.id("red"), v.end]
    assert v.decode([v.start, v.id("red"), v.end, v.id("a")]) == ["red"]


def test_save_load_and_corrupt_file(tmp_path):
    v = build_vocab(["one two three"])
    v.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == v
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AttncapError, match="bad.json"):
        Vocab.load(tmp_path / "bad.json")


def test_pad_batch():
    assert pad_batch([[1, 2, 3], [1]]) == [[1, 2, 3], [1, 0, 0]]
