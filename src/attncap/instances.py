"""COCO instance annotations (``instances_*.json``): which objects each image holds, and where.

CHAIR (:mod:`attncap.chair`) needs the categories present in an image; attention grounding
(:mod:`attncap.grounding`) needs their boxes and the image's size. Only the fields of the COCO
object-detection format that these need are read: ``images[].{id, width, height}``,
``categories[].{id, name}`` and ``annotations[].{image_id, category_id, bbox}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import chair, grounding
from .config import DataConfig
from .errors import AttncapError
from .files import read_json


@dataclass
class ImageObjects:
    """The annotated objects of one image: ``boxes[category name] = [[x, y, w, h], ...]`` in pixels."""

    width: float
    height: float
    boxes: dict[str, list[list[float]]] = field(default_factory=dict)


def load_instances(paths: list[str | Path], wanted: set[int] | None = None) -> dict[int, ImageObjects]:
    """Read COCO instances JSONs (e.g. val and train 2014) in order: ``{image id: ImageObjects}``.

    With ``wanted``, files after the one completing the wanted image ids are not read (COCO's
    train instances file alone is 330 MB).
    """
    out: dict[int, ImageObjects] = {}
    for path in paths:
        if wanted is not None and wanted <= out.keys():
            break
        data = read_json(path, "instance annotations")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise AttncapError(f"instance annotations {path} have no '{key}' list; pass a COCO "
                                   "instances_*.json (data.instances)")
        try:
            names = {c["id"]: c["name"] for c in data["categories"]}
            for img in data["images"]:
                out[img["id"]] = ImageObjects(float(img["width"]), float(img["height"]))
            for ann in data["annotations"]:
                obj = out[ann["image_id"]]
                obj.boxes.setdefault(names[ann["category_id"]], []).append([float(v) for v in ann["bbox"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise AttncapError(f"instance annotations {path}: an entry lacks or mangles {exc}; is it a "
                               "COCO instances_*.json?") from None
    return out


def find_instances(cfg: DataConfig) -> list[Path]:
    """The instances JSONs for a dataset: ``data.instances`` (comma-separated), or found next to the data.

    Unset, they are looked for beside ``data.captions`` (``captions_X.json`` -> ``instances_X.json``)
    and in ``data.images/annotations/`` (the layout of ``attncap data coco2014``). Returns [] when
    there are none; a path named in ``data.instances`` that does not exist is an error.
    """
    if cfg.instances:
        paths = [Path(p.strip()) for p in cfg.instances.split(",") if p.strip()]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise AttncapError(f"data.instances names {missing[0]}, which does not exist; fix the path or "
                               "set data.instances=\"\" to look next to the captions")
        return paths
    if cfg.captions:
        captions = Path(cfg.captions)
        beside = captions.with_name(captions.name.replace("captions_", "instances_", 1))
        return [beside] if beside != captions and beside.is_file() else []
    if cfg.images:  # val before train: Karpathy's val and test images all come from val2014
        return sorted((Path(cfg.images) / "annotations").glob("instances_*.json"), reverse=True)
    return []


def split_instances(cfg: DataConfig, ids: list[int]) -> dict[int, ImageObjects] | None:
    """The instance annotations of a split's images (see :func:`find_instances`); None when there are none."""
    paths = find_instances(cfg)
    if not paths:
        return None
    found = load_instances(paths, set(ids))
    missing = sorted(set(ids) - found.keys())
    if missing:
        raise AttncapError(f"image {missing[0]} ({len(missing)} in all) is in none of the instance annotations "
                           f"{', '.join(map(str, paths))}; set data.instances to the instances JSON(s) of "
                           "these images")
    return {i: found[i] for i in ids}


def mentions(words: list[str], objects: ImageObjects) -> list[grounding.Mention]:
    """The caption tokens naming a category the image holds, each with that category's boxes.

    words: the caption's tokens, one per attention row; a phrase ("teddy bear") is grounded at its
    last word. Categories absent from the image are hallucinations (CHAIR), not grounded here.
    """
    return [grounding.Mention(index, tuple(tuple(b) for b in objects.boxes[category]))
            for index, _, category in chair.named_objects(list(words)) if category in objects.boxes]
