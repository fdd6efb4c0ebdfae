"""Scores only the shapes world can give, from its objects.json (colour, shape and box per object).

- :func:`attribute_scores`: do captions name the right (colour, shape) objects?
- :func:`grounding_scores`: does the attention of colour/shape words land on the named object?
  (the shared :func:`attncap.grounding.grounding_scores`, fed with the shapes world's mentions)
"""

from __future__ import annotations

import numpy as np

from .. import grounding
from ..errors import AttncapError
from .shapes import named_objects


def _objects_of(objects: dict, image_id: int) -> list[dict]:
    """The objects of one image; keys may be ints or the strings of objects.json."""
    found = objects.get(image_id, objects.get(str(image_id)))
    if found is None:
        raise AttncapError(f"no objects for image {image_id}; pass the objects.json of the same shapes world")
    return found


def attribute_scores(candidates: dict[int, str], objects: dict[int, list[dict]]) -> dict[str, float]:
    """How well captions name the objects of shapes-world images, over the whole set.

    objects: {image id: [{"colour", "shape", ...}]} (objects.json). Captions are lowercased and split
    on whitespace, then parsed with :func:`attncap.data.shapes.named_objects`.
    Returns attribute_recall (share of all objects whose (colour, shape) is named in their caption),
    attribute_precision (share of mentions naming a (colour, shape) present in the image; 0.0 when
    nothing is named) and the counts attribute_objects and attribute_mentions.
    """
    n_objects = recalled = n_mentions = correct = 0
    for image_id, caption in candidates.items():
        present = [(o["colour"], o["shape"]) for o in _objects_of(objects, image_id)]
        mentions = [(m.colour, m.shape) for m in named_objects(caption.lower().split())]
        n_objects += len(present)
        recalled += sum(pair in mentions for pair in present)
        n_mentions += len(mentions)
        correct += sum(pair in present for pair in mentions)
    return {"attribute_recall": recalled / n_objects if n_objects else 0.0,
            "attribute_precision": correct / n_mentions if n_mentions else 0.0,
            "attribute_objects": n_objects, "attribute_mentions": n_mentions}


def mentions(words: list[str], image_objects: list[dict]) -> list[grounding.Mention]:
    """Each colour word and shape word of a (colour, shape) present, with the boxes of matching objects."""
    found = []
    for mention in named_objects(list(words)):
        boxes = tuple(tuple(o["bbox"]) for o in image_objects
                      if (o["colour"], o["shape"]) == (mention.colour, mention.shape))
        if boxes:
            found += [grounding.Mention(mention.colour_index, boxes), grounding.Mention(mention.shape_index, boxes)]
    return found


def grounding_scores(tokens: dict[int, list[str]], attention: dict[int, np.ndarray],
                     objects: dict[int, list[dict]], image_size: int) -> dict[str, float]:
    """Grounding of colour/shape words on shapes-world images (see :mod:`attncap.grounding`).

    tokens: {image id: caption words}; attention: {image id: (n_tokens, gh, gw)} with row i for
    tokens[id][i]; objects: {image id: [{"bbox": [x, y, w, h], "colour", "shape"}]} in pixels of
    the (image_size, image_size) image. Every mention of a (colour, shape) present in the image
    counts twice (its colour word and its shape word), against the boxes of every object with that
    colour and shape.
    """
    found = {i: mentions(words, _objects_of(objects, i)) for i, words in tokens.items()}
    return grounding.grounding_scores(found, attention, {i: (image_size, image_size) for i in tokens},
                                      {i: len(words) for i, words in tokens.items()})
