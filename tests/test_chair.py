"""CHAIR against hand-computed values, on instance annotations read from a COCO instances JSON."""

import json

import pytest

from attncap import chair
from attncap.config import DataConfig
from attncap.errors import AttncapError
from attncap.instances import find_instances, load_instances, split_instances

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 58, "name": "hot dog"},
              {"id": 88, "name": "teddy bear"}, {"id": 65, "name": "bed"}, {"id": 10, "name": "traffic light"}]
OBJECTS = {1: [1, 18], 2: [58], 3: [88, 65], 4: [10]}  # image id -> category ids
REFERENCES = {1: ["A man walks his dog."], 2: ["A hot dog on a plate next to a cup."],
              3: ["A stuffed toy on a bed"], 4: ["Cars wait at a red light."]}
CANDIDATES = {
    1: "a woman walking two dogs and a cat",              # synonym, plural, and a hallucinated cat
    2: "a hot dog and a cup of coffee",                   # two-word category (no "dog"); cup from a reference
    3: "a teddy bear sitting on a bed next to a laptop",  # two-word category; a hallucinated laptop
    4: "a street with traffic lights",                    # two-word plural
}


def write_instances(path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in OBJECTS]
    anns = [{"id": 10 * i + k, "image_id": i, "category_id": c, "bbox": [10.0 * k, 20.0, 30.0, 40.0]}
            for i, cats in OBJECTS.items() for k, c in enumerate(cats)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path


def test_chair_by_hand(tmp_path):
    instances = load_instances([write_instances(tmp_path / "instances_val2014.json")])
    assert instances[3].boxes == {"teddy bear": [[0.0, 20.0, 30.0, 40.0]], "bed": [[10.0, 20.0, 30.0, 40.0]]}
    truth = chair.ground_truth({i: set(o.boxes) for i, o in instances.items()}, REFERENCES)
    assert truth[2] == {"hot dog", "cup"}  # the cup is named by a reference only
    scores, hallucinated = chair.chair_scores(CANDIDATES, truth)
    # mentions per caption: {person, dog, cat}, {hot dog, cup}, {teddy bear, bed, laptop}, {traffic light}
    assert scores == {"CHAIRs": pytest.approx(2 / 4), "CHAIRi": pytest.approx(2 / 9),
                      "chair_captions": 4, "chair_mentions": 9}
    assert hallucinated == {1: ["cat"], 2: [], 3: ["laptop"], 4: []}


def test_phrases_longest_first_and_modifiers():
    words = "a baby elephant near two hot dogs and teddy bears at the bus stop".split()
    assert chair.named_objects(words) == [(2, "baby elephant", "elephant"), (6, "hot dogs", "hot dog"),
                                          (9, "teddy bears", "teddy bear")]
    assert chair.named_objects("people riding bikes past buses and ponies".split()) == [
        (0, "people", "person"), (2, "bikes", "bicycle"), (4, "buses", "bus"), (6, "ponies", "horse")]
    assert chair.plural("bus") == "buses" and chair.plural("pony") == "ponies" and chair.plural("hot dog") == "hot dogs"


def test_every_coco_category_is_listed_and_named_by_its_own_name():
    assert len(chair.OBJECT_WORDS) == 80
    table = chair.phrase_table()
    for category in chair.OBJECT_WORDS:
        if category != "orange":  # left out on purpose: "orange" is mostly the colour in captions
            assert table[tuple(category.split())] == category


def test_instances_are_found_next_to_the_data(tmp_path):
    write_instances(tmp_path / "instances_val2014.json")
    (tmp_path / "captions_val2014.json").write_text("{}")
    assert find_instances(DataConfig(captions=str(tmp_path / "captions_val2014.json"))) == [
        tmp_path / "instances_val2014.json"]
    (tmp_path / "annotations").mkdir()
    for split in ("train2014", "val2014"):
        write_instances(tmp_path / "annotations" / f"instances_{split}.json")
    assert [p.name for p in find_instances(DataConfig(images=str(tmp_path)))] == [
        "instances_val2014.json", "instances_train2014.json"]
    assert find_instances(DataConfig(images=str(tmp_path / "annotations"))) == []  # none: CHAIR not reported
    assert split_instances(DataConfig(images=str(tmp_path / "annotations")), [1]) is None
    with pytest.raises(AttncapError, match="data.instances names .*nope.json"):
        find_instances(DataConfig(instances=str(tmp_path / "nope.json")))
    with pytest.raises(AttncapError, match="image 99 .*data.instances"):
        split_instances(DataConfig(instances=str(tmp_path / "instances_val2014.json")), [1, 99])
