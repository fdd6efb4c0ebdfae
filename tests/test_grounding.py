"""Attention grounding (argmax in box, chance, attention mass) against hand-computed values, and the
shapes-world figure unchanged by the move to the shared implementation."""

import numpy as np
import pytest
import torch

from attncap import grounding
from attncap.checkpoint import load_model
from attncap.data import shapes_scores
from attncap.data.shapes import load_objects, named_objects
from attncap.dataset import CaptionSplit
from attncap.decoding import decode_split
from attncap.features import FeatureStore
from attncap.files import read_json
from attncap.instances import ImageObjects, mentions
from attncap.prepare import load_split


def test_coverage_of_overlapping_boxes_on_a_wide_image_is_exact():
    # 200 x 100 image, 2 x 4 grid of 50 px cells; A covers half of cells (0,0) and (0,1), B all of (0,1), (1,1)
    boxes = [(25, 0, 50, 50), (50, 0, 50, 100)]
    expected = np.array([[0.5, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    np.testing.assert_allclose(grounding.box_coverage(boxes, 2, 4, 200, 100), expected)  # union, not 1.5
    assert grounding.centre_cells(boxes, 2, 4, 200, 100).tolist() == [[True, True, False, False],
                                                                     [False, True, False, False]]


def test_grounding_by_hand_over_two_images():
    wide = {7: [grounding.Mention(0, ((25, 0, 50, 50), (50, 0, 50, 100)))]}
    alpha_wide = np.array([[[0.1, 0.2, 0.3, 0.0], [0.0, 0.1, 0.2, 0.1]]])  # argmax (0, 2): outside
    # COCO: "a teddy bear on a bed", the bear's box is the top-left quarter; the bed is not annotated
    words = "a teddy bear on a bed".split()
    objects = ImageObjects(640, 480, {"teddy bear": [[0, 0, 320, 240]], "cat": [[0, 0, 10, 10]]})
    found = mentions(words, objects)
    assert found == [grounding.Mention(2, ((0, 0, 320, 240),))]  # at the phrase's last word
    alpha_coco = np.full((6, 2, 2), 0.25)
    alpha_coco[2] = [[0.7, 0.1], [0.1, 0.1]]
    scores = grounding.grounding_scores({**wide, 9: found}, {7: alpha_wide, 9: alpha_coco},
                                        {7: (200, 100), 9: (640, 480)}, {7: 1, 9: 6})
    assert scores == {"grounding": 0.5, "grounding_chance": pytest.approx((3 / 8 + 1 / 4) / 2),
                      "grounding_mass": pytest.approx((0.35 + 0.7) / 2), "grounding_words": 2}
    assert grounding.grounding_scores({}, {}, {})["grounding_words"] == 0


def frozen_shapes_grounding(tokens, attention, objects, image_size):
    """The shapes-world grounding as metrics.grounding_scores computed it before the shared module."""
    hits, chance, words = 0, 0.0, 0
    for image_id, caption in tokens.items():
        alpha = np.asarray(attention[image_id], dtype=np.float64)
        image_objects = objects[image_id]
        for mention in named_objects(list(caption)):
            boxes = [o["bbox"] for o in image_objects if (o["colour"], o["shape"]) == (mention.colour, mention.shape)]
            if not boxes:
                continue
            gh, gw = alpha.shape[1:]
            xs = (np.arange(gw) + 0.5) * image_size / gw
            ys = (np.arange(gh) + 0.5) * image_size / gh
            inside = np.zeros((gh, gw), dtype=bool)
            for x, y, w, h in boxes:
                inside |= ((ys >= y) & (ys <= y + h))[:, None] & ((xs >= x) & (xs <= x + w))[None, :]
            for index in (mention.colour_index, mention.shape_index):
                row, col = np.unravel_index(int(np.argmax(alpha[index])), inside.shape)
                hits += bool(inside[row, col])
                chance += float(inside.mean())
                words += 1
    return {"grounding": hits / words if words else 0.0,
            "grounding_chance": chance / words if words else 0.0, "grounding_words": words}


def test_shapes_world_grounding_unchanged_on_the_tiny_trained_run(trained_run):
    model, vocab, cfg, _ = load_model(trained_run / "checkpoints" / "best", torch.device("cpu"))
    image_size, objects = load_objects(read_json(trained_run / "data" / "manifest.json")["objects"])
    for split in ("test", "train"):
        data = CaptionSplit(FeatureStore.open(trained_run / "features", split), load_split(trained_run / "data", split))
        decoded = decode_split(model, data, vocab, 1, 12, 0.0, 16, torch.device("cpu"), False, 0)
        tokens = {i: d["words"] for i, d in decoded.items()}
        attention = {i: d["attention"] for i, d in decoded.items()}
        subset = {i: objects[i] for i in decoded}
        new = shapes_scores.grounding_scores(tokens, attention, subset, image_size)
        old = frozen_shapes_grounding(tokens, attention, subset, image_size)
        assert {k: new[k] for k in old} == old
    # and on made-up captions naming every object, with random attention: many more mentions
    rng = np.random.default_rng(0)
    tokens = {i: " and ".join(f"a {o['colour']} {o['shape']}" for o in objs).split() for i, objs in objects.items()}
    attention = {i: rng.random((len(t), 4, 4)) for i, t in tokens.items()}
    old = frozen_shapes_grounding(tokens, attention, objects, image_size)
    assert old["grounding_words"] > 100
    new = shapes_scores.grounding_scores(tokens, attention, objects, image_size)
    assert {k: new[k] for k in old} == old
