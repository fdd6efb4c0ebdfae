"""Attention grounding: does the attention of a word that names an object fall on that object?

One implementation for every dataset; the datasets only say which caption tokens name which
boxes (:class:`Mention`): the shapes world from its colour/shape words
(:mod:`attncap.data.shapes_scores`), COCO from its category words (:func:`attncap.instances.mentions`).

The attention grid covers the whole image: every encoder squashes the image to a square without
cropping (:func:`attncap.encoders.to_pixels`), so grid cell (r, c) of a (gh, gw) grid covers
x in [c W / gw, (c + 1) W / gw] and y in [r H / gh, (r + 1) H / gh] of the original W x H image.
Two scores per mention:

- argmax in box (the shapes-world score, generalised): the strongest cell's centre lies in one of
  the boxes; its chance level is the share of cell centres in the boxes;
- attention mass (Liu et al., AAAI 2017, "attention correctness"): the share of the word's
  attention inside the boxes, each cell counting by the share of its area the boxes cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import AttncapError


@dataclass(frozen=True)
class Mention:
    """One caption token that names an object: its attention row and the object's boxes [x, y, w, h]."""

    token: int
    boxes: tuple[tuple[float, float, float, float], ...]


def centre_cells(boxes, gh: int, gw: int, width: float, height: float) -> np.ndarray:
    """(gh, gw) bool: whether each cell's centre lies in any box (edges included)."""
    xs = (np.arange(gw) + 0.5) * width / gw  # (gw,) cell centres in pixels
    ys = (np.arange(gh) + 0.5) * height / gh  # (gh,)
    inside = np.zeros((gh, gw), dtype=bool)
    for x, y, w, h in boxes:
        inside |= ((ys >= y) & (ys <= y + h))[:, None] & ((xs >= x) & (xs <= x + w))[None, :]
    return inside


def _pieces(edges: np.ndarray, starts, ends, size: float):
    """Split [0, size] at the cell edges and box edges: (piece midpoints, lengths, cell of each piece)."""
    cuts = np.unique(np.clip(np.concatenate([edges, starts, ends]), 0, size))
    mids, lengths = (cuts[1:] + cuts[:-1]) / 2, np.diff(cuts)
    return mids, lengths, np.clip(np.searchsorted(edges, mids) - 1, 0, len(edges) - 2)


def box_coverage(boxes, gh: int, gw: int, width: float, height: float) -> np.ndarray:
    """(gh, gw) float in [0, 1]: the share of each cell's area inside the union of the boxes (exact)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (N, 4) x, y, w, h
    mx, lx, cx = _pieces(np.linspace(0, width, gw + 1), b[:, 0], b[:, 0] + b[:, 2], width)
    my, ly, cy = _pieces(np.linspace(0, height, gh + 1), b[:, 1], b[:, 1] + b[:, 3], height)
    in_x = (mx[None, :] >= b[:, :1]) & (mx[None, :] <= b[:, :1] + b[:, 2:3])  # (N, PX)
    in_y = (my[None, :] >= b[:, 1:2]) & (my[None, :] <= b[:, 1:2] + b[:, 3:4])  # (N, PY)
    covered = (in_y[:, :, None] & in_x[:, None, :]).any(axis=0)  # (PY, PX)
    area = np.zeros((gh, gw))
    np.add.at(area, (cy[:, None], cx[None, :]), covered * ly[:, None] * lx[None, :])
    return area / ((width / gw) * (height / gh))


def _attention_of(attention: dict, image_id: int, n_tokens: int | None) -> np.ndarray:
    """The (T, gh, gw) attention of one image, checked."""
    if image_id not in attention:
        raise AttncapError(f"no attention maps for image {image_id}; pass one (n_tokens, gh, gw) array per caption")
    alpha = np.asarray(attention[image_id], dtype=np.float64)
    if alpha.ndim != 3 or (n_tokens is not None and alpha.shape[0] != n_tokens):
        raise AttncapError(f"attention for image {image_id} has shape {alpha.shape}, expected "
                           f"({n_tokens or 'n_tokens'}, gh, gw): one map per caption token")
    return alpha


def grounding_scores(mentions: dict[int, list[Mention]], attention: dict[int, np.ndarray],
                     sizes: dict[int, tuple[float, float]], n_tokens: dict[int, int] | None = None
                     ) -> dict[str, float]:
    """Argmax-in-box rate, its chance level and attention mass inside boxes, over all mentions.

    mentions: {image id: [Mention]}; attention: {image id: (T, gh, gw)}, row t for caption token
    t; sizes: {image id: (width, height)} of the original image, the boxes' pixels; n_tokens:
    {image id: caption length} to check the attention against (None: only that every mentioned
    token has a map; decoding can emit more maps than words, see ``decoding.decode_split``). The mass of a row is divided by
    the row's sum (rounded maps sum to 1 only nearly). Returns {"grounding", "grounding_chance",
    "grounding_mass", "grounding_words"}; the scores are 0.0 when no word names a present object.
    """
    hits, chance, mass, words = 0, 0.0, 0.0, 0
    for image_id, found in mentions.items():
        alpha = _attention_of(attention, image_id, (n_tokens or {}).get(image_id))  # (T, gh, gw)
        width, height = sizes[image_id]
        for mention in found:
            if not 0 <= mention.token < len(alpha):
                raise AttncapError(f"image {image_id}: token {mention.token} has no attention map "
                                   f"({len(alpha)} maps); pass one map per caption token")
            row = alpha[mention.token]  # (gh, gw)
            inside = centre_cells(mention.boxes, *row.shape, width, height)
            r, c = np.unravel_index(int(np.argmax(row)), row.shape)
            hits += bool(inside[r, c])
            chance += float(inside.mean())
            covered = box_coverage(mention.boxes, *row.shape, width, height)
            mass += float((row * covered).sum() / row.sum()) if row.sum() > 0 else 0.0
            words += 1
    return {"grounding": hits / words if words else 0.0,
            "grounding_chance": chance / words if words else 0.0,
            "grounding_mass": mass / words if words else 0.0, "grounding_words": words}
