"""attncap's caption scores equal the official coco-caption path (pycocotools COCO + COCOEvalCap)."""

import json

import pycocoevalcap.eval
import pycocoevalcap.meteor.meteor
import pytest
from pycocotools.coco import COCO

from attncap import metrics
from attncap.prepare import load_coco_captions, raw_references

# References as people write them: capitals, punctuation, contractions, quotes, hyphens, non-ASCII.
REFERENCES = {
    3: ["A man's riding a bike down the street.", "Don't miss the cyclist -- he's fast!",
        "A cyclist in Zürich, wearing a red helmet.", "The man can't stop; he's late."],
    8: ["Two dogs play in the snow.", "A St. Bernard and a husky romp in the snow…",
        "\"Snow day!\" say the dogs.", "Dogs (two of them) playing outside in winter."],
    12: ["A café table with crème brûlée and coffee.", "Someone's dessert: a crème brûlée.",
         "A naïve-looking waiter brings the dessert", "COFFEE AND CAKE ON A TABLE."],
    20: ["A pizza with olives, peppers & cheese.", "It's a pizza that's been cut into 8 slices.",
         "A pizza on a wooden board", "Here's a pizza; it isn't small."],
}
CANDIDATES = {3: "a man riding a bike down the street", 8: "two dogs playing in the snow",
              12: "a cafe table with a dessert and coffee", 20: "a pizza that's cut into slices"}
OTHER = {3: "a man on a bike", 8: "a dog in the snow", 12: "a table with a cake", 20: "a pizza"}


class NoSpice:
    """Stands in for SPICE (its Stanford models are not installed here): COCOEvalCap runs it last."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


def write_fixture(tmp_path, candidates):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in REFERENCES]
    anns = [{"id": 100 * i + k, "image_id": i, "caption": c}
            for i, caps in REFERENCES.items() for k, c in enumerate(caps)]
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns,
                                    "type": "captions"}, ensure_ascii=False), encoding="utf-8")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(metrics.coco_results(candidates)), encoding="utf-8")
    return captions, results


def official(captions, results, monkeypatch):
    """The scores of coco-caption's own evaluation over pycocotools COCO objects."""
    monkeypatch.setattr(pycocoevalcap.eval, "Spice", NoSpice)
    coco = COCO(str(captions))
    evaluator = pycocoevalcap.eval.COCOEvalCap(coco, coco.loadRes(str(results)))
    evaluator.evaluate()
    names = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4",
             "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}
    return {key: evaluator.eval[name] for key, name in names.items()}


def attncap_references(captions):
    """References the way `prepare` stores them (data/{split}.json) and `evaluate` reads them."""
    records = [{"id": i, **rec} for i, rec in load_coco_captions(captions, captions.parent).items()]
    return raw_references(records)


SETS = {"close": CANDIDATES, "short": OTHER}


@pytest.fixture(scope="module")
def fresh_scores(tmp_path_factory):
    """attncap's scores of each candidate set, each from its own fresh scorer (a METEOR process
    each: the slow part, so both tests below share them)."""
    captions, _ = write_fixture(tmp_path_factory.mktemp("refs"), CANDIDATES)
    refs = attncap_references(captions)
    return {name: metrics.caption_scores(refs, c, spice=False) for name, c in SETS.items()}


@pytest.mark.parametrize("name", list(SETS))
def test_scores_equal_cocoevalcap_on_raw_references(tmp_path, monkeypatch, fresh_scores, name):
    candidates = SETS[name]
    captions, results = write_fixture(tmp_path, candidates)
    expected = official(captions, results, monkeypatch)
    ours = fresh_scores[name]
    assert set(ours) == set(metrics.METRIC_KEYS)
    for key in metrics.METRIC_KEYS:
        assert ours[key] == pytest.approx(expected[key], abs=1e-9, rel=0), key
    assert 0 < ours["CIDEr"] and 0 < ours["METEOR"] < 1


def test_references_reach_the_tokenizer_as_written(tmp_path):
    captions, _ = write_fixture(tmp_path, CANDIDATES)
    refs = attncap_references(captions)
    assert refs[3][1] == "Don't miss the cyclist -- he's fast!"  # not "don t miss ..."
    tokens = metrics.ptb_tokenize(refs)
    assert tokens[3][1] == "do n't miss the cyclist he 's fast"
    assert "zürich" in tokens[3][2] and "crème brûlée" in tokens[12][0]


def test_one_meteor_process_scores_every_setting(tmp_path, monkeypatch, fresh_scores):
    started = []

    class CountingMeteor(pycocoevalcap.meteor.meteor.Meteor):
        def __init__(self):
            started.append(1)
            super().__init__()

    captions, _ = write_fixture(tmp_path, CANDIDATES)
    refs = attncap_references(captions)
    separate = [fresh_scores[name] for name in ("close", "short", "close")]
    monkeypatch.setattr(pycocoevalcap.meteor.meteor, "Meteor", CountingMeteor)
    with metrics.CaptionScorer(refs, spice=False) as scorer:
        shared = [scorer.score(c) for c in (CANDIDATES, OTHER, CANDIDATES)]
    assert len(started) == 1
    assert shared == separate  # a reused METEOR process gives the scores of a fresh one
    assert scorer._meteor is None  # closed on exit
