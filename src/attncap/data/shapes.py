"""The built-in "shapes world": a synthetic captioning dataset (COCO format), deterministic from a seed.

Each image holds 1-4 filled shapes (5 shapes, 6 colours, 2 sizes) on a noisy background; its five captions
name every object by colour and shape, so a perfect caption has attribute recall 1.0 and colour/shape words
can be checked against object boxes (attention grounding). Image ``i`` is drawn from
``numpy.random.default_rng([seed, i])`` alone, so images can be made in any order or in parallel.
"""

from __future__ import annotations

import colorsys
import contextlib
import functools
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..errors import AttncapError
from ..files import atomic_path, read_json, remove_dead_temps, sync_folder, write_json

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 35, 35), "green": (35, 165, 55), "blue": (35, 75, 225),
                                             "yellow": (240, 215, 30), "purple": (145, 45, 185),
                                             "orange": (250, 135, 20)}
SIZES: tuple[str, ...] = ("small", "large")
COLOUR_WORDS: dict[str, str] = {colour: colour for colour in COLOURS}
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk"), "square": ("square", "box"), "triangle": ("triangle",),
    "star": ("star",), "diamond": ("diamond",),
}
PLURALS: dict[str, str] = {w: w + ("es" if w.endswith("x") else "s") for ws in SHAPE_SYNONYMS.values() for w in ws}
SHAPE_WORDS: dict[str, str] = {
    form: shape for shape, words in SHAPE_SYNONYMS.items() for word in words for form in (word, PLURALS[word])
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
FORMAT_VERSION = 1

_SIZE_LOOKUP = frozenset(word for words in SIZE_WORDS.values() for word in words)
_SIDE_FRACTION = {"small": (0.17, 0.20), "large": (0.30, 0.36)}  # box side / image side
_GAP = 4  # minimum pixels between two object boxes
_JITTER = 15  # per-channel colour jitter of each object
_INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above", "next to": "next to"}


@dataclass(frozen=True)
class Mention:
    """One "<colour> [size] <shape>" phrase of a caption; indices are token positions."""

    colour: str
    shape: str
    colour_index: int
    shape_index: int


def named_objects(tokens: list[str]) -> list[Mention]:
    """Find every colour word followed by a shape word, with at most one size word between.

    ``tokens`` are lowercase words without punctuation; a plural ("two green triangles") is one
    Mention. Returns the mentions in caption order.
    """
    mentions = []
    for i, word in enumerate(tokens):
        if word not in COLOUR_WORDS:
            continue
        j = i + 1
        if j < len(tokens) and tokens[j] in _SIZE_LOOKUP:
            j += 1
        if j < len(tokens) and tokens[j] in SHAPE_WORDS:
            mentions.append(Mention(COLOUR_WORDS[word], SHAPE_WORDS[tokens[j]], i, j))
    return mentions


@dataclass(frozen=True)
class ShapesWorld:
    """Where a generated shapes world lives on disk."""

    root: Path
    captions_json: Path
    splits_json: Path
    objects_json: Path
    images_dir: Path

    @classmethod
    def at(cls, root: str | Path) -> "ShapesWorld":
        root = Path(root)
        return cls(root, root / "captions.json", root / "splits.json", root / "objects.json", root / "images")


def image_file_name(image_id: int) -> str:
    """File name of an image, relative to ``images/``."""
    return f"shapes_{image_id:06d}.jpg"


def load_objects(path: str | Path) -> tuple[int, dict[int, list[dict]]]:
    """Read ``objects.json``: returns (image_size, {image id: [{"bbox", "shape", "colour", "size"}]})."""
    data = read_json(path, "shapes world objects file")
    return int(data["image_size"]), {int(k): v for k, v in data["objects"].items()}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _separated(a: list[int], b: list[int]) -> bool:
    """Whether [x, y, w, h] boxes a and b are at least _GAP pixels apart along x or y."""
    return any(a[k] + a[k + 2] + _GAP <= b[k] or b[k] + b[k + 2] + _GAP <= a[k] for k in (0, 1))


def _place(rng: np.random.Generator, side: int, size: int, boxes: list[list[int]]) -> list[int] | None:
    """Rejection-sample a free [x, y, side, side] box, or None after 100 misses."""
    for _ in range(100):
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        box = [x, y, side, side]
        if all(_separated(box, other) for other in boxes):
            return box
    return None


def _sample_objects(rng: np.random.Generator, size: int) -> list[dict]:
    """1-4 non-overlapping objects: [{"bbox": [x, y, w, h], "shape", "colour", "size"}]."""
    n = int(rng.integers(1, 5))
    specs = [(_pick(rng, SHAPES), _pick(rng, tuple(COLOURS)), _pick(rng, SIZES)) for _ in range(n)]
    specs.sort(key=lambda spec: spec[2] != "large")  # large first: easier packing
    while True:  # a failed packing starts again; 4 large objects always fit at 36 % each
        boxes: list[list[int]] = []
        for _, _, size_name in specs:
            low, high = _SIDE_FRACTION[size_name]
            box = _place(rng, int(round(rng.uniform(low, high) * size)), size, boxes)
            if box is None:
                break
            boxes.append(box)
        if len(boxes) == len(specs):
            return [{"bbox": box, "shape": shape, "colour": colour, "size": size_name}
                    for box, (shape, colour, size_name) in zip(boxes, specs)]


def _background_colour(rng: np.random.Generator) -> np.ndarray:
    """A grey, beige or pastel RGB colour (3,) far from every object colour."""
    while True:
        rgb = 255.0 * np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.6, 0.95)))
        if min(np.linalg.norm(rgb - np.array(c)) for c in COLOURS.values()) > 100:
            return rgb.astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A linear gradient between two muted colours: returns (image (S, S, 3) float32, base colour (3,))."""
    start, end = _background_colour(rng), _background_colour(rng)
    angle = rng.uniform(0.0, 2 * np.pi)
    t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    ramp = float(np.cos(angle)) * t[None, :] + float(np.sin(angle)) * t[:, None]  # (S, S) float32
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    return start + ramp[..., None] * (end - start), start  # (S, S, 3)


def _draw_clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int, base: np.ndarray) -> None:
    """A few faint lines and blobs close to the background colour."""
    for _ in range(int(rng.integers(0, 4))):
        tint = tuple(int(v) for v in np.clip(base + rng.normal(0, 18, 3), 0, 255))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
        if rng.random() < 0.5:
            draw.line([x0, y0, x1, y1], fill=tint, width=int(rng.integers(1, 4)))
        else:
            r = rng.uniform(0.01, 0.05) * size  # well below a small object's side
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tint)


def _shape_points(shape: str, bbox: list[int]) -> list[tuple[float, float]]:
    """Polygon outline of a shape filling its box (a circle is a 64-gon)."""
    x, y, w, h = bbox
    x1, y1 = x + w - 1, y + h - 1
    cx, cy, r = (x + x1) / 2, (y + y1) / 2, (w - 1) / 2
    if shape == "star":  # 5 points; centre lowered so the star spans the box height
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
        cy += 0.095 * r
        return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    return {"square": [(x, y), (x1, y), (x1, y1), (x, y1)],
            "triangle": [(cx, y), (x1, y1), (x, y1)],
            "diamond": [(cx, y), (x1, cy), (cx, y1), (x, cy)]}[shape]


def _render(rng: np.random.Generator, objects: list[dict], size: int) -> Image.Image:
    """Draw the objects over a gradient, clutter and Gaussian pixel noise."""
    pixels, base = _background(rng, size)
    image = Image.fromarray(pixels.astype(np.uint8))  # both ends are valid colours: no clipping needed
    draw = ImageDraw.Draw(image)
    _draw_clutter(rng, draw, size, base)
    for obj in objects:
        rgb = np.clip(np.array(COLOURS[obj["colour"]]) + rng.integers(-_JITTER, _JITTER + 1, 3), 0, 255)
        draw.polygon(_shape_points(obj["shape"], obj["bbox"]), fill=tuple(int(c) for c in rgb))
    noisy = rng.standard_normal((size, size, 3), dtype=np.float32)  # (S, S, 3)
    noisy *= rng.uniform(8.0, 15.0)
    noisy += np.asarray(image)
    return Image.fromarray(np.clip(noisy, 0, 255, out=noisy).astype(np.uint8))


@dataclass(frozen=True)
class _Group:
    """All objects sharing (colour, shape): described by one phrase."""

    colour: str
    shape: str
    sizes: tuple[str, ...]
    centres: tuple[tuple[float, float], ...]  # (x, y) pixel centres of the members


def _groups(objects: list[dict]) -> list[_Group]:
    """Objects grouped by (colour, shape), ordered left to right by mean centre."""
    members: dict[tuple[str, str], list[dict]] = {}
    for obj in objects:
        members.setdefault((obj["colour"], obj["shape"]), []).append(obj)
    groups = [_Group(colour, shape, tuple(o["size"] for o in objs),
                     tuple((o["bbox"][0] + o["bbox"][2] / 2, o["bbox"][1] + o["bbox"][3] / 2) for o in objs))
              for (colour, shape), objs in members.items()]
    return sorted(groups, key=lambda g: (np.mean([c[0] for c in g.centres]), np.mean([c[1] for c in g.centres])))


def _phrase(rng: np.random.Generator, group: _Group) -> str:
    """ "[a|an|one|two..] [size] <colour> <shape>", e.g. "two green triangles", "an orange disk"."""
    count = len(group.centres)
    shape_word = _pick(rng, SHAPE_SYNONYMS[group.shape])
    words = [NUMBER_WORDS[count - 1] if count > 1 else ("one" if rng.random() < 0.15 else "a")]
    if len(set(group.sizes)) == 1 and rng.random() < 0.7:
        words.append(_pick(rng, SIZE_WORDS[group.sizes[0]]))
    words += [group.colour, PLURALS[shape_word] if count > 1 else shape_word]
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def _list(rng: np.random.Generator, groups: list[_Group]) -> str:
    """ "A", "A and B", "A B and C" (no commas)."""
    phrases = [_phrase(rng, g) for g in groups]
    return phrases[0] if len(phrases) == 1 else " ".join(phrases[:-1]) + " and " + phrases[-1]


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where centre a lies relative to centre b; diagonal neighbours are "next to"."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= 1.5 * abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    if abs(dy) >= 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return "next to"


def _group_relation(a: _Group, b: _Group) -> str | None:
    """The relation shared by every member pair of a and b, or None when they disagree."""
    relations = {_relation(p, q) for p in a.centres for q in b.centres}
    return relations.pop() if len(relations) == 1 else None


def _ordered(groups: list[_Group], axis: int) -> list[_Group] | None:
    """Groups sorted along x (0) or y (1) when their members do not interleave, else None."""
    ordered = sorted(groups, key=lambda g: min(c[axis] for c in g.centres))
    pairs = zip(ordered, ordered[1:])
    apart = all(max(c[axis] for c in p.centres) < min(c[axis] for c in q.centres) for p, q in pairs)
    return ordered if apart else None


def _position(centre: tuple[float, float], size: int) -> str:
    """ "in the top left corner", "at the bottom", "on the left", "in the middle"."""
    x, y = centre[0] / size, centre[1] / size
    h = "left" if x < 1 / 3 else "right" if x > 2 / 3 else None
    v = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else None
    if h and v:
        return f"in the {v} {h} corner"
    return f"at the {v}" if v else f"on the {h}" if h else "in the middle"


def _captions(rng: np.random.Generator, objects: list[dict], size: int) -> list[str]:
    """Five distinct captions, each from a different template, naming every object."""
    groups, n_objects = _groups(objects), len(objects)

    def shuffled() -> list[_Group]:
        return [groups[i] for i in rng.permutation(len(groups))]

    def relation(reverse: bool) -> str | None:
        if len(groups) != 2 or (rel := _group_relation(*groups)) is None:
            return None
        a, b = (groups[1], groups[0]) if reverse else groups
        return f"{_phrase(rng, a)} {_INVERSE[rel] if reverse else rel} {_phrase(rng, b)}"

    def along(axis: int, words: str) -> str | None:
        ordered = _ordered(groups, axis) if len(groups) > 1 else None
        return f"{words} {_list(rng, ordered)}" if ordered else None

    def there(ordered: list[_Group]) -> str:
        return ("there are " if len(ordered[0].centres) > 1 else "there is ") + _list(rng, ordered)

    def count() -> str:
        opener = ("there are " if rng.random() < 0.5 else "") + f"{NUMBER_WORDS[n_objects - 1]} shapes"
        return f"{'only one shape' if n_objects == 1 else opener} {_list(rng, groups)}"

    def position() -> str | None:
        if n_objects > 1:
            return None
        text = there(groups) if rng.random() < 0.5 else _list(rng, groups)
        return f"{text} {_position(groups[0].centres[0], size)}"

    templates = (
        lambda: _list(rng, groups),
        lambda: "an image of " + _list(rng, shuffled()),
        lambda: f"{_pick(rng, ('a picture showing', 'a picture of'))} {_list(rng, groups)}",
        lambda: there(shuffled()),
        lambda: "an image with " + _list(rng, shuffled()),
        lambda: _list(rng, shuffled()) + " on a noisy background",
        count, position,
        lambda: along(0, "from left to right"), lambda: along(1, "from top to bottom"),
        lambda: relation(False), lambda: relation(True),
    )
    captions: list[str] = []
    for i in rng.permutation(len(templates)):  # 7 templates always apply, so 5 are always found
        text = templates[i]()
        if text is not None and text not in captions:
            captions.append(text)
    return captions[:5]


def _make_image(image_id: int, images_dir: Path, image_size: int, seed: int) -> tuple[list[dict], list[str]]:
    """Draw, write and caption one image; returns (objects, five captions)."""
    rng = np.random.default_rng([seed, image_id])
    objects = _sample_objects(rng, image_size)
    image = _render(rng, objects, image_size)
    with atomic_path(images_dir / image_file_name(image_id), durable=False) as tmp:  # synced at the end
        image.save(tmp, format="JPEG", quality=92)
    return objects, _captions(rng, objects, image_size)


def _make_all(world: ShapesWorld, n: int, image_size: int, seed: int, workers: int,
              progress: bool) -> list[tuple[list[dict], list[str]]]:
    """Make images 1..n (in a process pool when workers > 1); results in id order."""
    job = functools.partial(_make_image, images_dir=world.images_dir, image_size=image_size, seed=seed)
    with contextlib.ExitStack() as stack:
        mapper = map
        if workers > 1:
            pool = stack.enter_context(multiprocessing.Pool(min(workers, n)))
            mapper = functools.partial(pool.imap, chunksize=16)
        results = mapper(job, range(1, n + 1))
        return list(tqdm(results, total=n, desc="shapes world", unit="img", disable=not progress))


def _write_annotations(world: ShapesWorld, results: list, params: dict) -> None:
    """captions.json (COCO format, all splits), splits.json and objects.json."""
    size, n_train, n_val = params["image_size"], params["n_train"], params["n_val"]
    ids = list(range(1, len(results) + 1))
    images = [{"id": i, "file_name": image_file_name(i), "width": size, "height": size} for i in ids]
    pairs = [(i, text) for i, (_, caps) in zip(ids, results) for text in caps]
    annotations = [{"id": n, "image_id": i, "caption": text} for n, (i, text) in enumerate(pairs, start=1)]
    info = {"description": "attncap shapes world (synthetic)", "version": str(FORMAT_VERSION), **params}
    write_json(world.captions_json, {"info": info, "licenses": [], "images": images, "annotations": annotations})
    write_json(world.splits_json, {"train": ids[:n_train], "val": ids[n_train:n_train + n_val],
                                   "test": ids[n_train + n_val:]}, indent=None)
    objects = {str(i): objs for i, (objs, _) in zip(ids, results)}
    write_json(world.objects_json, {"image_size": size, "objects": objects}, indent=None)


def _reusable(world: ShapesWorld, manifest: dict) -> bool:
    """Whether an existing world on disk was made with exactly these parameters."""
    try:
        old = read_json(world.root / "manifest.json", "shapes world manifest")
    except AttncapError:
        return False  # missing or unreadable manifest: regenerate rather than trust the files
    files = (world.captions_json, world.splits_json, world.objects_json)
    return old == manifest and all(f.is_file() for f in files)


def generate_shapes_world(root: str | Path, n_train: int = 4000, n_val: int = 500, n_test: int = 500,
                          image_size: int = 224, seed: int = 0, workers: int = 2,
                          progress: bool = True) -> ShapesWorld:
    """Generate (or reuse) a shapes world under ``root``.

    Writes ``images/shapes_{id:06d}.jpg`` ((S, S, 3) RGB JPEG, ids 1..N: train, then val, then
    test), ``captions.json`` (COCO, 5 captions per image), ``splits.json``, ``objects.json`` and,
    last, ``manifest.json``. When the manifest records the same parameters nothing is rewritten.
    """
    params = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size, "seed": seed}
    if min(n_train, n_val, n_test, seed) < 0 or n_train + n_val + n_test == 0 or image_size < 64:
        raise AttncapError(f"shapes world needs counts and seed >= 0, at least one image and image_size >= 64; "
                           f"got {params}")
    world = ShapesWorld.at(root)
    manifest = {"format": "attncap-shapes-world", "version": FORMAT_VERSION, "params": params}
    if _reusable(world, manifest):
        return world
    (world.root / "manifest.json").unlink(missing_ok=True)  # an interrupted run must not look complete
    world.images_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(world.images_dir)  # once, not per image: the folder holds thousands
    results = _make_all(world, n_train + n_val + n_test, image_size, seed, workers, progress)
    sync_folder(world.images_dir)        # the images are durable before the manifest says they exist
    _write_annotations(world, results, params)
    write_json(world.root / "manifest.json", manifest)
    return world
