"""Tests for caption scores, checked against hand-computed values."""

import math

import numpy as np
import pytest

from attncap import metrics
from attncap.data import shapes_scores
from attncap.errors import AttncapError

OBJECTS = {
    1: [{"bbox": [0, 0, 64, 64], "colour": "red", "shape": "circle", "size": "large"},
        {"bbox": [100, 100, 40, 40], "colour": "blue", "shape": "square", "size": "small"}],
    2: [{"bbox": [150, 10, 40, 40], "colour": "green", "shape": "triangle", "size": "small"}],
}


def test_caption_scores_tokenized_returns_all_keys_and_perfect_match():
    references = {1: ["A big red circle, to the left of a blue box.", "a red disk and a small blue square"],
                  2: ["There is one green triangle!", "a little green triangle at the top"]}
    candidates = {1: "a big red circle to the left of a blue box", 2: "there is one green triangle"}
    scores = metrics.caption_scores(references, candidates, spice=False, tokenize=True)
    assert set(metrics.METRIC_KEYS) <= set(scores) and "SPICE" not in scores
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # punctuation and case removed by PTBTokenizer
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["METEOR"] > 0.9 and scores["CIDEr"] > 0


def test_caption_scores_untokenized_bleu_by_hand():
    # c = 3 words, closest reference r = 6: brevity penalty exp(1 - 6/3); 1- to 3-gram precisions are 1
    scores = metrics.caption_scores({7: ["a red circle on the left"]}, {7: "a red circle"}, spice=False,
                                    tokenize=False)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3"):
        assert scores[key] == pytest.approx(math.exp(-1), rel=1e-6)
    # no 4-gram: pycocoevalcap smooths the 4-gram precision to tiny / small = 1e-15 / 1e-9
    assert scores["BLEU-4"] == pytest.approx(math.exp(-1) * 1e-6 ** 0.25, rel=1e-6)
    assert 0 < scores["METEOR"] < 1


def test_cider_by_hand():
    # disjoint vocabularies: every n-gram has idf log(2); image 1 shares 2/3 unigrams and 1/2 bigrams,
    # image 2 matches for n = 1..3 and has no 4-grams: (10 * (2/3 + 1/2) / 4 + 10 * 3 / 4) / 2
    references = {1: ["a red disk"], 2: ["two blue squares"]}
    candidates = {1: "a red circle", 2: "two  blue squares"}
    assert metrics.cider(references, candidates) == pytest.approx((10 * (2 / 3 + 1 / 2) / 4 + 7.5) / 2)
    identical = {1: "a big red circle here", 2: "two blue squares over there"}
    assert metrics.cider({k: [v] for k, v in identical.items()}, identical) == pytest.approx(10.0)


def test_missing_or_extra_candidates_name_the_image():
    with pytest.raises(AttncapError, match="image 2"):
        metrics.cider({1: ["a b"], 2: ["c d"]}, {1: "a b"})
    with pytest.raises(AttncapError, match="image 5"):
        metrics.caption_scores({1: ["a b"]}, {1: "a b", 5: "c"})


def test_coco_results_sorted():
    assert metrics.coco_results({3: "b", 1: "a"}) == [{"image_id": 1, "caption": "a"},
                                                     {"image_id": 3, "caption": "b"}]


def test_spice_reason_is_reported_without_downloading():
    reason = metrics.spice_unavailable()
    assert reason is None or "stanford-corenlp" in reason


def test_attribute_scores_by_hand():
    perfect = {1: "a red circle and a small blue box", 2: "one green triangle"}
    assert shapes_scores.attribute_scores(perfect, OBJECTS)["attribute_recall"] == 1.0
    assert shapes_scores.attribute_scores(perfect, OBJECTS)["attribute_precision"] == 1.0
    # objects: red circle yes, blue square yes, green triangle no -> 2/3
    # mentions: red circle yes, green square no, blue square yes, yellow star no -> 2/4
    wrong = {1: "a red circle a green square and a blue square", 2: "a yellow star"}
    scores = shapes_scores.attribute_scores(wrong, {str(k): v for k, v in OBJECTS.items()})  # objects.json keys
    assert scores["attribute_recall"] == pytest.approx(2 / 3)
    assert scores["attribute_precision"] == pytest.approx(0.5)
    assert (scores["attribute_objects"], scores["attribute_mentions"]) == (3, 4)
    with pytest.raises(AttncapError, match="image 9"):
        shapes_scores.attribute_scores({9: "a red circle"}, OBJECTS)


def _attention(n_tokens, peaks):
    """(n_tokens, 7, 7) uniform maps with one peak cell per listed token."""
    alpha = np.full((n_tokens, 7, 7), 0.01)
    for token, (row, col) in peaks.items():
        alpha[token, row, col] = 1.0
    return alpha


def test_grounding_by_hand():
    tokens = {1: "a red circle and a blue star".split()}  # the blue star is not in the image: not counted
    # 224 px / 7 cells = 32 px cells; centres 16 and 48 fall in the 64 px red circle box: 4 of 49 cells
    inside = shapes_scores.grounding_scores(tokens, {1: _attention(7, {1: (0, 0), 2: (1, 1)})}, OBJECTS, 224)
    # mass: the 4 box cells hold 1 + 3 x 0.01 of the row's 1 + 48 x 0.01
    assert inside == {"grounding": 1.0, "grounding_chance": pytest.approx(4 / 49), "grounding_words": 2,
                      "grounding_mass": pytest.approx(1.03 / 1.48)}
    outside = shapes_scores.grounding_scores(tokens, {1: _attention(7, {1: (6, 6), 2: (2, 0)})}, OBJECTS, 224)
    assert outside["grounding"] == 0.0 and outside["grounding_words"] == 2
    half = shapes_scores.grounding_scores(tokens, {1: _attention(7, {1: (0, 1), 2: (3, 3)})}, OBJECTS, 224)
    assert half["grounding"] == 0.5


def test_grounding_any_matching_box_and_chance_over_words():
    objects = {1: [{"bbox": [0, 0, 64, 64], "colour": "red", "shape": "circle"},
                   {"bbox": [160, 160, 64, 64], "colour": "red", "shape": "circle"},
                   {"bbox": [96, 0, 32, 32], "colour": "blue", "shape": "square"}]}
    tokens = {1: "two red circles and a blue box".split()}
    alpha = _attention(7, {1: (6, 6), 2: (5, 5), 5: (0, 3), 6: (0, 0)})  # box word points at a circle
    scores = shapes_scores.grounding_scores(tokens, {1: alpha}, objects, 224)
    assert scores["grounding"] == pytest.approx(3 / 4)
    assert scores["grounding_chance"] == pytest.approx((8 / 49 + 8 / 49 + 1 / 49 + 1 / 49) / 4)


def test_grounding_rejects_misaligned_attention():
    with pytest.raises(AttncapError, match="image 1"):
        shapes_scores.grounding_scores({1: ["a", "red", "circle"]}, {1: np.ones((2, 7, 7))}, OBJECTS, 224)
